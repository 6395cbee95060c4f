"""Frechet Inception Distance of a run's samples: the library side of `run_sample.py --mode fid`.

  python run_sample.py --workdir runs/cifar10 --mode fid --num_samples 50000 --sampler ddim --steps 100 \\
      --inception pt_inception-2015-12-05-6726825d.pth [--fid_ref stats.npz]

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the Inception-v3
pool features of the samples and of the data (`jaxdiff.models.inception`: pytorch-fid's network
and weights, read without torch). The samples are drawn as `--mode sample` draws them
(`generate.generate`, which also writes them to `<workdir>/samples`) and quantized to uint8
as saved; the data are the training split's (`config.data.split`, the convention of the DDPM
and score_sde papers; `num_ref` caps it) read undequantized, so both are 8-bit images seen
the same way. The Inception Score (Salimans et al. 2016) of the same samples comes with it,
from the same network's class logits (`inception.inception_score`, 10 splits, the bias-free
logits of the original code). The data's statistics are written to
`<out_dir>/fid_stats_<dataset>_<split>_<n>.npz` (`mu`, `sigma`: pytorch-fid's format); pass
that file (or pytorch-fid's own precomputed statistics) as `ref` to skip the data next time.
Every step that touches devices is one jitted, batch-sharded call over the mesh, on one host
or many.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import sharding
from jaxdiff.errors import InputError
from jaxdiff.models import inception

log = logging.getLogger(__name__)


def load_inception(path: str, mesh) -> Any:
  """pytorch-fid's Inception weights (`inception.load_fid_inception`), replicated over `mesh`."""
  params = inception.load_fid_inception(path)
  return sharding.put_host_tree(params, jax.tree.map(lambda _: sharding.replicated(mesh), params))


@functools.lru_cache(maxsize=8)
def make_feature_fn(mesh):
  """Jitted `fn(params, images) -> (features [B, 2048], logits [B, 1008])` for uint8 images
  `[B, H, W, C]` sharded over the batch."""
  out = sharding.batch_sharding(mesh, 2)
  return jax.jit(lambda p, x: inception.features_and_logits(p, x.astype(jnp.float32) / 255.0),
                 out_shardings=(out, out))


