"""Latent diffusion (Rombach et al. 2022): the diffusion model runs in a frozen autoencoder's latents.

`config.latent` names the autoencoder:

  autoencoder       ''                    pixel space (no autoencoder)
                    'diffusers:<dir>'     a diffusers `AutoencoderKL` (e.g. stabilityai/sd-vae-ft-ema,
                                          or a pipeline's `vae/`; `convert_diffusers.load_diffusers_vae`)
                    'jaxdiff:<workdir>'   a run of `config.model.name='autoencoder'` (e.g.
                                          configs/mnist_autoencoder.py): its EMA parameters, and the
                                          latent statistics its training measured (`STATS_FILE`)
  scaling_factor    0: the autoencoder's (diffusers' config; a jaxdiff run's 1 / std of its latents)
  sample_posterior  True: train on z ~ q(z|x) (LDM); False: on the posterior mean

The data pipeline, its checkpointed position and the train step are those of a pixel-space
run: the training loop encodes each batch on the devices (`make_encoder`) just before the
step. The network, the process and the samplers see latents of `LatentSpace.shape`;
samples are decoded (`make_decoder`) before they are written. The autoencoder's
parameters are read once per run and passed to the jitted functions as arguments (never
baked into a program as constants).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import files
from jaxdiff import sharding
from jaxdiff.errors import CheckpointError, ConfigError, InputError, split_source
from jaxdiff.models import autoencoder as ae_lib

Array = jax.Array
KEY = "config.latent.autoencoder"
SOURCES = ("diffusers", "jaxdiff")
# Written under an autoencoder run's workdir at each of its sample points and at its end.
STATS_FILE = "latent_stats.json"
# fold_in tag of the posterior-sample key, off the train key ("late")
POSTERIOR_STREAM = 0x6C617465


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """A frozen autoencoder (with the latents' scaling and shift) and the images it codes."""

  autoencoder: ae_lib.AutoencoderKL
  source: str  # config.latent.autoencoder
  image_shape: tuple[int, int, int]
  sample_posterior: bool = True

  @property
  def shape(self) -> tuple[int, int, int]:
    """[h, w, latent_channels]: what the diffusion model sees."""
    f = self.autoencoder.downsampling_factor
    return (self.image_shape[0] // f, self.image_shape[1] // f, self.autoencoder.latent_channels)

  def encode(self, params: Any, x: Array, key: Array | None = None) -> Array:
    """Images [B, H, W, C] in [-1, 1] -> scaled latents; a posterior sample with `key`, else its mean."""
    return ae_lib.encode_latents(self.autoencoder, params, x, key if self.sample_posterior else None)

  def decode(self, params: Any, z: Array) -> Array:
    """Scaled latents -> images [B, H, W, C] in about [-1, 1]."""
    return ae_lib.decode_latents(self.autoencoder, params, z)


def parse_source(spec: str) -> tuple[str, str]:
  """'<source>:<path>' -> (source, path); a ConfigError naming the valid forms otherwise."""
  return split_source(KEY, spec, SOURCES, "use 'diffusers:<AutoencoderKL dir>' (e.g. stabilityai/sd-vae-ft-ema), "
                      "'jaxdiff:<workdir>' (a run of config.model.name='autoencoder', e.g. "
                      "configs/mnist_autoencoder.py), or '' for pixel space")


def read_stats(workdir: str) -> dict[str, Any] | None:
  """The latent statistics an autoencoder run wrote (`STATS_FILE`), or None."""
  return files.read_json(os.path.join(workdir, STATS_FILE))


def write_stats(workdir: str, stats: dict[str, Any]) -> str:
  """Writes `STATS_FILE` atomically (a reader never sees half of it); returns its path."""
  return files.write_json(os.path.join(workdir, STATS_FILE), stats)


def _jaxdiff_autoencoder(workdir: str):
  """(module kwargs, run config) of a jaxdiff autoencoder run."""
  from jaxdiff import generate

  try:
    config = generate.load_config(workdir)
  except CheckpointError as e:
    raise ConfigError(f"{KEY}='jaxdiff:{workdir}': {e}") from None
  if config.model.name != "autoencoder":
    raise ConfigError(f"{KEY}='jaxdiff:{workdir}' is a run of config.model.name={config.model.name!r}, not an "
                      f"autoencoder; train one with configs/mnist_autoencoder.py (or model.name='autoencoder').")
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return kwargs, config


def latent_space(image_shape: tuple[int, ...], *, autoencoder: str = "", scaling_factor: float = 0.0,
                 sample_posterior: bool = True) -> LatentSpace | None:
  """The autoencoder `config.latent` names, for images of `image_shape` (None: pixel space).

  `latent_space(data_shape, **config.latent)`; the arguments are that section's keys (see
  the module docstring). Reads only configs and statistics (the weights are read by
  `load_params`). ConfigError naming the key for an unknown source, a missing run or
  directory, or an autoencoder that does not take these images.
  """
  from jaxdiff import models
  from jaxdiff.models import convert_diffusers

  spec = str(autoencoder or "")
  if not spec:
    return None
  source, path = parse_source(spec)
  if len(image_shape) != 3:
    raise ConfigError(f"{KEY}={spec!r} encodes images, but the data are vectors of shape {tuple(image_shape)}; "
                      f"set {KEY}='' for this dataset.")
  if source == "diffusers":
    try:
      kwargs = convert_diffusers.read_diffusers_vae_kwargs(path)
    except InputError as e:
      raise ConfigError(f"{KEY}={spec!r}: {e}") from None
  else:
    kwargs, _ = _jaxdiff_autoencoder(path)
    stats = read_stats(path)
    if stats is None and not float(scaling_factor):
      raise ConfigError(f"{KEY}={spec!r}: the run has no {STATS_FILE} (its latents' statistics, written when "
                        f"its training ends); finish training it, or set --config.latent.scaling_factor.")
    if stats is not None:
      kwargs.update(scaling_factor=float(stats["scaling_factor"]), shift_factor=float(stats["shift_factor"]))
  scale = float(scaling_factor)
  if scale < 0 or not np.isfinite(scale):
    raise ConfigError(f"config.latent.scaling_factor={scale} must be > 0 (or 0: the autoencoder's own).")
  if scale:
    kwargs["scaling_factor"] = scale
  vae = models.create_model("autoencoder", **kwargs)
  h, w, c = image_shape
  if c != vae.in_channels or c != vae.out_channels:
    raise ConfigError(f"{KEY}={spec!r} codes images of {vae.in_channels} channel(s) (out: {vae.out_channels}), but "
                      f"config.data.num_channels={c}; use an autoencoder of the data's channels.")
  f = vae.downsampling_factor
  if h % f or w % f:
    raise ConfigError(f"config.data.resolution={h} is not a multiple of the autoencoder's downsampling factor {f} "
                      f"({KEY}={spec!r}); use a resolution divisible by {f}.")
  return LatentSpace(autoencoder=vae, source=spec, image_shape=(h, w, c),
                     sample_posterior=bool(sample_posterior))


def load_params(space: LatentSpace, mesh) -> Any:
  """The autoencoder's parameters on `mesh`: a diffusers checkpoint's (replicated) or a run's EMA ones."""
  from jaxdiff import evaluate
  from jaxdiff import train
  from jaxdiff.models import convert_diffusers

  source, path = parse_source(space.source)
  if source == "diffusers":
    _, host = convert_diffusers.load_diffusers_vae(path)  # checked against its config.json
    host = jax.tree.map(lambda a: np.asarray(a, space.autoencoder.param_dtype), host)
    return sharding.replicate(host, mesh)
  _, config = _jaxdiff_autoencoder(path)
  exp = train.build_experiment(config)
  _, params = evaluate.restore_ema_params(config, path, exp, mesh)
  return params


def make_encoder(space: LatentSpace, mesh):
  """Jitted `encode(params, xs, key, step) -> latents`: a tuple of image batches, encoded.

  Batch i of the tuple draws its posterior sample with `fold_in(fold_in(key, POSTERIOR_STREAM),
  step + i)`, so a run's latents do not depend on `config.training.steps_per_call`.
  """
  def encode(params, xs, key, step):
    key = jax.random.fold_in(key, POSTERIOR_STREAM)
    return tuple(space.encode(params, x, jax.random.fold_in(key, step + i)) for i, x in enumerate(xs))

  return jax.jit(encode, out_shardings=sharding.batch_sharding(mesh, 1 + len(space.shape)))


def make_decoder(space: LatentSpace, mesh):
  """Jitted `decode(params, z) -> images`, sharded over the mesh's data axes."""
  return jax.jit(space.decode, out_shardings=sharding.batch_sharding(mesh, 1 + len(space.image_shape)))


def sample_decoder(space: LatentSpace | None, mesh, params: Any = None) -> Callable[[Array], Array]:
  """`x -> images` for a sampler's output: `make_decoder` with the parameters bound (read with
  `load_params` unless given); the identity in pixel space (`space` None)."""
  if space is None:
    return lambda x: x
  return functools.partial(make_decoder(space, mesh), load_params(space, mesh) if params is None else params)


def measure_statistics(model: ae_lib.AutoencoderKL, params: Any, x: Array, key: Array) -> dict[str, Array]:
  """The reconstruction of `x` (from the posterior mean) and the mean and std of posterior samples.

  `scaling_factor = 1 / std` and `shift_factor = mean` make a latent diffusion model's
  inputs zero-mean and unit-variance (LDM's `scale_by_std`, measured on one batch).
  """
  mean, logvar = model.apply({"params": params}, x, method=ae_lib.AutoencoderKL.encode)
  z = ae_lib.sample_posterior(mean, logvar, key)
  recon = model.apply({"params": params}, mean, method=ae_lib.AutoencoderKL.decode)
  return {"reconstruction": recon, "latent_mean": jnp.mean(z), "latent_std": jnp.std(z)}
