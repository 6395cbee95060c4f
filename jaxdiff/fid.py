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
logits of the original code); `metrics` adds KID (`kernel_inception_distance`) and improved
precision, recall, density and coverage (`precision_recall`). The data's statistics are written to
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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import sharding
from jaxdiff.errors import InputError
from jaxdiff.models import inception

log = logging.getLogger(__name__)

METRICS = ("kid", "prdc")  # evaluate_fid's optional metrics, besides FID and the Inception Score
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's and clean-fid's


def load_inception(path: str, mesh) -> Any:
  """pytorch-fid's Inception weights (`inception.load_fid_inception`), replicated over `mesh`."""
  params = inception.load_fid_inception(path)
  return sharding.replicate(params, mesh)


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


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared Euclidean distances `[len(a), len(b)]` (float32 products at full precision: no TF32)."""
  ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * ab, 0.0)


def _row_blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """`x` `[n, d]` zero-padded to `[ceil(n / block), block, d]` and its validity mask."""
  n = x.shape[0]
  pad = -n % block
  valid = jnp.arange(n + pad) < n
  return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1]), valid.reshape(-1, block)


def _kth_neighbour_sq(x: jax.Array, ks: tuple[int, ...], block: int) -> jax.Array:
  """Squared distances `[len(ks), n]` from each row of `x` to its k-th nearest other row, for each k
  in `ks` (a duplicate row counts, at distance 0)."""
  queries, _ = _row_blocks(x, block)
  # a row's k + 1 smallest distances include its own, 0
  out = jax.lax.map(lambda q: -jax.lax.top_k(-_sq_dists(q, x), max(ks) + 1)[0][:, jnp.array(ks)], queries)
  return out.reshape(-1, len(ks))[:x.shape[0]].T


@functools.partial(jax.jit, static_argnames=("k", "dc_k", "block"))
def _prdc(real: jax.Array, fake: jax.Array, k: int, dc_k: int, block: int) -> dict[str, jax.Array]:
  center = jnp.mean(real, 0)  # distances do not move; smaller norms, less cancellation in _sq_dists
  real, fake = real - center, fake - center
  radius_real, radius_real_dc = _kth_neighbour_sq(real, (k, dc_k), block)
  fakes, valid = _row_blocks(fake, block)
  radii = jnp.pad(_kth_neighbour_sq(fake, (k,), block)[0], (0, valid.size - fake.shape[0])).reshape(valid.shape)

  def body(carry, xs):
    recalled, nearest = carry
    f, ok, r = xs
    d2 = _sq_dists(f, real)  # [block, N]
    in_manifold = jnp.any(d2 <= radius_real[None, :], 1) & ok  # fake j inside some real ball
    counts = jnp.sum(d2 <= radius_real_dc[None, :], 1) * ok  # real balls (dc_k) holding fake j
    recalled = recalled | jnp.any((d2 <= r[:, None]) & ok[:, None], 0)  # real i inside some fake ball
    nearest = jnp.minimum(nearest, jnp.min(jnp.where(ok[:, None], d2, jnp.inf), 0))
    return (recalled, nearest), (in_manifold, counts)

  init = (jnp.zeros(real.shape[0], bool), jnp.full(real.shape[0], jnp.inf, real.dtype))
  (recalled, nearest), (in_manifold, counts) = jax.lax.scan(body, init, (fakes, valid, radii))
  return {"precision": jnp.sum(in_manifold), "recall": jnp.sum(recalled), "density": jnp.sum(counts),
          "coverage": jnp.sum(nearest <= radius_real_dc)}  # counts; divided on the host


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3, dc_k: int = 5,
                     block: int = 1024) -> dict[str, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al.
  2020) of `fake` features `[M, d]` against `real` ones `[N, d]`.

  A point's ball reaches its k-th nearest neighbour in its own set. precision: the fraction of
  fakes inside some real ball; recall: the fraction of reals inside some fake ball (k = 3,
  Kynkaanniemi et al.'s and the ADM evaluator's). density: the fakes' mean count of real balls
  holding them, over dc_k (about 1 when the distributions match, above 1 where fakes crowd
  into dense regions); coverage: the fraction of real balls holding a fake (dc_k = 5, Naeem et
  al.'s). One jitted call on the default device, `block` rows at a time ([block, N] distances
  in memory); the work is three distance products, N x N, M x M and M x N, each of d.
  """
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise InputError(f"precision_recall takes features [N, d] and [M, d]; got {real.shape} and {fake.shape}.")
  for name, v in (("k", k), ("dc_k", dc_k)):
    if not 1 <= v < min(len(real), len(fake)):
      raise InputError(f"precision_recall's {name}={v} must be >= 1 and below both set sizes ({len(real)} real, "
                       f"{len(fake)} fake): each ball reaches the {name}-th nearest other point.")
  out = _prdc(jnp.asarray(real), jnp.asarray(fake), k=k, dc_k=dc_k, block=min(block, max(len(real), len(fake))))
  n, m = len(real), len(fake)
  return {"precision": int(out["precision"]) / m, "recall": int(out["recall"]) / n,
          "density": int(out["density"]) / (dc_k * m), "coverage": int(out["coverage"]) / n}


