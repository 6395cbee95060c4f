"""The config schema: every key a jaxdiff config may have, with defaults.

Config files under `configs/` start from `base_config()` and change what they need, so a
key that is not here is an error (configs are locked at parse time), and `validate`
checks values that depend on each other before anything is built.

Sections:
  seed          the one root PRNG seed (everything else is `fold_in` of it)
  data          dataset and preprocessing          -> `data.create_dataset`
  process       diffusion process (`name` + fields) -> `processes.get_process(**config.process)`
  model         network (`name` + fields)          -> `models.create_model(**config.model)`
  loss          objective                          -> `losses.make_denoising_loss(process, **config.loss)`
  optimizer     optax optimizer and schedule       -> `train.make_optimizer(**config.optimizer)`
  training      loop: steps, batch, EMA, logging, checkpoints
  sampling      the sampler used for samples written during and after training
  mesh          device mesh axes, e.g. {"data": -1, "fsdp": 1}
"""

from __future__ import annotations

import ml_collections

from jaxdiff.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      dataset="shapes",          # see jaxdiff.data.KNOWN
      data_dir="",               # TFDS data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
      split="train",
      eval_split="test",
      resolution=16,             # images are centre-cropped and resized to this
      num_channels=3,
      centered=True,             # scale images to [-1, 1] (else [0, 1])
      random_flip=False,
      uniform_dequantization=False,
      use_labels=False,          # yield labels (class-conditional models)
      num_examples=20000,        # size of the embedded datasets
      num_threads=4,             # grain reader threads
      num_workers=0,             # grain worker processes (0: none)
  ))

  c.process = ml_collections.ConfigDict(dict(
      name="ddpm", schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02))

  c.model = ml_collections.ConfigDict(dict(
      name="unet", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
      dropout=0.0, num_groups=8))

  c.loss = ml_collections.ConfigDict(dict(
      prediction="eps",          # what the network outputs: eps | x0 | v | score | edm
      target="",                 # space of the squared error ('' = prediction)
      weighting="none",          # none | likelihood | edm | min_snr
      reduce="mean",             # mean | sum over data dimensions
      t_sampling="process",      # process | lognormal (EDM) | discrete (NCSN)
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam",               # adam | adamw
      learning_rate=2e-4,
      schedule="constant",       # constant | cosine (after warmup)
      warmup_steps=0,
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,          # adamw only (decoupled)
      grad_clip=1.0,             # global-norm clipping (0 = off)
  ))

  c.training = ml_collections.ConfigDict(dict(
      batch_size=64,             # global batch, split over devices and hosts
      num_steps=1000,
      ema_decay=0.999,
      log_every=50,              # metrics are pulled from the device only this often
      checkpoint_every=500,
      keep_checkpoints=3,
      sample_every=0,            # write a sample grid every N steps (0: only at the end)
      num_final_samples=64,      # samples in the grid written at the end (0: none)
  ))

  c.sampling = ml_collections.ConfigDict(dict(
      method="ddim",             # see jaxdiff.samplers.METHODS
      num_steps=100,
      eta=0.0,                   # ddim only
      batch_size=64,
      denoise=True,
      clip_denoised=True,        # clip x0_hat to the data range (images only)
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.compilation_cache_dir = ""   # persistent XLA cache ('' = off)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that depend on each other; raises ConfigError naming the key and the fix."""
  t = config.training
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if int(t[key]) < 1:
      raise ConfigError(f"config.training.{key}={t[key]} must be >= 1.")
  if not 0.0 <= float(t.ema_decay) < 1.0:
    raise ConfigError(f"config.training.ema_decay={t.ema_decay} must be in [0, 1).")
  d, m = config.data, config.model
  if m.name == "unet" and d.dataset != "gmm2d":
    levels = len(m.ch_mult)
    div = 2 ** (levels - 1)
    if d.resolution % div:
      raise ConfigError(
          f"config.data.resolution={d.resolution} cannot pass through the U-Net's {levels} levels "
          f"(config.model.ch_mult={tuple(m.ch_mult)}), which halve it {levels - 1} times; use a "
          f"multiple of {div} or fewer levels.")
    sizes = {d.resolution // 2**i for i in range(levels)}
    missing = [r for r in m.attn_resolutions if r not in sizes]
    if missing:
      raise ConfigError(f"config.model.attn_resolutions={tuple(m.attn_resolutions)} includes {missing}, "
                        f"which no U-Net level has (feature-map sizes: {sorted(sizes, reverse=True)}).")
  if m.name == "mlp" and d.dataset != "gmm2d":
    raise ConfigError(f"config.model.name='mlp' takes vector data, but config.data.dataset={d.dataset!r} "
                      f"is an image dataset; use model.name='unet'.")
