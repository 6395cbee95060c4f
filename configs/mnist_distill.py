r"""Progressive (2 steps), consistency and reflow (1 step) distillation of a class-conditional MNIST model.

  python run_train.py --config configs/mnist_distill.py:teacher --workdir runs/mnist_distill_teacher \
      --config.data.data_dir=../shared/tfds
  python run_train.py --config configs/mnist_distill.py --workdir runs/mnist_distill \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist_distill --labels 0,1,2,3   # 2 network evaluations per image

The teacher (`:teacher`) is configs/mnist_cond.py's network and recipe on the continuous
cosine-VP process with the v-parameterization, as Salimans & Ho train theirs (v keeps the
student's x0 finite at t = T, where eps-prediction would divide by alpha ~ 0). The student
(`config.distill`) starts from the teacher's EMA parameters and halves its deterministic DDIM
steps 7 times, 5k training steps each: 256 -> 128 -> ... -> 2 steps (`jaxdiff.distill`). Each
round's student becomes the next round's teacher. It samples with `ddim`, 2 steps (3 grid
points), no extra denoising step, no x0 clipping (the student was trained to land on the
teacher's path, whose targets may lie outside [-1, 1]).
Expected result: the full configs have not been run (no GPU time); see `:runlocal`.

Variants `:runlocal_teacher` and `:runlocal`: configs/mnist_cond.py:runlocal's narrow network
(ch=16, 268k parameters) trained for 1000 steps, then distilled 16 -> 8 -> 4 -> 2 steps in 3
rounds of 200 steps, on 2 CPU cores:

  python run_train.py --config configs/mnist_distill.py:runlocal_teacher --workdir runs/mnist_distill_teacher_local
  python run_train.py --config configs/mnist_distill.py:runlocal --workdir runs/mnist_distill_local
  python benchmarks/cond_mnist_eval.py --workdir runs/mnist_distill_local \
      --classifier_workdir runs/mnist_clf_clean --num_samples 500 --guidance_scales 0

MEASURED 2026-11-25 on 2 CPU cores: the teacher 2m19s (8.4 steps/s, 0.97 GB peak RSS; v-MSE
0.12 at step 1000), the student 2m00s (6.1 steps/s: each step adds the teacher's two forward
passes; 1.1 GB), its loss (x0-MSE x max(SNR, 1)) ~1e-3 in every round. 1000 samples per
setting, the clean classifier (97.3% on 2000 test images) reading "requested digit" at w=0 /
w=3, and the Frechet distance of the unconditional samples' classifier features to the test
images' (floor 0.09):

  teacher DDIM 17 NFE: 85.9% / 98.9%, FD 1.48      teacher DDIM 3 NFE: 96.3% / 100%, FD 5.09
  teacher DDIM  9 NFE: 87.7% / 99.1%, FD 1.81      teacher DDIM 2 NFE: 100% / 100%,  FD 17.75
  teacher DDIM  5 NFE: 91.1% / 99.4%, FD 2.25      student DDIM 2 NFE: 88.5% / 99.2%, FD 1.93

The teacher's 2-step samples are blurred class means (read perfectly, far from the data); the
student's 2 steps give the teacher's 9-17-step numbers. Digits are recognisable but rough, as
the teacher's are after 1000 small steps.

Consistency distillation (Song et al. 2023) of the same teacher into a 1-step model
(`config.distill.method='consistency'`: 18 grid times, Heun teacher steps, L2 metric, target
EMA 0.95), sampled with `consistency`, 1 network evaluation (`run_sample.py --steps 2`: 2):

  python run_train.py --config configs/mnist_distill.py:consistency --workdir runs/mnist_cd \
      --config.data.data_dir=../shared/tfds
  python run_train.py --config configs/mnist_distill.py:runlocal_consistency --workdir runs/mnist_cd_local

Expected result of `:consistency` (35k steps): not run (no GPU time). MEASURED 2026-11-25,
`:runlocal_consistency` (600 steps from the `:runlocal_teacher` run, 5.3 steps/s on 2 CPU cores),
scored as above: 1 NFE 83.7% / 96.1%, FD 1.91; 2 NFE 83.1% / 96.9%, FD 1.86 (the teacher's
own 1 DDIM step: 100% / 100%, FD 17.84, blurred means).

Reflow (Liu et al. 2023) of the same teacher (`config.distill.method='reflow'`): each batch,
the teacher's 8-step Heun samples (15 NFE) of fresh noise, learnt with its own v-loss on the
noise-sample pairs; sampled with 1-step DDIM:

  python run_train.py --config configs/mnist_distill.py:runlocal_reflow --workdir runs/mnist_reflow_local

Expected result of `:reflow` (35k steps): not run (no GPU time). MEASURED 2026-11-25,
`:runlocal_reflow` (600 steps, 5m38s at 1.9 steps/s, 1.2 GB): 1 NFE 86.4% / 95.8%, FD 2.05;
2 NFE the same samples (FD 2.045); 4 NFE 84.2% / 97.0%, FD 1.73; the teacher's Heun-8 pairs
themselves: 84.9% / 98.9%, FD 1.29. With `--config.distill.pairs=DIR
--config.distill.num_pairs=4800` (a fixed set, made first in 66 s): 2m35s in all, the same
student (86.6%, unconditional FD 2.049; the README's "Reflow" section).

Variants `:tiny_teacher`, `:tiny`, `:tiny_consistency` and `:tiny_reflow`: a few steps of a
very small network, for the test suite.
"""