def image_features(params: Any, images: np.ndarray, mesh, *, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """(FID features `[N, 2048]`, class logits `[N, 1008]`) of uint8 `images` `[N, H, W, C]` that
  every process holds."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise InputError(f"image_features takes uint8 images [N, H, W, C]; got {images.dtype} {images.shape}.")
  bs = sharding.round_up_batch(min(batch_size, len(images)), mesh)
  fn, feats, logits = make_feature_fn(mesh), [], []
  for start in range(0, len(images), bs):
    chunk = images[start:start + bs]
    padded = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], np.uint8)])
    f, z = fn(params, sharding.put_host_tree(padded, sharding.batch_sharding(mesh, 4)))
    feats.append(sharding.to_host(f)[:len(chunk)])
    logits.append(sharding.to_host(z)[:len(chunk)])
  return np.concatenate(feats), np.concatenate(logits)


def dataset_features(config: ml_collections.ConfigDict, exp, params: Any, mesh, *, split: str | None = None,
                     num_examples: int | None = None, batch_size: int = 100) -> np.ndarray:
  """FID features of the first `num_examples` (None: all) images of `split` (default
  `config.data.split`), read as 8-bit pixels (`evaluate.data_batches`)."""
  from jaxdiff import evaluate

  n, bs, n_batches, batches = evaluate.data_batches(config, exp, mesh, split=split or config.data.split,
                                                    num_examples=num_examples, batch_size=batch_size)
  fn, out, t0 = make_feature_fn(mesh), [], time.time()
  for b, arrays in enumerate(batches):
    feats, valid = sharding.to_host(fn(params, arrays["x"])[0]), sharding.to_host(arrays["valid"])
    out.append(feats[valid])
    if b in (0, n_batches - 1) or b % 50 == 0:
      log.info("FID reference features: %d/%d images (%.1fs).", sum(map(len, out)), n, time.time() - t0)
  return np.concatenate(out)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of features `[N, d]` in float64 (N >= 2)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise InputError(f"FID statistics need features [N, d] with N >= 2; got shape {f.shape}.")
  return f.mean(0), np.cov(f, rowvar=False)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, **meta) -> str:
  """Writes `mu`, `sigma` (pytorch-fid's keys) and `meta` to `path` atomically; returns the path."""
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
  os.replace(tmp, path)
  return path


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an .npz with those keys (this module's, or pytorch-fid's precomputed ones)."""
  if not os.path.isfile(path):
    raise InputError(f"--fid_ref={path!r} is not a file; give an .npz with 'mu' and 'sigma' (written by a "
                     f"previous --mode fid run as fid_stats_*.npz, or pytorch-fid's), or leave it out to "
                     f"compute the data's statistics.")
  with np.load(path) as f:
    if "mu" not in f or "sigma" not in f:
      raise InputError(f"--fid_ref={path!r} has keys {sorted(f.keys())}; it needs 'mu' and 'sigma'.")
    mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  if mu.shape != (inception.FEATURES,) or sigma.shape != (inception.FEATURES,) * 2:
    raise InputError(f"--fid_ref={path!r} holds statistics of shapes {mu.shape} and {sigma.shape}, not of "
                     f"{inception.FEATURES}-D Inception pool features.")
  return mu, sigma


def evaluate_fid(config: ml_collections.ConfigDict, workdir: str, *, inception_path: str, ref: str | None = None,
                 split: str | None = None, num_ref: int | None = None, num_samples: int = 10_000,
                 feature_batch: int = 100, out_dir: str | None = None, **sample_kw) -> dict[str, Any]:
  """FID of `num_samples` samples of the run in `workdir` against the data (or `ref` statistics).

  Args:
    config: the run's config.
    inception_path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an .npz of it).
    ref: an .npz of the data's `mu` and `sigma`; None: computed from `split` (default
      `config.data.split`), its first `num_ref` images (None: all), and written to out_dir.
    num_samples: samples to draw (50,000 in the papers; FID is biased upwards at small N).
    feature_batch: images per Inception call (global, over all devices).
    out_dir: where the JSON and the statistics go (default `<workdir>/eval`).
    **sample_kw: `generate.generate`'s sampling arguments (step, method, num_steps, seed,
      batch_size, options, labels, guidance_scale, classifier_workdir, classifier_scale).

  Returns:
    The summary written to `<out_dir>/fid_<method>_<nfe>nfe_step<step>_seed<seed>.json`: `fid`,
    the Inception Score of the same samples (`inception_score`, `inception_score_std` over
    `is_splits` = 10 parts, `inception.inception_score`), the sampler, NFE, sample count, the
    reference (file or split and count) and timings.
  """
  from jaxdiff import evaluate, generate, train, viz

  exp = train.build_experiment(config)
  if not exp.data_spec.is_image:
    raise InputError(f"--mode=fid scores images, but {workdir!r} models {config.data.dataset!r} vectors; use "
                     f"--mode=likelihood for it.")
  generate.check_draws_samples(exp, workdir)  # before any data are read
  if num_samples < 2:
    raise InputError(f"--num_samples={num_samples} must be >= 2 for FID (50000 in the papers).")
  mesh = sharding.create_mesh(config.mesh.to_dict())
  out_dir = out_dir or os.path.join(workdir, "eval")
  params = load_inception(inception_path, mesh)
  t0, split = time.time(), split or config.data.split
  if ref:
    mu_ref, sigma_ref = load_statistics(ref)
    ref_info = {"ref": ref}
  else:
    feats = dataset_features(config, exp, params, mesh, split=split, num_examples=num_ref, batch_size=feature_batch)
    mu_ref, sigma_ref = statistics(feats)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"fid_stats_{config.data.dataset}_{split}")
    path = os.path.join(out_dir, f"{name}_{len(feats)}.npz")
    if sharding.is_main_process():
      os.makedirs(out_dir, exist_ok=True)
      save_statistics(path, mu_ref, sigma_ref, dataset=config.data.dataset, split=split,
                      n=len(feats))
    ref_info = {"ref": path, "ref_split": split, "ref_n": int(len(feats))}
    log.info("Wrote the data's FID statistics to %s (%d images); pass --fid_ref=%s to reuse them.", path,
             len(feats), path)
  ref_s = time.time() - t0

  if num_samples < inception.FEATURES:
    log.warning("FID of %d samples: fewer than the %d features, so their covariance is singular and the value "
                "is far above the 50000-sample FID papers report; compare only values of equal sample counts.",
                num_samples, inception.FEATURES)
  drawn = generate.generate(config, workdir, num_samples=num_samples, keep_samples=True, **sample_kw)
  t1 = time.time()
  images = viz.to_uint8(drawn.pop("samples"), exp.centered)
  feats, logits = image_features(params, images, mesh, batch_size=feature_batch)
  mu, sigma = statistics(feats)
  value = evaluate.frechet_distance_from_statistics(mu, sigma, mu_ref, sigma_ref)
  splits = min(10, num_samples)
  is_mean, is_std = inception.inception_score(logits, splits)
  result = {"fid": value, "inception_score": is_mean, "inception_score_std": is_std, "is_splits": splits,
            "num_samples": num_samples, "method": drawn["method"], "nfe": drawn["nfe"],
            "checkpoint_step": drawn["checkpoint_step"], "guidance_scale": drawn["guidance_scale"],
            "classifier_scale": drawn["classifier_scale"], "seed": int(sample_kw.get("seed", 0)),
            "samples": drawn["paths"].get("npz"), **ref_info, "inception": os.path.abspath(inception_path),
            "ref_s": ref_s, "sample_s": drawn["wall_s"], "features_s": time.time() - t1}
  path = evaluate.write_result(os.path.join(out_dir, f"fid_{drawn['method']}_{drawn['nfe']}nfe_step"
                                                    f"{drawn['checkpoint_step']}_seed{result['seed']}.json"), result)
  result["path"] = path
  log.info("Wrote %s: FID %.3f, Inception Score %.2f +- %.2f, of %d samples (%s, %d NFE, step %d) against %s.",
           path, value, is_mean, is_std, num_samples, drawn["method"], drawn["nfe"], drawn["checkpoint_step"],
           result["ref"])
  return result
