"""Likelihood evaluation of a trained run: the library side of `run_sample.py --mode=likelihood`.

* `restore_ema_params(config, workdir, exp, mesh)` restores the EMA parameters of a
  checkpoint into the mesh's shardings (the path `generate` takes too);
* `make_likelihood_fn(exp, ...)` is a jitted `fn(params, key, x) -> (bpd, stderr, nfe, ok)`
  for one batch: the probability-flow ODE (`likelihood.bits_per_dim`) or the DDPM bound
  (`likelihood.vlb_bits_per_dim`);
* `evaluate_likelihood(config, workdir, ...)` runs it over the evaluation split, batched
  and sharded over the devices, logs progress (examples done, running mean bits/dim with
  its standard error, ETA) and writes `<workdir>/eval/likelihood_<method>_step<step>.json`.

Image datasets are read with `uniform_dequantization=False`, which gives `k / 255` (or
`2 k / 255 - 1`), and turned back into the integer pixels k exactly; the likelihood
functions then dequantize (ODE) or discretize (VLB) themselves. Vector data (`gmm2d`) is
evaluated as it is, in nats converted to bits per dimension without any offset.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import files
from jaxdiff import likelihood
from jaxdiff import parameterization
from jaxdiff import processes
from jaxdiff import sharding
from jaxdiff.errors import CheckpointError, ConfigError, DataError, InputError, check_choice

log = logging.getLogger(__name__)

METHODS = ("ode", "vlb")


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str, exp, mesh, *,
                       step: int | None = None) -> tuple[int, Any]:
  """Restores `(step, ema_params)` from the run's checkpoints (default: the latest step).

  The checkpoints are in `config.checkpoint_dir`, or `<workdir>/checkpoints` when it is empty.

  The parameters come back in the shardings `train.abstract_train_state` gives on `mesh`. Only
  they are read (`Checkpointer.restore_fields`): not the parameters, optimizer state or teacher.
  """
  from jaxdiff import checkpoint as ckpt_lib
  from jaxdiff import train

  optimizer = train.make_optimizer(**config.optimizer.to_dict(), num_steps=config.training.num_steps)
  _, abstract, _ = train.abstract_train_state(config, exp, optimizer, mesh)
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(config, workdir), async_save=False)
  try:
    step, fields = ckpt.restore_fields(abstract, ("ema_params",), step=step)
  finally:
    ckpt.close()
  return step, fields["ema_params"]


def split_run(ref: str) -> tuple[str, int | None]:
  """'<workdir>' -> (workdir, None: its latest checkpoint); '<workdir>@<step>' -> (workdir, step)."""
  workdir, sep, step = str(ref).rpartition("@")
  if sep and workdir and step.isdigit():
    return workdir, int(step)
  return str(ref), None


def load_run_params(ref: str, mesh, abstract_params: Any, *, key: str, value: str | None = None,
                    check: Callable[[ml_collections.ConfigDict], None] | None = None) -> tuple[int, Any]:
  """`(step, params)`: the EMA parameters of the jaxdiff run `ref` names (`'<workdir>'`: its latest
  checkpoint, `'<workdir>@<step>'`: that one), for another run's network (`abstract_params`: its
  shapes, dtypes and shardings), cast to those dtypes and placed in those shardings.
  `check(run_config)` vets the run's config first; `key` is the config key that named the run,
  and its `value` (default: `ref`), for the errors (a teacher, an init)."""
  from jaxdiff import generate
  from jaxdiff import train

  where = f"{key}={ref if value is None else value!r}"
  workdir, want = split_run(ref)
  run_config = generate.load_config(workdir)  # CheckpointError naming the workdir if it has no run
  if check is not None:
    check(run_config)
  try:
    step, params = restore_ema_params(run_config, workdir, train.build_experiment(run_config), mesh, step=want)
  except CheckpointError as e:  # no such step (the error lists the run's steps), or not this run's network
    raise CheckpointError(f"{where}: {e}") from None
  same = jax.tree.structure(params) == jax.tree.structure(abstract_params) and all(
      a.shape == s.shape for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(abstract_params)))
  if not same:
    raise ConfigError(f"{where}: that run's parameters do not fit this run's network (config.model); "
                      f"start from its config file.")
  cast = jax.jit(lambda p: jax.tree.map(lambda a, s: a.astype(s.dtype), p, abstract_params),
                 out_shardings=jax.tree.map(lambda s: s.sharding, abstract_params))
  return step, cast(params)


def make_likelihood_fn(exp, *, method: str = "ode", n_repeats: int = 1, rtol: float = 1e-5,
                       atol: float = 1e-5, divergence: str = "hutchinson_rademacher", n_probes: int = 1,
                       solver: str = "tsit5", max_steps: int = 4096, vlb_timesteps: int | None = None,
                       vlb_variance: str = "fixed_small", clip_denoised: bool = False) -> Callable:
  """A jitted `fn(params, key, x) -> (bpd [B], stderr [B], nfe, success)` for one batch.

  `x` holds integer pixels `[B, H, W, C]` for image data (see `likelihood.bits_per_dim`)
  and float vectors otherwise; `nfe` is the mean number of network evaluations per example
  (vector-field evaluations for the ODE, timesteps + 1 for the bound).
  """
  from jaxdiff.train import network_fn  # train imports generate, which may import this module

  check_choice("method", method, METHODS)
  if exp.consistency_sigma_data is not None:
    raise InputError("this run is a consistency model (config.distill.method='consistency' or config.loss.objective="
                     "'consistency'): it maps noise to data in one jump and has no score or probability-flow ODE to "
                     "integrate, so it has no likelihood; evaluate a diffusion model (a distilled one's teacher, "
                     "config.distill.teacher) instead.")
  if method == "vlb" and not isinstance(exp.process, processes.DDPM):
    raise InputError(f"method='vlb' (--likelihood_method=vlb) is the bound of a discrete-time DDPM, but this "
                     f"model uses the {type(exp.process).__name__} process; use method='ode'.")
  if method == "vlb" and n_repeats != 1:
    raise InputError(f"n_repeats={n_repeats} counts dequantization draws of method='ode'; the bound has "
                     f"none: use n_repeats=1 and raise vlb_timesteps (or leave it None for all terms).")
  process, is_image, centered = exp.process, exp.data_spec.is_image, exp.centered
  ode = dict(divergence=divergence, rtol=rtol, atol=atol, n_probes=n_probes, solver=solver,
             max_steps=max_steps)
  vlb = dict(num_sampled_steps=vlb_timesteps, variance=vlb_variance, clip_denoised=clip_denoised)

  # The likelihood ODE takes forward-mode Jacobian products (fastest inside its loop), which
  # the U-Net's hand-written-VJP layers cannot give: the same network with JAX's derivatives.
  model = exp.model.clone(custom_vjp=False) if getattr(exp.model, "custom_vjp", False) else exp.model

  def fn(params, key, x):
    score_fn = parameterization.score_fn_from_network(network_fn(model, params), process, exp.prediction)
    per_dim = math.prod(x.shape[1:]) * likelihood.LN2
    if method == "ode" and is_image:
      bpd, se, info = likelihood.bits_per_dim(key, process, score_fn, x, centered=centered,
                                              n_repeats=n_repeats, **ode)
      return bpd, se, jnp.mean(info["nfe"].astype(jnp.float32)), info["success"]
    if method == "ode":
      def draw(k):
        logp, info = likelihood.log_likelihood(k, process, score_fn, x, **ode)
        return -logp / per_dim, info["nfe"], info["success"]

      bpd, nfe, ok = jax.lax.map(draw, jax.random.split(key, n_repeats))
      se = (jnp.std(bpd, axis=0, ddof=1) / math.sqrt(n_repeats) if n_repeats > 1
            else jnp.full(bpd.shape[1:], jnp.nan))
      return jnp.mean(bpd, axis=0), se, jnp.mean(nfe.astype(jnp.float32)), jnp.all(ok)
    if is_image:
      bpd, se, info = likelihood.vlb_bits_per_dim(key, process, score_fn, x, centered=centered, **vlb)
    else:
      nats, se, info = likelihood.ddpm_vlb(key, process, score_fn, x, decoder="gaussian", **vlb)
      bpd, se = nats / per_dim, se / per_dim
    return bpd, se, info["nfe"].astype(jnp.float32), jnp.asarray(True)

  return jax.jit(fn)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The Frechet distance between Gaussians fitted to two feature sets `[N, d]`, `[M, d]`.

  `|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)`, FID's formula (Heusel et
  al. 2017) for any features (FID proper uses Inception-v3's pool features; on MNIST a
  classifier's penultimate features are the usual stand-in). Computed in float64 with
  symmetric eigendecompositions, so it is exact for PSD covariances and never complex.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise InputError(f"frechet_distance needs two feature sets [N, d] and [M, d] with N, M >= 2; got "
                     f"{a.shape} and {b.shape}.")
  return frechet_distance_from_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_from_statistics(mu_a: np.ndarray, c_a: np.ndarray, mu_b: np.ndarray, c_b: np.ndarray) -> float:
  """`frechet_distance` from the two Gaussians' means and covariances (float64)."""
  mu_a, c_a, mu_b, c_b = (np.asarray(v, np.float64) for v in (mu_a, c_a, mu_b, c_b))

  def sqrt_psd(c):
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

  s = sqrt_psd(c_a)
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(s @ c_b @ s), 0.0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(c_a) + np.trace(c_b) - 2.0 * cross)


