"""Sampling from a trained model: the library side of run_sample.py.

* `make_sampler(exp, config, batch_size=..., mesh=...)` -> a jitted `fn(params, key) -> x`
  running the whole sampler (one `lax.scan`) with its output sharded over the mesh;
* `generate(config, workdir, ...)` restores the EMA parameters of a checkpoint, draws
  `num_samples` in batches and writes `samples.png` and `samples.npz`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import parameterization
from jaxdiff import samplers
from jaxdiff import sharding
from jaxdiff import viz
from jaxdiff.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

# run_sample.py's `--sampler` names; `ddpm` is the ancestral sampler.
ALIASES = {"ddpm": "ancestral"}


def resolve_method(name: str) -> str:
  return ALIASES.get(name, name)


def sampler_options(config: ml_collections.ConfigDict, method: str, overrides: dict | None = None) -> dict:
  """The method's options: its defaults, then `config.sampling.<option>`, then `overrides`."""
  if method not in samplers.METHODS:
    raise InputError(f"sampler={method!r} is not known; valid samplers: "
                     f"{', '.join(sorted(set(samplers.METHODS) | set(ALIASES)))}.")
  valid = samplers.METHODS[method].options
  opts = {k: config.sampling[k] for k in valid if k in config.sampling}
  for k, v in (overrides or {}).items():
    if k not in valid:
      raise InputError(f"sampler option {k!r} is not known for {method!r}; its options are: "
                       f"{', '.join(sorted(valid)) or '(none)'}.")
    opts[k] = v
  return opts


def make_sampler(exp, config: ml_collections.ConfigDict, *, batch_size: int, mesh,
                 method: str | None = None, num_steps: int | None = None, options: dict | None = None,
                 denoise: bool | None = None):
  """A jitted `sample_fn(params, key) -> x [batch_size, ...]` for the experiment `exp`."""
  from jaxdiff.train import network_fn  # train imports this module

  method = resolve_method(method or config.sampling.method)
  opts = sampler_options(config, method, options)
  num_steps = int(num_steps or config.sampling.num_steps)
  denoise = config.sampling.denoise if denoise is None else denoise
  sharding.check_batch_size(batch_size, mesh, name="sampling batch size")
  shape = (batch_size,) + tuple(exp.data_spec.shape)

  clip = bool(config.sampling.clip_denoised) and exp.data_spec.is_image

  def sample_fn(params, key):
    score_fn = parameterization.score_fn_from_network(
        network_fn(exp.model, params), exp.process, exp.prediction)
    if clip:
      score_fn = parameterization.clip_denoised(score_fn, exp.process, -1.0 if exp.centered else 0.0, 1.0)
    x, info = samplers.sample(key, exp.process, score_fn, shape, method=method, num_steps=num_steps,
                              denoise=denoise, **opts)
    return x, jnp.asarray(info["nfe"], jnp.int32)

  return jax.jit(sample_fn, out_shardings=(sharding.batch_sharding(mesh, len(shape)),
                                           sharding.replicated(mesh)))


def save_samples(x: np.ndarray, exp, prefix: str, write_npz: bool = True, max_grid: int = 256) -> dict[str, str]:
  """Writes `<prefix>.png` (a grid, or a scatter for 2-D points) and optionally `<prefix>.npz`."""
  paths = {}
  if exp.data_spec.is_image:
    imgs = viz.to_uint8(x, exp.centered)
    paths["png"] = viz.save_image_grid(imgs[:max_grid], prefix + ".png")
    if write_npz:
      np.savez_compressed(prefix + ".npz", images=imgs)
      paths["npz"] = prefix + ".npz"
  else:
    from jaxdiff.data import synthetic

    ref, _ = synthetic.gmm2d().sample(2000, seed=123)
    paths["png"] = viz.save_scatter(x, prefix + ".png", reference=ref)
    if write_npz:
      np.savez_compressed(prefix + ".npz", x=np.asarray(x, np.float32))
      paths["npz"] = prefix + ".npz"
  return paths


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`), on top of today's defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist: --workdir={workdir!r} holds no training run "
                          f"(train first, or pass --config for the run).")
  from jaxdiff import configs as config_lib

  with open(path) as f:
    saved = json.load(f)
  config = config_lib.base_config()
  for key, value in saved.items():
    if isinstance(value, dict) and key in config and key != "process":  # process keys depend on its name
      merged = config[key].to_dict()
      merged.update(value)
      value = merged
    config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return config


def generate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
             method: str | None = None, num_steps: int | None = None, num_samples: int = 64,
             seed: int = 0, batch_size: int | None = None, options: dict | None = None,
             out_dir: str | None = None) -> dict[str, Any]:
  """Restores the EMA parameters of `workdir`'s checkpoint and writes samples.

  Returns a dict with the paths written, the NFE per sample, wall time and images/s.
  """
  from jaxdiff import evaluate
  from jaxdiff import train

  exp = train.build_experiment(config)
  mesh = sharding.create_mesh(config.mesh.to_dict())
  step, params = evaluate.restore_ema_params(config, workdir, exp, mesh, step=step)

  if num_samples < 1:
    raise InputError(f"--num_samples={num_samples} must be >= 1.")
  n_shards = sharding.num_data_shards(mesh)
  batch_size = batch_size or min(config.sampling.batch_size, num_samples)
  batch_size = int(math.ceil(batch_size / n_shards) * n_shards)
  fn = make_sampler(exp, config, batch_size=batch_size, mesh=mesh, method=method,
                    num_steps=num_steps, options=options)
  method = resolve_method(method or config.sampling.method)

  key = jax.random.key(seed)
  n_batches = int(math.ceil(num_samples / batch_size))
  out, t0 = [], time.time()
  for b in range(n_batches):
    x, nfe = fn(params, jax.random.fold_in(key, b))
    out.append(sharding.to_host(x))
    nfe = int(nfe)
    done = min((b + 1) * batch_size, num_samples)
    el = time.time() - t0
    log.info("sampled %d/%d (%s, %d NFE) in %.1fs", done, num_samples, method, nfe, el)
  wall = time.time() - t0
  x = np.concatenate(out)[:num_samples]
  out_dir = out_dir or os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  prefix = os.path.join(out_dir, f"{method}_{nfe}nfe_step{step}_seed{seed}")
  paths = save_samples(x, exp, prefix) if sharding.is_main_process() else {}
  result = {"paths": paths, "nfe": nfe, "method": method, "checkpoint_step": step,
            "num_samples": num_samples, "wall_s": wall, "samples_per_s": num_samples / wall}
  log.info("Wrote %s: %d samples, %s, %d NFE, %.1fs (%.2f samples/s, compile included).",
               paths.get("png"), num_samples, method, nfe, wall, num_samples / wall)
  return result
