r"""SR3-style super-resolution on MNIST: 14x14 -> 28x28.

  python run_train.py --config configs/mnist_superres.py:runlocal --workdir runs/mnist_sr \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist_sr --task superres --input test_digits_28x28.npz \
      --sampler ddpm --steps 100

The network sees x_t and the 14x14 image (area-downsampled from the clean batch on the
device during training) upsampled bicubically to 28x28 as a second input channel
(`config.data.cond_resolution=14`; input 2 channels, output 1). `--task superres` with
28x28 inputs downsamples them, super-resolves and reports the PSNR against the originals
and against bicubic upsampling.

Full config: U-Net ch=64, ch_mult (1, 2, 2), 2 res blocks, attention at 14x14, dropout 0.1;
linear DDPM (T=1000), eps prediction; Adam 2e-4, warmup 1000, EMA 0.9999, batch 128, 30k
steps. Not run here (no accelerator was available for this change).

Sampling is ancestral (DDPM) with 100 steps, as SR3 samples stochastically.

Variant `:runlocal` (CPU): ch=32, 1 res block, no attention, batch 64, 500 steps, Adam 1e-3.
Measured 2026-11-23 on the project's 2-core CPU: training 11m15s (0.78 steps/s), eps-MSE
0.71 at step 50 -> 0.015 at step 500. On the first 64 MNIST test digits (28x28, area-
downsampled to 14x14; the .npz was written from `tfds.data_source("mnist", split="test")`)
the mean PSNR against the originals is, with bicubic upsampling at 19.93 dB:

  ddpm (ancestral) 1000 steps 20.80 dB (250 s) | 100 steps 20.47 dB (27 s) | 50 steps 20.06 dB
  ddim eta=1 50 steps 20.06 dB | ddim eta=0 50 or 200 steps, dpm_solver++ 25 steps: ~9.6 dB

The outputs are sharp digits that match the originals' strokes (tasks/superres_*.png). The
deterministic samplers leave visible pixel noise with this briefly trained network: the
probability-flow ODE carries the network's errors to the end, while stochastic steps
correct them (Karras et al. 2022, section 4); they are fine for well-trained models.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True,
                cond_resolution=14)
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                 num_groups=32)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=30_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=64)
  c.sampling.update(method="ancestral", num_steps=100, batch_size=128)
  if arg == "runlocal":
    c.model.update(ch=32, num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    c.training.update(batch_size=64, num_steps=500, ema_decay=0.995, log_every=50, checkpoint_every=250,
                      sample_every=0)
    c.sampling.update(batch_size=64)
  elif arg == "tiny":  # the tests: 8x8 shapes, 4x4 conditioning, a one-level U-Net (fast to compile)
    c.data.update(dataset="shapes", resolution=8, num_channels=3, num_examples=256, num_threads=1,
                  cond_resolution=4)
    c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.0)
    c.process.num_timesteps = 100
    c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=2,
                      ema_decay=0.9, num_final_samples=8)
    c.sampling.update(method="ddim", num_steps=4, batch_size=8)
  elif arg is not None:
    raise ValueError(f"configs/mnist_superres.py variant {arg!r} is not known; use '', 'runlocal' or 'tiny'.")
  return c