def pixels_from_scaled(x: np.ndarray, centered: bool) -> np.ndarray:
  """Inverts the data pipeline's `k / 255` (or `2 k / 255 - 1`) scaling: uint8 pixels k."""
  y = (np.asarray(x, np.float64) + 1.0) * 127.5 if centered else np.asarray(x, np.float64) * 255.0
  k = np.rint(y)
  off = float(np.max(np.abs(y - k))) if y.size else 0.0
  if off > 1e-3 or (y.size and (k.min() < 0 or k.max() > 255)):
    raise DataError(f"evaluation images are not 8-bit levels k/255 (off by up to {off:.3g} levels, range "
                    f"[{k.min():g}, {k.max():g}]); bits/dim needs the undequantized pixels, so the data "
                    f"must be read with uniform_dequantization=False and config.data.centered="
                    f"{centered} as in training.")
  return k.astype(np.uint8)


def write_result(path: str, result: dict[str, Any]) -> str:
  """Writes an evaluation's summary as JSON, from the main process only, atomically (a reader never
  sees half of it); returns `path`."""
  if sharding.is_main_process():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    files.write_json(path, result)
  return path


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _mean_stderr(v: np.ndarray) -> tuple[float, float]:
  if v.size == 0:
    return float("nan"), float("nan")
  se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
  return float(np.mean(v)), se


