r"""DDPM on your own images: a folder of PNG/JPEG files at 64x64.

  python run_train.py --config configs/folder_ddpm.py --workdir runs/my_images \
      --config.data.data_dir=/path/to/images
  python run_sample.py --workdir runs/my_images --sampler ddim --steps 100

The folder is read recursively; images are converted to RGB, centre-cropped to a square,
resized to 64x64 and randomly flipped; corrupt files are skipped and counted in the log.
With one sub-folder per class, --config.data.use_labels=True yields the labels (for a
class-conditional model). For greyscale images set --config.data.num_channels=1.

Network: the DDPM U-Net at 64x64, ch=128, ch_mult (1,2,2,2) (64 -> 32 -> 16 -> 8), two
res blocks, attention at 16x16, dropout 0.1; linear betas over T=1000; Adam 2e-4 with
5000 warmup steps, grad clip 1, EMA 0.9999, batch 64. No result is claimed: it depends
on your images (a few thousand similar images and ~100k steps give recognisable samples).

Variant `:runlocal`: 32x32, a narrow network and 200 steps, a CPU smoke test of a folder.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="folder", data_dir="", resolution=64, num_channels=3, centered=True,
                random_flip=True, use_labels=False, num_threads=8)
  c.process.update(name="ddpm", schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                 num_groups=32)
  c.loss.prediction = "eps"
  c.optimizer.update(name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0)
  c.training.update(batch_size=64, num_steps=500_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=10_000, keep_checkpoints=3, sample_every=25_000, num_final_samples=64)
  c.sampling.update(method="ddim", num_steps=100, batch_size=64)
  if arg == "runlocal":
    c.data.update(resolution=32, num_threads=2)
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
                   num_groups=8)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=20)
    c.training.update(batch_size=32, num_steps=200, ema_decay=0.99, log_every=20, checkpoint_every=100,
                      sample_every=0, num_final_samples=16)
    c.sampling.update(num_steps=20, batch_size=16)
  return c