@jax.jit
def _mmd_row_sums(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  d = x.shape[1]
  kernel = lambda a, b: (jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST) / d + 1.0) ** 3
  kxx, kyy = kernel(x, x), kernel(y, y)
  return (jnp.sum(kxx, 1) - jnp.diagonal(kxx), jnp.sum(kyy, 1) - jnp.diagonal(kyy), jnp.sum(kernel(x, y), 1))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018): the unbiased MMD^2 between `real` and `fake` features under the
  kernel `(x . y / d + 1)^3`, averaged over `subsets` random subsets of `min(subset_size, N, M)`
  points of each (drawn without replacement); returns (mean, std over subsets), the
  convention of torch-fidelity and clean-fid (100 subsets of 1000). Unlike FID it has no bias
  at small sample counts: its expectation is the population MMD^2 (0 for equal distributions).
  """
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise InputError(f"kernel_inception_distance takes features [N, d] and [M, d]; got {real.shape} and "
                     f"{fake.shape}.")
  m = min(subset_size, len(real), len(fake))
  if m < 2 or subsets < 1:
    raise InputError(f"kernel_inception_distance needs subsets >= 1 of >= 2 points; got subsets={subsets}, "
                     f"subset_size={subset_size} with {len(real)} real and {len(fake)} fake features.")
  rng, values = np.random.default_rng(seed), []
  for _ in range(subsets):
    x = real[rng.choice(len(real), m, replace=False)]
    y = fake[rng.choice(len(fake), m, replace=False)]
    sxx, syy, sxy = (np.sum(np.asarray(v, np.float64)) for v in _mmd_row_sums(x, y))
    values.append((sxx + syy) / (m * (m - 1)) - 2.0 * sxy / (m * m))
  return float(np.mean(values)), float(np.std(values))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, **meta) -> str:
  """Writes `mu`, `sigma` (pytorch-fid's keys) and `meta` to `path` atomically; returns the path."""
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
  os.replace(tmp, path)
  return path


def load_statistics(path: str, *, features: bool = False):
  """(mu, sigma) from an .npz with those keys (this module's, or pytorch-fid's precomputed ones);
  with `features`, (mu, sigma, features `[N, 2048]`), for which the file must hold `features`
  (this module writes them when KID or precision/recall are asked for)."""
  if not os.path.isfile(path):
    raise InputError(f"--fid_ref={path!r} is not a file; give an .npz with 'mu' and 'sigma' (written by a "
                     f"previous --mode fid run as fid_stats_*.npz, or pytorch-fid's), or leave it out to "
                     f"compute the data's statistics.")
  with np.load(path) as f:
    if "mu" not in f or "sigma" not in f:
      raise InputError(f"--fid_ref={path!r} has keys {sorted(f.keys())}; it needs 'mu' and 'sigma'.")
    mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    if features and "features" not in f:
      raise InputError(f"--fid_ref={path!r} holds only the data's mean and covariance; KID and precision/recall "
                       f"need its features: leave --fid_ref out once with --fid_metrics set, and the run saves "
                       f"them (fid_stats_*_feats.npz) for later runs.")
    feats = np.asarray(f["features"], np.float32) if features else None
  if features and (feats.ndim != 2 or feats.shape[1] != inception.FEATURES):
    raise InputError(f"--fid_ref={path!r} holds features of shape {feats.shape}, not [N, {inception.FEATURES}].")
  if mu.shape != (inception.FEATURES,) or sigma.shape != (inception.FEATURES,) * 2:
    raise InputError(f"--fid_ref={path!r} holds statistics of shapes {mu.shape} and {sigma.shape}, not of "
                     f"{inception.FEATURES}-D Inception pool features.")
  return (mu, sigma, feats) if features else (mu, sigma)


def evaluate_fid(config: ml_collections.ConfigDict, workdir: str, *, inception_path: str, ref: str | None = None,
                 split: str | None = None, num_ref: int | None = None, num_samples: int = 10_000,
                 feature_batch: int = 100, metrics: Sequence[str] = (), out_dir: str | None = None,
                 **sample_kw) -> dict[str, Any]:
  """FID of `num_samples` samples of the run in `workdir` against the data (or `ref` statistics).

  Args:
    config: the run's config.
    inception_path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an .npz of it).
    ref: an .npz of the data's `mu` and `sigma`; None: computed from `split` (default
      `config.data.split`), its first `num_ref` images (None: all), and written to out_dir.
    num_samples: samples to draw (50,000 in the papers; FID is biased upwards at small N).
    feature_batch: images per Inception call (global, over all devices).
    metrics: more metrics of the same features (METRICS): "kid" (`kernel_inception_distance`),
      "prdc" (`precision_recall`: precision, recall, density, coverage). They need the data's
      features, not only their statistics: the file written then is `..._feats.npz` and holds
      them, and a `ref` must be such a file.
    out_dir: where the JSON and the statistics go (default `<workdir>/eval`).
    **sample_kw: `generate.generate`'s sampling arguments (step, method, num_steps, seed,
      batch_size, options, labels, guidance_scale, classifier_workdir, classifier_scale).

  Returns:
    The summary written to `<out_dir>/fid_<method>_<nfe>nfe_step<step>_seed<seed>.json`: `fid`,
    the Inception Score of the same samples (`inception_score`, `inception_score_std` over
    `is_splits` = 10 parts, `inception.inception_score`), the sampler, NFE, sample count, the
    reference (file or split and count) and timings.
  """
  return _fid_scorer(config, workdir, inception_path=inception_path, ref=ref, split=split, num_ref=num_ref,
                     num_samples=num_samples, feature_batch=feature_batch, metrics=metrics,
                     out_dir=out_dir)(**sample_kw)


def _fid_scorer(config: ml_collections.ConfigDict, workdir: str, *, inception_path: str, ref: str | None,
                split: str | None, num_ref: int | None, num_samples: int, feature_batch: int, metrics: Sequence[str],
                out_dir: str | None) -> Callable[..., dict[str, Any]]:
  """`evaluate_fid`'s checks, Inception weights and reference, once: returns `score(**sample_kw)
  -> result`, which draws, scores and writes one checkpoint's samples (`evaluate_fid_steps`
  calls it for each step)."""
  from jaxdiff import generate, train

  metrics = tuple(metrics)
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise InputError(f"--fid_metrics={','.join(metrics)} names {unknown}; the metrics besides FID and the Inception "
                     f"Score are {list(METRICS)}.")
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
    mu_ref, sigma_ref, *rest = load_statistics(ref, features=bool(metrics))
    ref_feats, ref_info = (rest or [None])[0], {"ref": ref}
  else:
    ref_feats = dataset_features(config, exp, params, mesh, split=split, num_examples=num_ref,
                                 batch_size=feature_batch)
    mu_ref, sigma_ref = statistics(ref_feats)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"fid_stats_{config.data.dataset}_{split}")
    path = os.path.join(out_dir, f"{name}_{len(ref_feats)}{'_feats' if metrics else ''}.npz")
    if sharding.is_main_process():
      os.makedirs(out_dir, exist_ok=True)
      save_statistics(path, mu_ref, sigma_ref, dataset=config.data.dataset, split=split, n=len(ref_feats),
                      **({"features": ref_feats} if metrics else {}))
    ref_info = {"ref": path, "ref_split": split, "ref_n": int(len(ref_feats))}
    log.info("Wrote the data's FID statistics%s to %s (%d images); pass --fid_ref=%s to reuse them.",
             " and features" if metrics else "", path, len(ref_feats), path)
  ref_s = time.time() - t0
  if num_samples < inception.FEATURES:
    log.warning("FID of %d samples: fewer than the %d features, so their covariance is singular and the value "
                "is far above the 50000-sample FID papers report; compare only values of equal sample counts.",
                num_samples, inception.FEATURES)
  return functools.partial(_score, config, workdir, exp=exp, mesh=mesh, params=params, reference=(
      mu_ref, sigma_ref, ref_feats, {**ref_info, "inception": os.path.abspath(inception_path), "ref_s": ref_s}),
      num_samples=num_samples, feature_batch=feature_batch, metrics=metrics, out_dir=out_dir)