def data_batches(config: ml_collections.ConfigDict, exp, mesh, *, split: str, num_examples: int | None,
                 batch_size: int, seed: int = 0) -> tuple[int, int, int, Iterator[dict[str, jax.Array]]]:
  """The first `num_examples` (None: all) of `split` of `config.data`, unshuffled and unflipped,
  as global batches `{"x", "valid"}` sharded over `mesh` (each host reads its round-robin share).

  Images come as their uint8 pixels k (read undequantized, `pixels_from_scaled`), vectors as
  they are; the last batch is padded, `valid` marks the real rows. Returns `(n, global batch
  size, number of batches, iterator)`.
  """
  from jaxdiff import data as data_lib

  d = config.data
  total = data_lib.dataset_size(d.dataset, split, d.data_dir or None, d.num_examples)
  n = min(num_examples, total) if num_examples else total
  bs = sharding.round_up_batch(min(batch_size, n), mesh)
  sharding.check_batch_size(bs, mesh, name="batch_size")
  host, hosts = sharding.process_shard()
  local_bs = sharding.local_batch_size(bs)
  mine = len(range(host, n, hosts))  # the first n examples of the split, dealt round-robin to hosts
  n_batches = int(math.ceil(math.ceil(n / hosts) / local_bs))
  example_shape = tuple(exp.data_spec.shape)
  dtype = np.uint8 if exp.data_spec.is_image else np.float32

  def batches():
    data_iter = data_lib.create_dataset(
        dataset=d.dataset, split=split, batch_size=local_bs, resolution=d.resolution,
        num_channels=d.num_channels, data_dir=d.data_dir or None, centered=d.centered, random_flip=False,
        uniform_dequantization=False, use_labels=False, crop_size=d.crop_size, num_examples=d.num_examples,
        seed=seed, shard_index=host, shard_count=hosts, num_epochs=1, shuffle=False, drop_remainder=False,
        num_threads=d.num_threads, num_workers=0)
    done = 0
    for _ in range(n_batches):
      x = np.zeros((local_bs,) + example_shape, dtype)
      take = min(local_bs, mine - done)
      if take > 0:
        batch = next(data_iter)["x"][:take]
        if batch.shape[1:] != example_shape:
          raise DataError(f"dataset {d.dataset!r} gives examples of shape {batch.shape[1:]}, but the model "
                          f"expects {example_shape}; evaluate with the config the run was trained with.")
        x[:len(batch)] = pixels_from_scaled(batch, exp.centered) if exp.data_spec.is_image else batch
        take = len(batch)
      done += max(take, 0)
      yield sharding.global_batch({"x": x, "valid": np.arange(local_bs) < max(take, 0)}, mesh)

  return n, bs, n_batches, batches()


