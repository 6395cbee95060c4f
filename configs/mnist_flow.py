r"""Flow matching (rectified flow, SD3's recipe) on MNIST from TFDS (array_record, no TensorFlow).

  python run_train.py --config configs/mnist_flow.py --workdir runs/mnist_flow \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist_flow --sampler ddim --steps 50

The U-Net of configs/mnist_ddpm.py trained on the straight path x_t = (1 - t) x0 + t eps
(`process.name='rectified_flow'`) to predict the velocity eps - x0 (`loss.prediction='flow'`),
with Esser et al. (2024)'s logit-normal training times (`loss.t_sampling='logit_normal'`,
mean 0, std 1), which put more of the training on the middle of the path. `ddim` (eta=0) is
the Euler sampler of flow matching; `process.shift` > 1 moves a uniform grid towards noise.
Expected result: the full config has not been run (sized for an accelerator, as
configs/mnist_ddpm.py).

Variant `:runlocal`: configs/mnist_ddpm.py:runlocal's narrow network and budget (ch=16, no
attention, 600 steps of batch 32), so the two can be compared on 2 CPU cores:

  python run_train.py --config configs/mnist_flow.py:runlocal --workdir runs/mnist_flow_local

Measured 2026-11-24 on 2 CPU cores: 1m59s wall for the whole command (~6.4 steps/s, 0.93 GB
peak RSS; mnist_ddpm.py:runlocal: 1m54s, 6.3 steps/s, 1.2 GB). The loss ((eps - x0)-MSE, whose
minimum is not 0) falls 1.31 (step 50) -> 0.38 (100) -> 0.19 (600). The 64 Euler-25 samples are
white strokes on a clean black background (no leftover pixel noise, unlike DDIM on the DDPM
run): some clear digits (1, 7, 0, 8, 2, 9), most digit-like strokes, as expected after 600
small steps.
"""

import ml_collections

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True)
  c.process = ml_collections.ConfigDict(dict(name="rectified_flow", eps=1e-3, t_max=0.999, shift=1.0))
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                 num_groups=32)
  c.loss.update(prediction="flow", t_sampling="logit_normal")
  c.loss.logit_mean, c.loss.logit_std = 0.0, 1.0
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=60_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=64)
  c.sampling.update(method="ddim", num_steps=50, batch_size=128)
  if arg == "runlocal":  # configs/mnist_ddpm.py:runlocal's network and budget
    c.data.data_dir = "../shared/tfds"
    c.model.update(ch=16, num_res_blocks=1, attn_resolutions=(), num_groups=8, dropout=0.0)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=600, ema_decay=0.99, log_every=50, checkpoint_every=300,
                      sample_every=0, num_final_samples=64)
    c.sampling.update(num_steps=25, batch_size=64)
  elif arg is not None:
    raise ValueError(f"configs/mnist_flow.py has the variant ':runlocal', not {arg!r}.")
  return c