def _score(config: ml_collections.ConfigDict, workdir: str, *, exp, mesh, params: Any,
           reference: tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]], num_samples: int,
           feature_batch: int, metrics: tuple[str, ...], out_dir: str, **sample_kw) -> dict[str, Any]:
  """One checkpoint's samples drawn, scored against `reference` (mu, sigma, features or None,
  its summary entries) and written (`_fid_scorer`)."""
  from jaxdiff import evaluate, generate, viz

  mu_ref, sigma_ref, ref_feats, ref_info = reference
  drawn = generate.generate(config, workdir, num_samples=num_samples, keep_samples=True, **sample_kw)
  t1 = time.time()
  images = viz.to_uint8(drawn.pop("samples"), exp.centered)
  feats, logits = image_features(params, images, mesh, batch_size=feature_batch)
  mu, sigma = statistics(feats)
  value = evaluate.frechet_distance_from_statistics(mu, sigma, mu_ref, sigma_ref)
  splits = min(10, num_samples)
  is_mean, is_std = inception.inception_score(logits, splits)
  extra, t2 = {}, time.time()
  if "kid" in metrics:
    kid, kid_std = kernel_inception_distance(ref_feats, feats, seed=int(sample_kw.get("seed", 0)))
    extra.update(kid=kid, kid_std=kid_std, kid_subsets=KID_SUBSETS,
                 kid_subset_size=min(KID_SUBSET_SIZE, len(ref_feats), len(feats)))
  if "prdc" in metrics:
    extra.update(precision_recall(ref_feats, feats), prdc_k=3, prdc_dc_k=5)
  result = {"fid": value, "inception_score": is_mean, "inception_score_std": is_std, "is_splits": splits,
            "num_samples": num_samples, "method": drawn["method"], "nfe": drawn["nfe"],
            "checkpoint_step": drawn["checkpoint_step"], "guidance_scale": drawn["guidance_scale"],
            "classifier_scale": drawn["classifier_scale"], "seed": int(sample_kw.get("seed", 0)),
            "samples": drawn["paths"].get("npz"), **ref_info, **extra, "sample_s": drawn["wall_s"],
            "features_s": t2 - t1, "metrics_s": time.time() - t2}
  path = evaluate.write_result(os.path.join(out_dir, f"fid_{drawn['method']}_{drawn['nfe']}nfe_step"
                                                    f"{drawn['checkpoint_step']}_seed{result['seed']}.json"), result)
  result["path"] = path
  log.info("Wrote %s: FID %.3f, Inception Score %.2f +- %.2f, of %d samples (%s, %d NFE, step %d) against %s.",
           path, value, is_mean, is_std, num_samples, drawn["method"], drawn["nfe"], drawn["checkpoint_step"],
           result["ref"])
  if extra:
    log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
  return result


