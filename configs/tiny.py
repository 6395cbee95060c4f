r"""The tiny config the tests use: a few steps of an 8x8 U-Net; seconds on a CPU.

  python run_train.py --config configs/tiny.py --workdir /tmp/tiny
  python run_sample.py --workdir /tmp/tiny --sampler ddim --steps 4 --num_samples 8

Expected result: finishes in well under a minute (mostly compilation); the samples are not
meant to look like anything.
"""

from jaxdiff.configs import base_config


def get_config():
  c = base_config()
  c.data.update(dataset="shapes", resolution=8, num_channels=3, num_examples=256, num_threads=1)
  c.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
  c.process.num_timesteps = 100
  c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
  c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=2,
                    ema_decay=0.9, num_final_samples=8)
  c.sampling.update(method="ddim", num_steps=4, batch_size=8)
  return c
