r"""DDPM on MNIST (28x28x1) from TFDS (array_record, no TensorFlow needed).

  python run_train.py --config configs/mnist_ddpm.py --workdir runs/mnist \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist --sampler ddim --steps 100

U-Net ch=64, ch_mult (1,2,2) (28 -> 14 -> 7), 2 res blocks, attention at 14x14, dropout 0.1;
linear DDPM schedule, T=1000; Adam 2e-4, warmup 1000, EMA 0.9999, batch 128.
Expected result: the full config has not been run yet (it is sized for an accelerator: 60k
steps of batch 128); Ho et al.-style MNIST DDPMs of this size give clean digits.

Variant `:runlocal`: a narrow network (ch=16, no attention) for 600 steps of batch 32 on CPU:

  python run_train.py --config configs/mnist_ddpm.py:runlocal --workdir runs/mnist_local

Measured 2026-11-23 on 2 CPU cores: 1m54s wall for the whole command (~6.3 steps/s, 1.2 GB
peak RSS); loss 0.55 (step 50) -> 0.066 (100) -> 0.032 (600). The 64 DDIM-25 samples are
white strokes on black: some clear digits (1, 7, 2, 0, 8), many digit-like scribbles and a
few noisy blobs, as expected after 600 small steps.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True)
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                 num_groups=32)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=60_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=64)
  c.sampling.update(method="ddim", num_steps=100, batch_size=128)
  if arg == "runlocal":  # sized for a few minutes on 2 CPU cores: 28x28 kept, a narrow network
    c.data.data_dir = "../shared/tfds"
    c.model.update(ch=16, num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=600, ema_decay=0.99, log_every=50, checkpoint_every=300,
                      sample_every=0, num_final_samples=64)
    c.sampling.update(num_steps=25, batch_size=64)
  elif arg is not None:
    raise ValueError(f"configs/mnist_ddpm.py has the variant ':runlocal', not {arg!r}.")
  return c