def watch_steps(list_steps: Callable[[], list[int]], final_step: int, *, poll_s: float, timeout_s: float,
                sleep: Callable[[float], Any] = time.sleep, clock: Callable[[], float] = time.monotonic):
  """Yields checkpoint steps as `list_steps()` shows them, in order and each once (a step below
  one already yielded is passed over), until a step >= `final_step` has been yielded or no new
  one has appeared for `timeout_s` seconds; polls every `poll_s` seconds in between."""
  last, seen_at = -1, clock()
  while True:
    for step in sorted(s for s in list_steps() if s > last):
      yield step
      last, seen_at = step, clock()
      if step >= final_step:
        return
    if clock() - seen_at > timeout_s:
      log.warning("No new checkpoint for %.0fs (the last scored: step %s; the run ends at step %d); stopping.",
                  timeout_s, last if last >= 0 else "none", final_step)
      return
    sleep(poll_s)


def wait_for_run_config(workdir: str, *, poll_s: float, timeout_s: float, sleep: Callable[[float], Any] = time.sleep,
                        clock: Callable[[], float] = time.monotonic) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` (`generate.load_config`), waiting up to `timeout_s` (polling
  every `poll_s`) for training to write `<workdir>/config.json`: an evaluation job (`--fid_watch`)
  may start before the run it follows. Process 0's view decides on every host."""
  from jaxdiff import generate

  path, start = os.path.join(workdir, "config.json"), clock()
  while not sharding.main_process_value(os.path.exists(path)):
    if clock() - start > timeout_s:
      raise InputError(f"--workdir={workdir!r}: training wrote no config.json within --fid_watch_timeout="
                       f"{timeout_s:g}s; start the run (or pass --config for it).")
    sleep(poll_s)
  return generate.load_config(workdir)


def evaluate_fid_steps(config: ml_collections.ConfigDict, workdir: str, *, inception_path: str,
                       steps: Sequence[int] | str = "all", ref: str | None = None, split: str | None = None,
                       num_ref: int | None = None, num_samples: int = 10_000, feature_batch: int = 100,
                       metrics: Sequence[str] = (), out_dir: str | None = None, watch_s: float = 0.0,
                       watch_timeout_s: float = 6 * 3600.0, **sample_kw) -> dict[str, Any]:
  """`evaluate_fid` of each of a run's checkpoints (score_sde's evaluation over checkpoints): the
  sample-quality curve of a training run, with the same sampler, seed and reference for every step.

  Args:
    steps: "all" (every checkpoint the run kept) or the steps to score (ints or digit strings),
      each one it kept.
    inception_path, ref, split, num_ref, num_samples, feature_batch, metrics, out_dir,
      **sample_kw: as `evaluate_fid`'s (not `step`). The weights and the reference (the data's
      statistics, computed and written once without `ref`) are loaded once for all steps.
    watch_s: > 0 (with steps="all"): an evaluation job beside training. After the checkpoints
      there are, it looks for new ones every `watch_s` seconds and scores each as it appears,
      until it has scored the run's last step (`config.training.num_steps`) or none has
      appeared for `watch_timeout_s`. A checkpoint the run deletes (`keep_checkpoints`)
      before its turn is passed over.

  Returns the curve written to `<out_dir>/fid_curve_<method>_<nfe>nfe_seed<seed>.json` (rewritten
  after every step, so it can be followed live): `steps`, one list per metric (`fid`,
  `inception_score`, and `kid`, `precision`, ... as asked), and each step's own result file
  (`evaluate_fid`'s).
  """
  from jaxdiff import checkpoint as ckpt_lib
  from jaxdiff.errors import CheckpointError

  if "step" in sample_kw:
    raise InputError("evaluate_fid_steps takes steps=, not step=; give --fid_steps or --step, not both.")
  directory = ckpt_lib.checkpoint_dir(config, workdir)

  def kept_steps() -> list[int]:  # process 0's listing: hosts could list a checkpoint dir at different moments
    ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
      return sharding.main_process_value(sorted(int(s) for s in ckpt.all_steps()))
    finally:
      ckpt.close()

  given = [str(s) for s in ([steps] if isinstance(steps, str) else steps)]
  if watch_s > 0 and given != ["all"]:
    raise InputError(f"--fid_watch={watch_s:g} scores checkpoints as training writes them: give --fid_steps=all, "
                     f"not --fid_steps={','.join(given)}.")
  kept = kept_steps()
  if not kept and not watch_s > 0:
    raise InputError(f"--workdir={workdir!r} has no checkpoints in {directory} to score.")
  if given == ["all"]:
    steps = kept
  elif all(s.isdigit() for s in given):
    steps = [int(s) for s in given]
  else:
    raise InputError(f"--fid_steps={','.join(given)} must be 'all' or checkpoint steps (this run kept {kept}).")
  missing = sorted(set(steps) - set(kept))
  if missing or not (steps or watch_s > 0):
    raise InputError(f"--fid_steps={','.join(map(str, steps))} names steps {missing} the run did not keep; "
                     f"its checkpoints are at steps {kept} (or give --fid_steps=all).")
  score = _fid_scorer(config, workdir, inception_path=inception_path, ref=ref, split=split, num_ref=num_ref,
                      num_samples=num_samples, feature_batch=feature_batch, metrics=metrics, out_dir=out_dir)
  # every process takes process 0's listings and clock, so all score the same steps and stop together
  order = (watch_steps(kept_steps, int(config.training.num_steps), poll_s=watch_s, timeout_s=watch_timeout_s,
                       clock=lambda: sharding.main_process_value(time.monotonic()))
           if watch_s > 0 else iter(steps))
  rows, curve = [], {}
  for s in order:
    try:
      rows.append(score(step=s, **sample_kw))
    except CheckpointError:
      if not watch_s > 0 or s in kept_steps():
        raise
      log.warning("Checkpoint %d was deleted by the run (config.training.keep_checkpoints) before it was scored; "
                  "passing over it.", s)
      continue
    curve = _write_curve(rows)
  if not rows:
    raise InputError(f"--workdir={workdir!r}: no checkpoint appeared in {directory} within --fid_watch_timeout="
                     f"{watch_timeout_s:g}s.")
  first = rows[0]
  log.info("FID by step (%s, %d NFE, %d samples): %s; written to %s.", first["method"], first["nfe"],
           first["num_samples"], ", ".join(f"{s}: {v:.3f}" for s, v in zip(curve["steps"], curve["fid"])),
           curve["path"])
  return curve


def _write_curve(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The curve of `evaluate_fid` results `rows` (one per step), written beside the first."""
  from jaxdiff import evaluate

  first = rows[0]
  names = ["fid", "inception_score"] + [k for k in ("kid", "precision", "recall", "density", "coverage")
                                         if k in first]
  curve = {"steps": [r["checkpoint_step"] for r in rows], **{k: [r[k] for r in rows] for k in names},
           "method": first["method"], "nfe": first["nfe"], "num_samples": first["num_samples"], "seed": first["seed"],
           "ref": first["ref"], "results": [r["path"] for r in rows]}
  path = os.path.join(os.path.dirname(first["path"]), f"fid_curve_{first['method']}_{first['nfe']}nfe_seed"
                                                      f"{first['seed']}.json")
  curve["path"] = evaluate.write_result(path, curve)
  return curve
