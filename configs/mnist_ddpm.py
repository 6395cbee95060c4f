r"""DDPM on MNIST (28x28x1) from TFDS (array_record, no TensorFlow needed).

  python run_train.py --config configs/mnist_ddpm.py --workdir runs/mnist \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist --sampler ddim --steps 100

U-Net ch=64, ch_mult (1,2,2) (28 -> 14 -> 7), 2 res blocks, attention at 14x14, dropout 0.1;
linear DDPM schedule, T=1000; Adam 2e-4, warmup 1000, EMA 0.9999, batch 128.
Expected result: MEASURED_PLACEHOLDER

Variant `:runlocal`: a narrow network for a few hundred CPU steps.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True)
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                 num_groups=32)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=60_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=64)
  c.sampling.update(method="ddim", num_steps=100, batch_size=128)
  if arg == "runlocal":
    c.model.update(ch=32, num_res_blocks=1, num_groups=8, dropout=0.0)
    c.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    c.training.update(batch_size=64, num_steps=1000, ema_decay=0.995, log_every=50, checkpoint_every=500,
                      sample_every=0)
  return c