def evaluate_likelihood(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
                        split: str | None = None, num_examples: int | None = None,
                        batch_size: int | None = None, method: str = "ode", seed: int = 0,
                        n_repeats: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                        divergence: str = "hutchinson_rademacher", n_probes: int = 1,
                        solver: str = "tsit5", max_steps: int = 4096, vlb_timesteps: int | None = None,
                        vlb_variance: str = "fixed_small", clip_denoised: bool | None = None,
                        out_dir: str | None = None) -> dict[str, Any]:
  """Bits/dim of the EMA model of `workdir` on the evaluation split; writes a JSON summary.

  Args:
    config: the run's config (`generate.load_config(workdir)`).
    workdir: the training run directory.
    step: checkpoint step (default: the latest).
    split: dataset split (default: `config.data.eval_split`).
    num_examples: evaluate the first `num_examples` of the split (default: all of it).
    batch_size: global batch (default: `config.training.batch_size`), rounded up to a
      multiple of the devices; the last partial batch is padded and the padding dropped.
    method: "ode" (probability-flow ODE, any process) or "vlb" (DDPM bound).
    seed: the dequantization / probe / timestep randomness.
    n_repeats: dequantization draws per image averaged (ODE only).
    rtol, atol, divergence, n_probes, solver, max_steps: the ODE's options
      (`likelihood.log_likelihood`).
    vlb_timesteps: None for all N - 1 KL terms, or K sampled timesteps per image.
    vlb_variance: "fixed_small" or "fixed_large".
    clip_denoised: clip x0_hat to the data range in the bound (default:
      `config.sampling.clip_denoised` for images); the ODE never clips.
    out_dir: where the JSON goes (default: `<workdir>/eval`).

  Returns:
    The summary written: `bpd` (mean over examples), `stderr` (its standard error over
    examples), `n`, `nfe_mean`, `wall_s`, `checkpoint_step`, the options, and `path`.
  """
  from jaxdiff import train

  check_choice("method", method, METHODS)
  for name, value in (("num_examples", num_examples), ("batch_size", batch_size)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise InputError(f"{name}={value!r} must be a positive integer (or None for the default).")
  exp = train.build_experiment(config)
  if exp.is_classifier or exp.is_autoencoder or exp.latent is not None:
    what = ("a latent diffusion model: its bits/dim would be of the latents, not of the images "
            f"(config.latent.autoencoder={exp.latent.source!r})" if exp.latent is not None else
            f"a {'classifier' if exp.is_classifier else 'autoencoder'}, which has no likelihood")
    raise InputError(f"--mode=likelihood evaluates a pixel-space diffusion model, but {workdir!r} holds {what}.")
  mesh = sharding.create_mesh(config.mesh.to_dict())
  d = config.data
  split = split or d.eval_split
  if clip_denoised is None:
    clip_denoised = bool(config.sampling.clip_denoised) and exp.data_spec.is_image
  fn = make_likelihood_fn(exp, method=method, n_repeats=n_repeats, rtol=rtol, atol=atol,
                          divergence=divergence, n_probes=n_probes, solver=solver, max_steps=max_steps,
                          vlb_timesteps=vlb_timesteps, vlb_variance=vlb_variance,
                          clip_denoised=clip_denoised)
  step, params = restore_ema_params(config, workdir, exp, mesh, step=step)

  n, bs, n_batches, batches = data_batches(config, exp, mesh, split=split, num_examples=num_examples,
                                           batch_size=batch_size or config.training.batch_size, seed=seed)
  key = jax.random.key(seed)
  what = f"{method}" + (f", {divergence}, rtol={rtol:g}, atol={atol:g}" if method == "ode" else
                        f", {vlb_timesteps or 'all'} timesteps, {vlb_variance}")
  log.info("Evaluating bits/dim (%s) of %s step %d on %d examples of %s/%s in %d batches of %d.",
           what, workdir, step, n, d.dataset, split, n_batches, bs)
  values, nfes = [], []
  t0 = t_log = time.time()
  for b, arrays in enumerate(batches):
    bpd, _, nfe, ok = fn(params, jax.random.fold_in(key, b), arrays["x"])
    if not bool(ok):
      raise InputError(f"the likelihood ODE did not converge on batch {b} within max_steps={max_steps} at "
                       f"rtol={rtol:g}, atol={atol:g}; loosen --rtol/--atol (e.g. 1e-3) or raise max_steps.")
    bpd, mask = sharding.to_host(bpd), sharding.to_host(arrays["valid"])
    values.append(bpd[mask])
    nfes.append(float(nfe))
    now = time.time()
    if now - t_log > 10.0 or b in (0, n_batches - 1):
      t_log = now
      seen = np.concatenate(values)
      mean, se = _mean_stderr(seen)
      rate = seen.size / max(now - t0, 1e-9)
      log.info("likelihood %s: %d/%d examples | %.4f +- %.4f bits/dim | %.0f NFE | %.2f examples/s | ETA %s",
               method, seen.size, n, mean, se, nfes[-1], rate, _fmt_time((n - seen.size) / max(rate, 1e-9)))
  wall = time.time() - t0
  values = np.concatenate(values) if values else np.zeros((0,), np.float32)
  if values.size != n:
    raise DataError(f"split {split!r} of {d.dataset!r} gave {values.size} examples, expected {n}.")
  if not np.all(np.isfinite(values)):
    raise InputError(f"{int(np.sum(~np.isfinite(values)))} of {n} examples got a non-finite bits/dim; "
                     f"the model or its checkpoint (step {step}) produces NaN/inf scores.")
  mean, se = _mean_stderr(values)
  result = {
      "method": method, "bpd": mean, "stderr": se, "n": int(n), "nfe_mean": float(np.mean(nfes)),
      "wall_s": wall, "examples_per_s": n / wall, "checkpoint_step": int(step), "dataset": d.dataset,
      "split": split, "process": type(exp.process).__name__, "batch_size": bs, "seed": seed,
      "data_scale": ("[-1, 1]" if exp.centered else "[0, 1]") if exp.data_spec.is_image else "continuous",
  }
  if method == "ode":
    result.update(rtol=rtol, atol=atol, divergence=divergence, n_probes=n_probes, n_repeats=n_repeats,
                  solver=solver, max_steps=max_steps)
  else:
    result.update(vlb_timesteps=vlb_timesteps, vlb_variance=vlb_variance, clip_denoised=clip_denoised)
  path = write_result(os.path.join(out_dir or os.path.join(workdir, "eval"), f"likelihood_{method}_step{step}.json"),
                      result)
  result["path"] = path
  log.info("Wrote %s: %.4f +- %.4f bits/dim (%s) over %d examples, %.0f NFE/batch, %.1fs.",
           path, mean, se, method, n, result["nfe_mean"], wall)
  return result
