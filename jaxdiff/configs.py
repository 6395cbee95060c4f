"""The config schema: every key a jaxdiff config may have, with defaults.

Config files under `configs/` start from `base_config()` and change what they need, so a
key that is not here is an error (configs are locked at parse time), and `validate`
checks values that depend on each other before anything is built.

Sections:
  seed          the one root PRNG seed (everything else is `fold_in` of it)
  data          dataset and preprocessing          -> `data.create_dataset`
  process       diffusion process (`name` + fields) -> `processes.get_process(**config.process)`
  model         network (`name` + fields)          -> `models.create_model(**config.model)`
  latent        latent diffusion: a frozen autoencoder the model runs in -> `latent.latent_space`
  distill       progressive, consistency or reflow distillation of a teacher run -> `jaxdiff.distill`
  loss          objective: denoising -> `losses.make_denoising_loss(process, **config.loss)`, or
                consistency training -> `losses.make_consistency_training_loss`
  optimizer     optax optimizer and schedule       -> `train.make_optimizer(**config.optimizer)`
  training      loop: steps, batch, EMA, logging, checkpoints
  sampling      the sampler used for samples written during and after training
  mesh          device mesh axes, e.g. {"data": -1, "fsdp": 1}
  checkpoint_dir, compilation_cache_dir   where checkpoints / the XLA cache live
  cache_executables   with a cache dir, also keep the compiled train step (`jaxdiff.aot`)
"""

from __future__ import annotations

import ml_collections