import ml_collections

from jaxdiff.configs import base_config

VARIANTS = ("teacher", "runlocal_teacher", "runlocal", "tiny_teacher", "tiny", "consistency", "runlocal_consistency",
            "tiny_consistency", "reflow", "runlocal_reflow", "tiny_reflow")


def get_config(arg=None):
  if arg is not None and arg not in VARIANTS:
    raise ValueError(f"configs/mnist_distill.py has variants {', '.join(':' + v for v in VARIANTS)}, not {arg!r}.")
  size = "runlocal" if (arg or "").startswith("runlocal") else "tiny" if (arg or "").startswith("tiny") else ""
  teacher = arg is not None and arg.endswith("teacher")
  consistency = arg is not None and arg.endswith("consistency")
  reflow = arg is not None and arg.endswith("reflow")
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True, use_labels=True)
  c.process = ml_collections.ConfigDict(dict(name="cosine_vp"))
  c.loss.prediction = "v"
  c.model.dtype = "auto"  # bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                 num_groups=32, num_classes=10)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=60_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=100, label_dropout=0.1)
  c.sampling.update(method="ddim", num_steps=257, batch_size=100)
  if size == "runlocal":  # configs/mnist_cond.py:runlocal's network and budget
    c.data.data_dir = "../shared/tfds"
    c.model.update(ch=16, num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=1000, ema_decay=0.99, log_every=50, checkpoint_every=500,
                      sample_every=0, num_final_samples=50)
    c.sampling.update(num_steps=17, batch_size=50)
  elif size == "tiny":
    c.data.update(data_dir="../shared/tfds", split="train[:512]", num_threads=1)
    c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.0)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=2,
                      ema_decay=0.9, num_final_samples=8)
    c.sampling.update(num_steps=9, batch_size=8)
  if teacher:
    return c

  # The student: the teacher's config, plus config.distill and the sampler it is trained for.
  c.model.dropout = 0.0
  if consistency or reflow:
    return _one_run(c, size, "consistency" if consistency else "reflow")
  c.distill.update(teacher="runs/mnist_distill_teacher", teacher_steps=256, steps_per_round=5000)
  c.optimizer.update(learning_rate=1e-4, warmup_steps=100)  # restarts every round
  c.training.update(num_steps=7 * 5000, checkpoint_every=5000, sample_every=5000)
  if size == "runlocal":
    c.distill.update(teacher="runs/mnist_distill_teacher_local", teacher_steps=16, steps_per_round=200)
    c.optimizer.update(learning_rate=5e-4, warmup_steps=20)
    c.training.update(num_steps=3 * 200, checkpoint_every=200, sample_every=0)
  elif size == "tiny":
    c.distill.update(teacher="", teacher_steps=8, steps_per_round=2)  # the test sets the teacher
    c.training.update(num_steps=4, checkpoint_every=2)
  n = int(c.distill.teacher_steps) >> (c.training.num_steps // c.distill.steps_per_round)
  c.sampling.update(method="ddim", eta=0.0, num_steps=n + 1, denoise=False, clip_denoised=False)
  return c


def _one_run(c, size, method):
  """Consistency distillation (Song et al. 2023) or reflow (Liu et al. 2023) of the same teacher,
  in one run of 35k steps (600 on CPU), each sampled in 1 network evaluation. Consistency: 18
  grid times, Heun teacher steps, L2, target EMA 0.95, the `consistency` sampler. Reflow: the
  teacher's 8-step Heun samples (15 NFE) paired with their noise, learnt with the teacher's own
  v-loss, sampled with 1-step DDIM."""
  if method == "consistency":
    c.distill.update(method="consistency", num_scales=18, solver="heun", metric="l2", target_decay=0.95)
    c.sampling.update(method="consistency", num_steps=1, denoise=True)
    tiny = dict(num_scales=6)
  else:
    c.distill.update(method="reflow", solver="heun", teacher_steps=8)
    c.sampling.update(method="ddim", eta=0.0, num_steps=1, denoise=True)
    tiny = dict(teacher_steps=2)
  c.distill.teacher = "runs/mnist_distill_teacher"
  c.optimizer.update(learning_rate=1e-4, warmup_steps=100)
  c.training.update(num_steps=35_000, checkpoint_every=5000, sample_every=5000)
  if size == "runlocal":
    c.distill.teacher = "runs/mnist_distill_teacher_local"
    c.optimizer.update(learning_rate=5e-4, warmup_steps=20)
    c.training.update(num_steps=600, checkpoint_every=200, sample_every=0)
  elif size == "tiny":
    c.distill.update(teacher="", **tiny)  # the test sets the teacher
    c.training.update(num_steps=4, checkpoint_every=2)
  return c
