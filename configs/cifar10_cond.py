r"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

  python run_train.py --config configs/cifar10_cond.py --workdir runs/cifar10_cond \
      --config.data.data_dir=$TFDS_DATA_DIR
  python run_sample.py --workdir runs/cifar10_cond --sampler ddim --steps 100 \
      --labels 0,1,2,3,4,5,6,7,8,9 --guidance_scale 0.3 --num_samples 50000

The Ho et al. (2020) CIFAR-10 network (configs/cifar10_ddpm.py: ch=128, ch_mult (1,2,2,2),
2 res blocks, attention at 16x16, dropout 0.1, linear betas over T=1000, Adam 2e-4, EMA
0.9999, batch 128, random flips) plus a label embedding (10 classes + the null label) added
to the time embedding: 35,751,939 parameters (35,746,307 + 11 x 512). Labels are dropped
to the null label with probability 0.1 (Ho & Salimans' p_uncond) so the same network is the
unconditional model guidance needs. Sampling uses w = 0.3 (out = cond + w (cond - uncond)),
in the range Ho & Salimans found best for FID on ImageNet 64x64 (w = 0.1-0.3; larger w
trades diversity and FID for IS).
Expected result: not run on this project's machines (no CIFAR-10 or GPU time there).

Variant `:runlocal` shrinks the network, batch and steps for a CPU smoke test.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="cifar10", resolution=32, num_channels=3, random_flip=True, centered=True,
                use_labels=True)
  c.process.update(name="ddpm", schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, num_groups=32, num_classes=10)
  c.loss.prediction = "eps"
  c.optimizer.update(name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=800_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=10_000, keep_checkpoints=3, sample_every=50_000,
                    num_final_samples=100, label_dropout=0.1)
  c.sampling.update(method="ddim", num_steps=100, batch_size=250, guidance_scale=0.3)
  if arg == "runlocal":
    c.model.update(ch=32, num_res_blocks=1)
    c.training.update(batch_size=16, num_steps=20, log_every=5, checkpoint_every=10, num_final_samples=20)
    c.optimizer.warmup_steps = 5
    c.sampling.update(num_steps=10, batch_size=20)
  elif arg is not None:
    raise ValueError(f"configs/cifar10_cond.py has the variant ':runlocal', not {arg!r}.")
  return c
