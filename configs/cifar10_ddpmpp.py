r"""DDPM++ on the VP SDE in continuous time (Song et al. 2021, "DDPM++ cont.") on CIFAR-10.

  python run_train.py --config configs/cifar10_ddpmpp.py --workdir runs/cifar10_ddpmpp \
      --config.data.data_dir=$TFDS_DATA_DIR
  python run_sample.py --workdir runs/cifar10_ddpmpp --sampler pc --steps 1000 --num_samples 50000
  python run_sample.py --workdir runs/cifar10_ddpmpp --sampler ode --num_samples 50000

score_sde's `configs/vp/cifar10_ddpmpp_continuous.py`: the DDPM++ network
(`NCSNpp(**ncsnpp.DDPMPP_CIFAR10)`: ch 128, ch_mult (1, 2, 2, 2), 4 BigGAN residual blocks per
level, attention at 16x16, skip rescaling, no FIR and no pyramids, DDPM's sinusoidal
embedding of 999 t, dropout 0.1; 61.8M parameters), beta(t) = 0.1 + 19.9 t on t in [1e-3, 1]
(score_sde trains from t = 1e-5 and samples down to 1e-3; jaxdiff's process has one eps),
t uniform, eps prediction with the unweighted eps-MSE averaged over pixels, data in [-1, 1],
random flips, Adam 2e-4 with 5000 warmup steps, grad clip 1, EMA 0.9999, batch 128, 1.3M
steps; samples with score_sde's VP sampler, PC with the Euler-Maruyama predictor and no
corrector (1000 steps), or with the adaptive probability-flow ODE (`--sampler ode`).
`--config.model.num_res_blocks=8` is score_sde's "deep" variant (106.6M parameters).

score_sde's published checkpoint of this network (vp/cifar10_ddpmpp_continuous, its JAX `checkpoints/`) loads
as the starting point (or, with num_steps=0, as a run to sample from):
`--config.training.init_from=score_sde:<its checkpoints dir> --config.training.num_steps=0`.

Expected result: NOT run here (no CIFAR-10 and no accelerator time on this machine). The
published reference is score_sde's README, `vp/cifar10_ddpmpp_continuous`: FID 2.55, IS 9.58
(PC 1000 steps), FID 3.93 with the probability-flow ODE, NLL 3.16 bits/dim; the deep variant
FID 2.41, IS 9.68, FID(ODE) 3.08, NLL 3.13.

Variant `:runlocal` trains a small DDPM++ (ch 32, ch_mult (1, 2, 2), 1 block per level; 1,260,547
parameters) on the embedded 16x16 `shapes` data (no download) for 150 steps and samples
with 50-step DPM-Solver++(2M):

  python run_train.py --config configs/cifar10_ddpmpp.py:runlocal --workdir /tmp/ddpmpp_local

Measured here (shared 2-core CPU, one device): loss 0.92 (mean of steps 1-25) -> 0.043
(steps 126-150), 55 s for the loop including ~17 s of compilation; the samples are still
noise at 150 steps. With --config.training.num_steps=1500 --config.training.ema_decay=0.995
(6 min): loss 0.017 (the DDPM U-Net of configs/cifar10_vp_continuous.py:runlocal: 0.017);
`run_sample.py --sampler pc --steps 200` (200 NFE, 17 s) draws 16 clean shapes, while the
deterministic samplers (`dpm_solver++` with 20 NFE and `ode` with 584, which agree image for
image) leave 5 of the same 16 seeds noisy at this length of training.
"""

import ml_collections

from jaxdiff.configs import base_config, model_section
from jaxdiff.models.ncsnpp import DDPMPP_CIFAR10


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="cifar10", resolution=32, num_channels=3, random_flip=True, centered=True)
  # The process and model sections are replaced wholesale: their keys depend on the name.
  c.process = ml_collections.ConfigDict(dict(name="vp", beta_min=0.1, beta_max=20.0, eps=1e-3))
  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model = model_section("ncsnpp", **DDPMPP_CIFAR10, dtype="auto")
  c.loss.update(prediction="eps", target="", weighting="none", reduce="mean", t_sampling="process")
  c.optimizer.update(name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=1_300_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=50_000, keep_checkpoints=3, sample_every=50_000, num_final_samples=64)
  c.sampling.update(method="pc", predictor="euler_maruyama", n_corrector_steps=0, num_steps=1000,
                    batch_size=256, denoise=True)
  if arg == "runlocal":
    c.data.update(dataset="shapes", resolution=16, num_examples=2048, random_flip=True, num_threads=2)
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=150, ema_decay=0.99, log_every=25, checkpoint_every=150,
                      sample_every=0, num_final_samples=16)
    c.sampling.update(method="dpm_solver++", order=2, num_steps=50, batch_size=16)
  elif arg is not None:
    raise ValueError(f"configs/cifar10_ddpmpp.py takes no argument or 'runlocal', not {arg!r}.")
  return c
