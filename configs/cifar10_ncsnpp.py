r"""NCSN++ on the VE SDE in continuous time (Song et al. 2021, "NCSN++ cont.") on CIFAR-10.

  python run_train.py --config configs/cifar10_ncsnpp.py --workdir runs/cifar10_ncsnpp \
      --config.data.data_dir=$TFDS_DATA_DIR
  python run_sample.py --workdir runs/cifar10_ncsnpp --sampler pc --steps 1000 --num_samples 50000

score_sde's `configs/ve/cifar10_ncsnpp_continuous.py`: the NCSN++ network (`NCSNpp()` with its
defaults: ch 128, ch_mult (1, 2, 2, 2), 4 BigGAN residual blocks per level, attention at
16x16, FIR [1, 3, 3, 1] resampling, skip rescaling, a residual input pyramid, Gaussian
Fourier features of log sigma with scale 16, dropout 0.1; 62.8M parameters), sigma(t) =
0.01 (50 / 0.01)^t on t in [1e-5, 1], data in [0, 1] (`center_input`: the network sees
2x - 1, as score_sde's does), t uniform, eps prediction (score_sde's `scale_by_sigma`) with
the unweighted eps-MSE (= sigma^2-weighted score matching, averaged over pixels), Adam 2e-4
with 5000 warmup steps, grad clip 1, EMA 0.999, batch 128, random flips, 1.3M steps; the PC
sampler (reverse diffusion + one Langevin step at snr 0.16, 1000 steps, final denoising).
`--config.model.num_res_blocks=8` is score_sde's "deep" variant (107.6M parameters).

score_sde's published checkpoint of this network (ve/cifar10_ncsnpp_continuous, its JAX `checkpoints/`) loads
as the starting point (or, with num_steps=0, as a run to sample from):
`--config.training.init_from=score_sde:<its checkpoints dir> --config.training.num_steps=0`.

Expected result: NOT run here (no CIFAR-10 and no accelerator time on this machine). The
published reference is score_sde's README, `ve/cifar10_ncsnpp_continuous`: FID 2.38, IS 9.83
(50k samples, PC 1000 steps); the deep variant FID 2.20, IS 9.89.

Variant `:runlocal` trains a small NCSN++ (ch 32, ch_mult (1, 2, 2), 1 block per level; 1,284,067
parameters) on the embedded 16x16 `shapes` data (no download) for 150 steps, then writes 16
samples with 50-step PC:

  python run_train.py --config configs/cifar10_ncsnpp.py:runlocal --workdir /tmp/ncsnpp_local

Measured here (shared 2-core CPU, one device): loss 0.94 (mean of steps 1-25) -> 0.10
(steps 126-150), 64 s for the loop including ~18 s of compilation; the samples are still
noise at 150 steps. With --config.training.num_steps=1500 --config.training.ema_decay=0.995
(8 min, the CPU shared with other work): loss 0.029, the same as the DDPM U-Net's in
configs/cifar10_ncsn_ve.py:runlocal; the final 50-step PC grid shows the shapes in visible
noise, and `run_sample.py --sampler pc --steps 200` (400 NFE, 44 s) draws 16 clean ones.
"""

from jaxdiff.configs import base_config, model_section
import ml_collections


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="cifar10", resolution=32, num_channels=3, random_flip=True, centered=False)
  # The process and model sections are replaced wholesale: their keys depend on the name.
  c.process = ml_collections.ConfigDict(dict(name="ve", sigma_min=0.01, sigma_max=50.0, eps=1e-5))
  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model = model_section("ncsnpp", center_input=True, dtype="auto")
  c.loss.update(prediction="eps", target="", weighting="none", reduce="mean", t_sampling="process")
  c.optimizer.update(name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=1_300_000, ema_decay=0.999, log_every=100,
                    checkpoint_every=50_000, keep_checkpoints=3, sample_every=50_000, num_final_samples=64)
  c.sampling.update(method="pc", predictor="reverse_diffusion", snr=0.16, n_corrector_steps=1,
                    num_steps=1000, batch_size=256, denoise=True)
  if arg == "runlocal":
    c.data.update(dataset="shapes", resolution=16, num_examples=2048, random_flip=True, num_threads=2)
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=150, ema_decay=0.99, log_every=25, checkpoint_every=150,
                      sample_every=0, num_final_samples=16)
    c.sampling.update(num_steps=50, batch_size=16)
  elif arg is not None:
    raise ValueError(f"configs/cifar10_ncsnpp.py takes no argument or 'runlocal', not {arg!r}.")
  return c
