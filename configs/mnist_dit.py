r"""Class-conditional DiT (Peebles & Xie 2023) on MNIST with classifier-free guidance.

  python run_train.py --config configs/mnist_dit.py --workdir runs/mnist_dit \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist_dit --labels 0,1,2 --guidance_scale 3.0

DiT-S/2 (`jaxdiff.models.dit_size("S/2")`: width 384, 12 blocks, 6 heads; 14 x 14 = 196
tokens of 2 x 2 pixels, 32.5M parameters) with adaLN-Zero conditioning on the timestep and
the label; labels are dropped to the null label with probability 0.1 in training
(config.training.label_dropout), so one network is the conditional and the unconditional
model guidance needs. DiT's recipe otherwise: linear DDPM schedule, T=1000, eps prediction,
Adam 1e-4 without weight decay or warmup, EMA 0.9999, batch 256. Expected result: not run on
this project's machines (no GPU time); see `:runlocal`.

Variant `:runlocal`: a narrow DiT for 2 CPU cores (patch 4: 7 x 7 = 49 tokens, width 128,
4 blocks, 4 heads; MEASURED below), otherwise as configs/mnist_cond.py:runlocal so the two
can be compared with the same classifier and evaluation:

  python run_train.py --config configs/mnist_dit.py:runlocal --workdir runs/mnist_dit
  python benchmarks/cond_mnist_eval.py --workdir runs/mnist_dit \
      --classifier_workdir runs/mnist_clf_clean --num_samples 500 --guidance_scales 0,1,3 --num_test 10000

MEASURED 2026-11-24 on the project's shared 2-core CPU (1 device), 1,272,324 parameters:
3000 steps of batch 32 at lr 1e-3 (EMA 0.99) in 7m29s wall for the whole command (~7.2
steps/s, 0.71 GB peak RSS), about mnist_cond.py:runlocal's 7m13s. The eps-MSE falls 0.083
(step 300) -> 0.055 (1000) -> 0.048 (2000) -> 0.046 (3000); mnist_cond.py:runlocal's U-Net
is at 0.032 after 600 steps. With configs/mnist_classifier.py:clean retrained (96.9% on the
10,000 test images), 500 samples per setting (DDIM 25), the fraction labelled as the
requested digit, +- binomial standard error:

  unconditional (null label) 10.4% +- 1.4 (chance: 10%)
  w=0 14.4% +- 1.6, w=1 18.4% +- 1.7, w=3 30.6% +- 2.1
  (mnist_cond.py:runlocal, the U-Net, same evaluation: w=0 30.2%, w=1 53.4%, w=3 75.2%)

The samples are blocky strokes, a few digits recognisable. At this budget the small DiT is
well behind the U-Net, as expected of a transformer without convolutions' locality given a
few CPU minutes (DiT's results come from 400k+ steps); guidance still doubles the hit rate.
Patch 2 (196 tokens) ran at ~1.7 steps/s and was no better after 900 steps (loss 0.055);
lr 3e-4 was worse than 1e-3 after 600 steps (0.071 vs 0.062).

Variant `:tiny`: a few steps of a very small DiT, for the test suite (plumbing only).
"""

from jaxdiff.configs import base_config, model_section
from jaxdiff.models import dit_size


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True,
                use_labels=True)
  c.model = model_section("dit", **dit_size("S/2"), num_classes=10, dtype="auto")
  c.optimizer.update(learning_rate=1e-4, warmup_steps=0, grad_clip=0.0)
  c.training.update(batch_size=256, num_steps=100_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=100,
                    label_dropout=0.1)
  c.sampling.update(method="ddim", num_steps=100, batch_size=100, guidance_scale=3.0)
  if arg == "runlocal":
    c.data.data_dir = "../shared/tfds"
    c.model.update(patch_size=4, hidden_size=128, depth=4, num_heads=4)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50, grad_clip=1.0)
    c.training.update(batch_size=32, num_steps=3000, ema_decay=0.99, log_every=50,
                      checkpoint_every=500, sample_every=0, num_final_samples=50)
    c.sampling.update(num_steps=25, batch_size=50)
  elif arg == "tiny":
    c.data.update(data_dir="../shared/tfds", split="train[:512]", num_threads=1)
    c.model.update(patch_size=7, hidden_size=16, depth=1, num_heads=2)
    c.process.num_timesteps = 100
    c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1,
                      ema_decay=0.9, num_final_samples=8)
    c.sampling.update(num_steps=4, batch_size=8)
  elif arg is not None:
    raise ValueError(f"configs/mnist_dit.py has variants ':runlocal' and ':tiny', not {arg!r}.")
  return c
