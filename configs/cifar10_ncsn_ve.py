r"""VE SDE (SMLD / NCSN, Song et al. 2021) on CIFAR-10 with jaxdiff's DDPM U-Net.

  python run_train.py --config configs/cifar10_ncsn_ve.py --workdir runs/cifar10_ve \
      --config.data.data_dir=$TFDS_DATA_DIR
  python run_sample.py --workdir runs/cifar10_ve --sampler pc --steps 1000 --num_samples 50000

score_sde's continuous VE setup (`configs/ve/cifar10_ncsnpp_continuous.py` and
`configs/ve/cifar10_ddpm.py`): sigma(t) = 0.01 (50 / 0.01)^t on t in [1e-5, 1], data in
[0, 1] (not centred: sigma_max = 50 is about the largest distance between two CIFAR-10 images
at that scale, score_sde's rule for choosing it), t uniform (continuous training), Adam
2e-4 with 5000 warmup steps, grad clip 1, EMA 0.999, batch 128, random flips, 1.3M steps;
sampling with score_sde's PC sampler: reverse-diffusion predictor + one Langevin corrector
step at snr 0.16 per step, 1000 steps, final denoising. The network is jaxdiff's DDPM U-Net
(ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1), the
architecture of score_sde's `ve/cifar10_ddpm.py`; score_sde's best VE numbers use NCSN++,
which jaxdiff does not have.

Parameterization: `loss.prediction='eps'`. The VE score spans four orders of magnitude
(|score| ~ 1/sigma, sigma from 0.01 to 50); a network that predicts eps and is converted with
score = -eps / sigma has a unit-scale target at every sigma. That conversion is exactly
score_sde's `scale_by_sigma=True` for VE models. With `loss.weighting='none'` the eps-MSE is
denoising score matching weighted by lambda(sigma) = sigma^2, score_sde's weighting
(`reduce='mean'` here rather than score_sde's sum over pixels: a constant factor of 3072 that
would keep grad clipping at 1.0 always active).

Expected result: NOT run here (no CIFAR-10 and no accelerator time on this machine). The
published reference is score_sde's README: `ve/cifar10_ncsnpp_continuous` (NCSN++ network,
this process, PC sampler with 1000 steps) FID 2.38, IS 9.83 on 50k samples; expect a worse
FID from the smaller DDPM U-Net.

Variant `:runlocal` trains a small U-Net (ch 32, 1.1M parameters) on the embedded 16x16
`shapes` data (no download) for 150 steps, then writes 16 samples with 50-step PC:

  python run_train.py --config configs/cifar10_ncsn_ve.py:runlocal --workdir /tmp/ve_local

Measured here (shared 2-core CPU, one device): loss 0.94 (mean of steps 1-25) -> 0.085
(steps 126-150), 66 s for the loop including ~17 s of compilation; the samples are still
noise at 150 steps. With --config.training.num_steps=1500 --config.training.ema_decay=0.995
(10 min): loss 0.029, and `run_sample.py --sampler pc --steps 200` (400 NFE), `ald --steps 100
--sampler_options=n_steps_each=5` and `reverse_diffusion --steps 500` draw clean shapes, while
the deterministic samplers (`ode`, `heun`, `dpm_solver++`, which agree with each other
image for image) leave about a third of the samples noisy, as score_sde also found for VE
(its probability-flow ODE is far behind its SDE samplers on VE models).
"""

import ml_collections

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="cifar10", resolution=32, num_channels=3, random_flip=True, centered=False)
  # The process section is replaced wholesale: its keys depend on the process.
  c.process = ml_collections.ConfigDict(dict(name="ve", sigma_min=0.01, sigma_max=50.0, eps=1e-5))
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                 num_groups=32)
  c.loss.update(prediction="eps", target="", weighting="none", reduce="mean", t_sampling="process")
  c.optimizer.update(name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=1_300_000, ema_decay=0.999, log_every=100,
                    checkpoint_every=50_000, keep_checkpoints=3, sample_every=50_000, num_final_samples=64)
  c.sampling.update(method="pc", predictor="reverse_diffusion", snr=0.16, n_corrector_steps=1,
                    num_steps=1000, batch_size=256, denoise=True)
  if arg == "runlocal":
    c.data.update(dataset="shapes", resolution=16, num_examples=2048, random_flip=True, num_threads=2)
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                   num_groups=8)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=150, ema_decay=0.99, log_every=25, checkpoint_every=150,
                      sample_every=0, num_final_samples=16)
    c.sampling.update(num_steps=50, batch_size=16)
  elif arg is not None:
    raise ValueError(f"configs/cifar10_ncsn_ve.py takes no argument or 'runlocal', not {arg!r}.")
  return c
