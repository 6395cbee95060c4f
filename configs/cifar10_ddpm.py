r"""DDPM on CIFAR-10, the Ho et al. (2020) setup.

  python run_train.py --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm \
      --config.data.data_dir=$TFDS_DATA_DIR
  python run_sample.py --workdir runs/cifar10_ddpm --sampler ddpm --steps 1000 --num_samples 50000

Linear betas 1e-4..0.02 over T=1000; U-Net ch=128, ch_mult (1,2,2,2), 2 res blocks,
attention at 16x16, dropout 0.1 (35,746,307 parameters, the same network as diffusers'
google/ddpm-cifar10-32); Adam lr 2e-4 with 5000 warmup steps, grad clip 1.0, EMA 0.9999,
batch 128, random horizontal flips, 800k steps.
Expected result (Ho et al. 2020, Table 1): FID 3.17, IS 9.46 with the 1000-step ancestral
sampler. Not reproduced on this project's machines (no CIFAR-10 or GPU time there).

Variant `:runlocal` shrinks the network, batch and steps for a CPU smoke test.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="cifar10", resolution=32, num_channels=3, random_flip=True, centered=True)
  c.process.update(name="ddpm", schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, num_groups=32)
  c.loss.prediction = "eps"
  c.optimizer.update(name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=800_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=10_000, keep_checkpoints=3, sample_every=50_000,
                    num_final_samples=64)
  c.sampling.update(method="ancestral", num_steps=1000, batch_size=256)
  if arg == "runlocal":
    c.model.update(ch=32, num_res_blocks=1)
    c.training.update(batch_size=16, num_steps=20, log_every=5, checkpoint_every=10, num_final_samples=16)
    c.optimizer.warmup_steps = 5
    c.sampling.update(method="ddim", num_steps=10, batch_size=16)
  return c