from jaxdiff.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      dataset="shapes",          # see jaxdiff.data.KNOWN: shapes | gmm2d | mnist | fashion_mnist |
                                 # cifar10 | celeb_a | lsun/<category> | downsampled_imagenet/32x32 |
                                 # imagenet_resized/64x64 | ... | folder
      data_dir="",               # TFDS data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets), or
                                 # the image folder for dataset='folder'
      split="train",             # TFDS split, slicing allowed ('train[:90%]'); folders ignore it
      eval_split="test",
      resolution=16,             # images are centre-cropped to a square and resized to this
      crop_size=0,               # side of the centred crop before resizing (0 = the shorter side)
      num_channels=3,            # 1 or 3; must match a TFDS dataset (folders are converted)
      centered=True,             # scale images to [-1, 1] (else [0, 1])
      random_flip=False,         # random horizontal flips
      uniform_dequantization=False,  # (pixel + U[0,1)) / 256 instead of pixel / 255
      use_labels=False,          # yield labels (class-conditional models); needs a labelled dataset
      cond_resolution=0,         # >0: super-resolution (SR3): the model also sees each image area-
                                 # downsampled to this side, upsampled as extra input channels
      num_examples=20000,        # size of the embedded datasets
      num_threads=4,             # grain reader threads per process (decode, resize)
      num_workers=0,             # grain worker processes (0: none)
      prefetch_buffer_size=4,    # host batches read ahead by the reader threads
      prefetch_to_device=2,      # global batches kept in flight on the devices (0: none)
  ))

  c.process = ml_collections.ConfigDict(dict(
      name="ddpm", schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02))

  c.model = ml_collections.ConfigDict(dict(
      name="unet", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
      dropout=0.0, num_groups=8,
      dtype="float32",           # compute dtype: float32 | bfloat16 | auto (bfloat16 on GPU/TPU,
                                 # float32 on CPU); GroupNorm statistics and the loss stay float32
      param_dtype="float32",     # parameter (and optimizer state) dtype
      num_classes=0,             # >0: class-conditional on the dataset's labels (needs data.use_labels);
                                 # name='classifier': the classes of a noise-conditional classifier
  ))

  c.latent = ml_collections.ConfigDict(dict(
      autoencoder="",            # '' = pixel space; 'diffusers:<dir>' (an AutoencoderKL, e.g. the SD VAE) or
                                 # 'jaxdiff:<workdir>' (a run of model.name='autoencoder'): the model is
                                 # trained and samples in its latents (jaxdiff.latent)
      scaling_factor=0.0,        # latents = scaling_factor * (z - shift); 0 = the autoencoder's (diffusers'
                                 # config, or 1/std measured by the jaxdiff run)
      sample_posterior=True,     # train on z ~ q(z|x) (LDM); False: on the posterior mean
  ))

  c.distill = ml_collections.ConfigDict(dict(
      teacher="",                # '' = ordinary training; a run's workdir (its latest checkpoint; '<workdir>@<step>':
                                 # that one): distil its model into a student that samples in fewer steps
                                 # (jaxdiff.distill)
      method="progressive",      # progressive (Salimans & Ho 2022) | consistency (Song et al. 2023) |
                                 # reflow (Liu et al. 2023)
      clip_teacher=True,         # clip the teacher's x0 to the data range (pixel images), as its sampler did
      # method='progressive' (teacher_steps: also reflow's)
      teacher_steps=0,           # progressive: the teacher's DDIM steps distilled in the first round (each round
                                 # halves them); reflow: the grid times of the teacher's sampler for each pair
      steps_per_round=0,         # training steps per round; rounds = training.num_steps / steps_per_round
      weighting="truncated_snr",  # truncated_snr: max(SNR, 1) | snr_plus_one: SNR + 1 (x0-error weights)
      # method='consistency' (solver: also reflow's)
      num_scales=18,             # N: the Karras grid's times the teacher steps between (CIFAR-10: 18)
      solver="heun",             # the teacher's ODE step: heun (2 NFE) | ddim (1); reflow: also dpm_solver++
      metric="l2",               # l2 | pseudo_huber (Song & Dhariwal 2024) | lpips (Song et al.'s best; config.lpips)
      target_decay=0.95,         # EMA rate of the target network (0: the student, without gradient)
      sigma_data=0.5,            # c_skip's data standard deviation (images in [-1, 1]: 0.5)
      # method='reflow'
      pairs="",                  # '' = fresh pairs every batch; a directory: train on the fixed pairs there, which
                                 # the run makes first (num_pairs of them) when it holds none (jaxdiff.data.pairs);
                                 # a filesystem path every host sees (memory-mapped, so no bucket URL)
      num_pairs=0,               # how many pairs the teacher makes (0: use the directory's)
      pairs_dtype="float32",     # how they are stored: float32 | float16 (half the disk and page cache; rounds
                                 # each value to 11 significant bits, well below an 8-bit image's step)
  ))

  c.lpips = ml_collections.ConfigDict(dict(  # a consistency loss with metric='lpips' (jaxdiff.models.lpips)
      weights="",                # comma-separated: torchvision's vgg16-397923af.pth and the lpips package's
                                 # weights/v0.1/vgg.pth (or one state dict of lpips.LPIPS(net='vgg'); .npz too)
      resolution=224,            # images are resized to this side first (consistency models: 224); 0: as they are
  ))

  c.loss = ml_collections.ConfigDict(dict(
      prediction="eps",          # what the network outputs: eps | x0 | v | score | flow | edm
      target="",                 # space of the squared error ('' = prediction)
      weighting="none",          # none | likelihood | edm | min_snr
      reduce="mean",             # mean | sum over data dimensions
      t_sampling="process",      # process | lognormal (EDM) | discrete (NCSN) | logit_normal (SD3;
                                 # a config may add logit_mean, logit_std: default 0, 1)
      objective="denoising",     # denoising | consistency: consistency training (Song et al. 2023; Song & Dhariwal
                                 # 2024), a few-step consistency model learnt from data alone, no teacher
                                 # (losses.make_consistency_training_loss). It reads prediction, reduce, and
                                 # weighting: none | inverse_gap (iCT: 1 / the interval's noise gap),
                                 # t_sampling: process (intervals uniform) | lognormal (iCT; a config may add
                                 # p_mean, p_std: default -1.1, 2.0), and the four keys below
      scales=(10, 1280),         # consistency: the grid's intervals, s0 doubling to s1 over training ((N, N): fixed)
      metric="pseudo_huber",     # consistency: l2 | pseudo_huber | lpips (config.lpips)
      sigma_data=0.5,            # consistency: c_skip's data standard deviation (images in [-1, 1]: 0.5)
      target_decay=0.0,          # consistency: EMA rate of the target network (0: the student without gradient)
      # model.name='autoencoder': mean reconstruction error + perceptual_weight * LPIPS
      # + kl_weight * KL(q(z|x) || N(0, I)) / pixels (+ the adversarial term with disc_weight > 0)
      reconstruction="l1",       # l1 | l2 (the per-pixel error)
      kl_weight=1e-6,            # LDM's KL-f8 autoencoders: 1e-6
      perceptual_weight=0.0,     # LPIPS(x, reconstruction) (config.lpips; resolution 0: the images' size); LDM: 1.0
      disc_weight=0.0,           # > 0: a patch discriminator (hinge loss), its term weighted adaptively (LDM: 0.5)
      disc_start=0,              # the update from which the discriminator trains and its term counts (LDM: 50001)
      disc_features=64,          # its first width (pix2pix, LDM: 64)
      disc_layers=3,             # its stride-2 convolutions (LDM: 3; 2 for 28x28 images)
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
      steps_per_call=1,          # train steps per compiled call (one lax.scan over that many
                                 # batches): on CPU the step's temporary buffers are mapped once
                                 # per call, not per step (small U-Net, 4: 1.68 -> 1.49 s/step)
      microbatches=1,            # gradient of each step over this many equal parts of the batch,
                                 # one part at a time: the same update with 1/m of the activation
                                 # memory (train.microbatched_value_and_grad)
      transfer_guard="allow",    # jax.transfer_guard around the loop: allow | log | disallow
      label_dropout=0.1,         # class-conditional models: P(label -> null label) per example, for
                                 # classifier-free guidance (0: conditional only)
      init_from="",              # a fresh run starts from published weights: 'score_sde:<checkpoint>',
                                 # 'score_sde_pytorch:<npz>', 'diffusers:<dir>' or another run's
                                 # 'jaxdiff:<workdir>[@<step>]' (jaxdiff.models.pretrained);
                                 # with num_steps=0 the run only imports them (a step-0 checkpoint)
  ))

  # A method reads only its own options (defaults = the method's; see samplers.METHODS).
  c.sampling = ml_collections.ConfigDict(dict(
      method="ddim",             # see jaxdiff.samplers.METHODS
      num_steps=100,             # grid points (ignored by `ode`)
      eta=0.0,                   # ddim; pc with predictor='ddim'
      batch_size=64,
      denoise=True,
      clip_denoised=True,        # clip x0_hat to the data range (images only)
      # pc: predictor + Langevin corrector
      predictor="reverse_diffusion",  # ancestral | ddim | euler_maruyama | reverse_diffusion | euler
      snr=0.16,
      n_corrector_steps=1,
      # ald: annealed Langevin dynamics (VE / EDM)
      n_steps_each=100,
      step_lr=2e-5,              # NCSN's eps; keep step_lr / sigma_min^2 ~ 0.1-0.2
      # heun: Karras et al. Algorithm 2
      s_churn=0.0,
      s_tmin=0.0,
      s_tmax=float("inf"),
      s_noise=1.0,
      rho=7.0,                   # default grid: rho-spaced in sigma / alpha
      # dpm_solver++
      order=2,                   # 1 | 2 | 3
      grid="logsnr",             # logsnr | time
      # ode: adaptive probability-flow ODE (diffrax)
      rtol=1e-5,
      atol=1e-5,
      solver="tsit5",            # tsit5 | dopri5
      max_steps=4096,
      # classifier-free guidance (class-conditional models; jaxdiff.guidance)
      guidance_scale=0.0,        # w: cond + w (cond - uncond); 0 = conditional sampling only
      guidance_interval=(0.0, float("inf")),  # apply w only where sigma/alpha is in [lo, hi]
      guidance_rescale=0.0,      # Lin et al.'s rescale phi in [0, 1] (0 = off)
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.compilation_cache_dir = ""   # persistent XLA cache ('' = off)
  c.cache_executables = True     # with a cache dir: also save the compiled train step (jaxdiff.aot)
  c.checkpoint_dir = ""          # orbax checkpoints, e.g. gs://bucket/run ('' = <workdir>/checkpoints)
  return c


def model_section(name: str, **overrides) -> ml_collections.ConfigDict:
  """A whole `config.model` section for network `name`: every field of its class, with defaults.

  For configs that use another network than the base section's U-Net, e.g.
  `c.model = model_section("ncsnpp", ch=128, dtype="auto")`; each key can then be overridden
  from the command line (`--config.model.fir=False`). Fields without a value (None) are left
  out; jaxdiff fills them in (`out_channels`).
  """
  import dataclasses

  import numpy as np

  from jaxdiff import models

  cls = models.MODELS.get(name)
  if cls is None:
    raise ConfigError(f"model_section: name={name!r} is not known; valid names: {', '.join(models.MODELS)}.")
  section = dict(name=name)
  for f in dataclasses.fields(cls):
    if not f.init or f.name in ("parent", "name") or f.default is dataclasses.MISSING or f.default is None:
      continue
    value = f.default
    if f.name in ("dtype", "param_dtype"):
      value = np.dtype(value).name
    section[f.name] = tuple(value) if isinstance(value, list) else value
  unknown = sorted(set(overrides) - set(section) - {"out_channels"})
  if unknown:
    raise ConfigError(f"model_section({name!r}): {unknown} are not fields of {cls.__name__}; valid: "
                      f"{', '.join(sorted(section))}.")
  section.update(overrides)
  return ml_collections.ConfigDict(section)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that depend on each other; raises ConfigError naming the key and the fix."""
  t = config.training
  init_from = str(t.get("init_from", "") or "")
  for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
              "steps_per_call", "microbatches"):
    if key == "num_steps" and init_from and int(t[key]) == 0:
      continue  # an import: the step-0 checkpoint of the published weights
    if int(t[key]) < 1:
      raise ConfigError(f"config.training.{key}={t[key]} must be >= 1" + (
          " (0 only with config.training.init_from, to import published weights)." if key == "num_steps" else "."))
  if init_from:
    from jaxdiff.models import pretrained

    pretrained.validate_init_from(init_from, config.model.name, config.loss.get("prediction", "eps"))
  if not 0.0 <= float(t.ema_decay) < 1.0:
    raise ConfigError(f"config.training.ema_decay={t.ema_decay} must be in [0, 1).")
  d, m = config.data, config.model
  _validate_data(d)
  _validate_autoencoder(config)
  res = _validate_latent(config)  # the side of what the network sees: pixels or latents
  what = "config.data.resolution" if res == d.resolution else f"the latent side {res} (config.latent)"
  if m.name in ("unet", "ncsnpp") and d.dataset != "gmm2d":
    levels = len(m.ch_mult)
    div = 2 ** (levels - 1)
    if res % div:
      raise ConfigError(
          f"{what}={res} cannot pass through the U-Net's {levels} levels "
          f"(config.model.ch_mult={tuple(m.ch_mult)}), which halve it {levels - 1} times; use a "
          f"multiple of {div} or fewer levels.")
    sizes = {res // 2**i for i in range(levels)}
    missing = [r for r in m.attn_resolutions if r not in sizes]
    if missing:
      raise ConfigError(f"config.model.attn_resolutions={tuple(m.attn_resolutions)} includes {missing}, "
                        f"which no U-Net level has (feature-map sizes: {sorted(sizes, reverse=True)}).")
  if m.name == "ncsnpp" and m.get("embedding_type") == "fourier" and config.process.name != "ve":
    raise ConfigError(f"config.model.embedding_type='fourier' embeds log(noise level), which needs the VE "
                      f"process (its network input is sigma > 0); config.process.name="
                      f"{config.process.name!r} gives another input: use config.model.embedding_type="
                      f"'positional' (DDPM++).")
  if m.name == "dit":
    if d.dataset == "gmm2d":
      raise ConfigError("config.model.name='dit' takes images, but config.data.dataset='gmm2d' is 2-D vector "
                        "data; use model.name='mlp'.")
    if res % m.patch_size:
      raise ConfigError(f"{what}={res} is not a multiple of config.model.patch_size={m.patch_size}; use a "
                        f"patch size that divides it (MNIST's 28: 2, 4 or 7).")
  if m.name == "mlp" and d.dataset != "gmm2d":
    raise ConfigError(f"config.model.name='mlp' takes vector data, but config.data.dataset={d.dataset!r} "
                      f"is an image dataset; use model.name='unet'.")
  _validate_labels(config)
  _validate_superres(config)
  _validate_guidance(config.sampling)
  _validate_consistency_training(config)
  from jaxdiff import distill

  distill.validate(config)
  _validate_lpips(config)


def _validate_lpips(config: ml_collections.ConfigDict) -> None:
  """An LPIPS consistency loss or perceptual term: the weights given, pixel images it can read."""
  from jaxdiff import train  # train imports this module

  key = train.lpips_key(config)
  if not key:
    return
  perceptual = key == "config.loss.perceptual_weight"
  what = f"{key}={config.loss.perceptual_weight}" if perceptual else f"{key}='lpips'"
  instead = f"set --{key}=0" if perceptual else f"use {key}=pseudo_huber"
  weights, res = str(config.lpips.weights or ""), int(config.lpips.resolution)
  if not weights.strip(" ,"):
    raise ConfigError(f"{what} needs the LPIPS weights: set --config.lpips.weights=vgg16-397923af.pth,vgg.pth "
                      f"(torchvision's VGG-16, https://download.pytorch.org/models/vgg16-397923af.pth, and the lpips "
                      f"package's lpips/weights/v0.1/vgg.pth), or {instead}.")
  if config.data.dataset == "gmm2d" or str(config.latent.autoencoder or ""):
    kind = "vectors" if config.data.dataset == "gmm2d" else "latents (config.latent.autoencoder)"
    raise ConfigError(f"{what} compares images through VGG-16, but this model's outputs are {kind}; {instead}.")
  if res < 0 or (res == 0 and config.data.resolution < 16) or 0 < res < 16:
    raise ConfigError(f"config.lpips.resolution={res} with {config.data.resolution}x{config.data.resolution} images: "
                      f"VGG-16 pools four times, so LPIPS needs a side >= 16; use 224 (consistency models) or 0 "
                      f"(the images' own size, as LDM's autoencoders) for images of at least 16.")


OBJECTIVES = ("denoising", "consistency")


def _validate_consistency_training(config: ml_collections.ConfigDict) -> None:
  """`config.loss.objective='consistency'`: a diffusion network, no teacher, the consistency sampler."""
  objective = config.loss.get("objective", "denoising")
  if objective not in OBJECTIVES:
    raise ConfigError(f"config.loss.objective={objective!r} is not known; valid values are: {', '.join(OBJECTIVES)}.")
  if objective == "denoising":
    return
  m = config.model.name
  if m in ("classifier", "autoencoder"):
    raise ConfigError(f"config.loss.objective='consistency' trains a consistency model, but config.model.name={m!r}; "
                      f"set --config.loss.objective=denoising.")
  teacher = str(config.get("distill", {}).get("teacher", "") or "")
  if teacher:
    raise ConfigError(f"config.loss.objective='consistency' (consistency training) learns from data, but "
                      f"config.distill.teacher={teacher!r} distils a teacher: set --config.distill.teacher='' or, to "
                      f"distil it, --config.loss.objective=denoising --config.distill.method=consistency.")
  if not 0.0 <= float(config.loss.target_decay) < 1.0:
    raise ConfigError(f"config.loss.target_decay={config.loss.target_decay} must be in [0, 1) (the target network's "
                      f"EMA rate; 0: the student itself, without gradient, as Song & Dhariwal 2024).")
  from jaxdiff import processes
  from jaxdiff import train  # train imports this module

  train.make_loss(config, processes.get_process(**config.process.to_dict()))  # the loss's own keys
  check_consistency_sampler(config.sampling, "config.loss.objective='consistency'")


def check_consistency_sampler(s: ml_collections.ConfigDict, where: str) -> None:
  """A consistency model's run (trained or distilled: `where` says which key makes it one) must
  sample with the `consistency` sampler, ending on its jump to x0."""
  if s.method != "consistency" or not bool(s.denoise):
    raise ConfigError(f"{where}: a consistency model samples with its own multistep sampler, which config.sampling "
                      f"must name (it samples the run); it has method={s.method!r}, denoise={bool(s.denoise)}. Set "
                      f"--config.sampling.method=consistency --config.sampling.denoise=True "
                      f"--config.sampling.num_steps=1 (or 2: the network evaluations).")


def _validate_autoencoder(config: ml_collections.ConfigDict) -> None:
  """`model.name='autoencoder'` (latent diffusion's VAE): centred, unlabelled images it can code;
  its perceptual and adversarial terms on another model are an error, not ignored."""
  from jaxdiff.data import catalog

  d, m = config.data, config.model
  if m.name != "autoencoder":
    for key in ("perceptual_weight", "disc_weight"):
      if float(config.loss.get(key, 0.0)):
        raise ConfigError(f"config.loss.{key}={config.loss[key]} is a term of the autoencoder's loss, but "
                          f"config.model.name={m.name!r}; set --config.loss.{key}=0 (consistency models "
                          f"take LPIPS as config.loss.metric='lpips').")
    return
  if not catalog.lookup(d.dataset).is_image:
    raise ConfigError(f"config.model.name='autoencoder' codes images, but config.data.dataset={d.dataset!r} is "
                      f"vector data; use an image dataset.")
  f = 2 ** (len(m.block_out_channels) - 1)
  if d.resolution % f:
    raise ConfigError(f"config.data.resolution={d.resolution} is not a multiple of the autoencoder's downsampling "
                      f"factor {f} (config.model.block_out_channels={tuple(m.block_out_channels)}: "
                      f"{len(m.block_out_channels)} levels); use a multiple of {f} or fewer levels.")
  for key in ("in_channels", "out_channels"):
    if int(m[key]) != int(d.num_channels):
      raise ConfigError(f"config.model.{key}={m[key]} but config.data.num_channels={d.num_channels}; set "
                        f"--config.model.{key}={d.num_channels}.")
  if not d.centered:
    raise ConfigError("config.model.name='autoencoder' codes images in [-1, 1] (as latent diffusion and the SD VAE "
                      "do); set --config.data.centered=True.")
  if d.use_labels or int(d.get("cond_resolution", 0)):
    raise ConfigError("config.model.name='autoencoder' is trained on images alone; set "
                      "--config.data.use_labels=False and --config.data.cond_resolution=0.")
  loss = config.loss
  for key in ("disc_weight", "disc_start"):
    if not float(loss.get(key, 0)) >= 0:
      raise ConfigError(f"config.loss.{key}={loss[key]} must be >= 0 (LDM: disc_weight 0.5, disc_start 50001; "
                        f"disc_weight 0: no discriminator).")
  if float(loss.get("disc_weight", 0.0)):
    from jaxdiff.models.discriminator import patch_grid

    layers = int(loss.disc_layers)
    if layers >= 1 and patch_grid(d.resolution, layers) < 1:
      fit = max(n for n in range(1, 8) if patch_grid(d.resolution, n) >= 1) if d.resolution >= 6 else 0
      raise ConfigError(f"config.loss.disc_layers={layers} halves {d.resolution}x{d.resolution} images too often "
                        f"for the patch discriminator (it needs a side of at least {3 * 2 ** layers}); use "
                        f"--config.loss.disc_layers={fit}." if fit else f"config.data.resolution={d.resolution} "
                        f"is too small for a patch discriminator (at least 6); set --config.loss.disc_weight=0.")


def _validate_latent(config: ml_collections.ConfigDict) -> int:
  """Latent diffusion (`config.latent.autoencoder`): returns the side of the network's input."""
  d, m = config.data, config.model
  spec = str(config.latent.autoencoder or "")
  if not spec:
    return int(d.resolution)
  from jaxdiff import latent
  from jaxdiff.data import catalog

  latent.parse_source(spec)
  if m.name not in ("unet", "ncsnpp", "dit"):
    raise ConfigError(f"{latent.KEY}={spec!r} trains a diffusion model in the autoencoder's latents, but "
                      f"config.model.name={m.name!r}; use 'unet', 'ncsnpp' or 'dit' (or set {latent.KEY}='').")
  if not catalog.lookup(d.dataset).is_image:
    raise ConfigError(f"{latent.KEY}={spec!r} encodes images, but config.data.dataset={d.dataset!r} is vector "
                      f"data; set {latent.KEY}=''.")
  if not d.centered:
    raise ConfigError(f"{latent.KEY}={spec!r}: autoencoders code images in [-1, 1]; set "
                      f"--config.data.centered=True.")
  if int(d.get("cond_resolution", 0)):
    raise ConfigError(f"{latent.KEY}={spec!r} with config.data.cond_resolution={d.cond_resolution}: "
                      f"super-resolution in latent space is not supported; set one of them to ''/0.")
  space = latent.latent_space((int(d.resolution), int(d.resolution), int(d.num_channels)), **config.latent.to_dict())
  return space.shape[0]


def _validate_labels(config: ml_collections.ConfigDict) -> None:
  """Class-conditional models and classifiers need labels, as many as the dataset has."""
  from jaxdiff.data import catalog

  d, m = config.data, config.model
  n = int(m.get("num_classes", 0))
  p = float(config.training.get("label_dropout", 0.0))
  if not 0.0 <= p < 1.0:
    raise ConfigError(f"config.training.label_dropout={p} must be in [0, 1) (0.1 = Ho & Salimans).")
  if n < 0:
    raise ConfigError(f"config.model.num_classes={n} must be >= 0 (0 = unconditional).")
  what = "a classifier" if m.name == "classifier" else "a class-conditional model"
  if m.name == "classifier":
    if n < 2:
      raise ConfigError(f"config.model.name='classifier' needs config.model.num_classes >= 2 (got {n}); "
                        f"set it to the dataset's number of classes.")
    t_sampling = config.loss.get("t_sampling", "process")
    if t_sampling not in ("process", "clean"):
      raise ConfigError(f"config.loss.t_sampling={t_sampling!r} is not known for a classifier; use 'process' "
                        f"(noisy x_t, for guidance) or 'clean' (x at t_min).")
  if n == 0:
    return
  if not d.use_labels:
    raise ConfigError(f"config.model.num_classes={n} makes {what}, which needs labels; set "
                      f"--config.data.use_labels=True (or num_classes=0 for an unconditional model).")
  info = catalog.lookup(d.dataset)
  if info.num_classes > 0 and info.num_classes != n:
    raise ConfigError(f"config.model.num_classes={n} but {d.dataset!r} has {info.num_classes} classes; "
                      f"set --config.model.num_classes={info.num_classes}.")


def _validate_superres(config: ml_collections.ConfigDict) -> None:
  """Low-resolution conditioning: an image U-Net, a side that divides the resolution."""
  d, m = config.data, config.model
  r = int(d.get("cond_resolution", 0))
  if not r:
    return
  if r < 0 or r >= d.resolution or d.resolution % r:
    sides = [s for s in range(1, d.resolution) if d.resolution % s == 0]
    raise ConfigError(f"config.data.cond_resolution={r} must be a side smaller than config.data.resolution="
                      f"{d.resolution} that divides it (area downsampling); use one of {sides}.")
  if m.name not in ("unet", "ncsnpp", "dit") or d.dataset == "gmm2d":
    raise ConfigError(f"config.data.cond_resolution={r} (super-resolution) needs image data and "
                      f"config.model.name='unet', 'ncsnpp' or 'dit' (got {m.name!r} on {d.dataset!r}); "
                      f"set cond_resolution=0.")
  if int(m.get("num_classes", 0)):
    raise ConfigError(f"config.data.cond_resolution={r} with config.model.num_classes={m.num_classes}: a "
                      f"class-conditional super-resolution model is not supported; set one of them to 0.")


def _validate_guidance(s: ml_collections.ConfigDict) -> None:
  from jaxdiff import guidance
  from jaxdiff.errors import InputError

  try:
    guidance.check_guidance(float(s.get("guidance_scale", 0.0)), tuple(s.get("guidance_interval", (0.0, 1.0))),
                            float(s.get("guidance_rescale", 0.0)))
  except InputError as e:
    raise ConfigError(f"config.sampling.{e}") from None


def _validate_data(d: ml_collections.ConfigDict) -> None:
  """Checks of `config.data` alone, against what is known about the dataset (no file is read)."""
  from jaxdiff.data import catalog  # light: no grain / TFDS import

  info = catalog.lookup(d.dataset)  # DataError listing the known datasets
  for key in ("num_threads", "num_workers", "prefetch_buffer_size", "prefetch_to_device", "crop_size"):
    if int(d[key]) < 0:
      raise ConfigError(f"config.data.{key}={d[key]} must be >= 0.")
  if info.kind == "folder" and not d.data_dir:
    raise ConfigError("config.data.dataset='folder' reads images from config.data.data_dir, which is empty; "
                      "set --config.data.data_dir=/path/to/images.")
  if info.splits and catalog.base_split(d.split) not in info.splits:
    raise ConfigError(f"config.data.split={d.split!r} is not a split of {d.dataset!r}; its splits are "
                      f"{', '.join(info.splits)}.")
  if d.use_labels and not info.has_labels:
    raise ConfigError(f"config.data.use_labels=True but {d.dataset!r} has no labels; "
                      f"set --config.data.use_labels=False.")
  if not info.is_image:
    return
  if d.num_channels not in (1, 3):
    raise ConfigError(f"config.data.num_channels={d.num_channels} is not supported; use 1 (grey) or 3 (RGB).")
  if info.channels is not None and info.channels != d.num_channels:
    raise ConfigError(f"config.data.num_channels={d.num_channels} but {d.dataset!r} images have "
                      f"{info.channels}; set --config.data.num_channels={info.channels}.")
  if int(d.resolution) < 1:
    raise ConfigError(f"config.data.resolution={d.resolution} must be >= 1.")
  side = info.min_side
  if side is not None and d.crop_size > side:
    raise ConfigError(f"config.data.crop_size={d.crop_size} is larger than the {d.dataset!r} images "
                      f"({info.shape[0]}x{info.shape[1]}); use at most {side} (0 = the shorter side).")
  source = d.crop_size or side
  if source is not None and d.resolution > source:
    what = f"config.data.crop_size={d.crop_size}" if d.crop_size else f"the {d.dataset!r} images ({side} px)"
    raise ConfigError(f"config.data.resolution={d.resolution} is larger than {what}, so every image would be "
                      f"upsampled; use resolution <= {source} (and a config.model.ch_mult it divides), "
                      f"or a larger dataset variant.")
