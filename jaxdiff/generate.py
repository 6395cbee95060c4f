"""Sampling from a trained model: the library side of run_sample.py.

* `make_sampler(exp, config, batch_size=..., mesh=...)` -> a jitted
  `fn(params, key, labels=None, classifier_params=None) -> (x, nfe)` running the whole
  sampler (one `lax.scan`) with its output sharded over the mesh; class-conditional models
  take `labels` and classifier-free guidance (`guidance_scale`), any model takes classifier
  guidance from a trained noise-conditional classifier (`classifier=`, `jaxdiff.guidance`);
  super-resolution models take `low_res=` (`jaxdiff.tasks`);
* `generate(config, workdir, ...)` restores the EMA parameters of a checkpoint, draws
  `num_samples` in batches (for the requested `labels`, cycled) and writes `samples.png`
  and `samples.npz`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import aot
from jaxdiff import guidance
from jaxdiff import latent
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
                 denoise: bool | None = None, guidance_scale: float | None = None, classifier=None,
                 classifier_scale: float = 1.0):
  """A jitted `sample_fn(params, key, labels=None, classifier_params=None) -> (x, nfe)`.

  Args:
    exp: the `train.Experiment` of the model.
    config: its config (`config.sampling` gives the defaults of the arguments below).
    batch_size: samples per call (divisible by the mesh's data shards).
    mesh: the device mesh; `x` comes back sharded over its data axes.
    method, num_steps, options, denoise: the sampler (`jaxdiff.sample`) and its settings.
    guidance_scale: classifier-free guidance `w` (default `config.sampling.guidance_scale`;
      class-conditional models only, applied where `labels` are given; w = 0: conditional).
    classifier: the `train.Experiment` of a noise-conditional classifier for classifier
      guidance towards `labels` (its parameters are `sample_fn`'s `classifier_params`).
    classifier_scale: the classifier guidance scale.

  `labels` is `[batch_size]` int32: the classes of a class-conditional model (None: the
  null label, i.e. unconditional samples) and the classes classifier guidance steers to.
  `low_res` `[batch_size, r, r, C]` (super-resolution models, `config.data.cond_resolution=r`)
  holds the low-resolution images the samples are conditioned on.
  """
  from jaxdiff.train import network_fn  # train imports this module

  method = resolve_method(method or config.sampling.method)
  opts = sampler_options(config, method, options)
  num_steps = int(num_steps or config.sampling.num_steps)
  denoise = config.sampling.denoise if denoise is None else denoise
  sharding.check_batch_size(batch_size, mesh, name="sampling batch size")
  shape = (batch_size,) + exp.shape  # latent diffusion: the latents' shape (decode them: jaxdiff.latent)
  w = float(config.sampling.guidance_scale if guidance_scale is None else guidance_scale)
  interval = tuple(float(v) for v in config.sampling.guidance_interval)
  rescale = float(config.sampling.guidance_rescale)
  guidance.check_guidance(w, interval, rescale)
  if w and not exp.num_classes:
    raise InputError(f"guidance_scale={w:g} (classifier-free guidance) needs a class-conditional model, but "
                     f"this one is unconditional (config.model.num_classes=0); train one with "
                     f"config.model.num_classes > 0, or use classifier guidance (--classifier_workdir).")
  if classifier is not None:
    check_classifier(exp, classifier)
  k = exp.num_classes
  clip = exp.data_range if config.sampling.clip_denoised else None  # pixel images only
  # The interval (0, inf) is "everywhere": no mask in the traced function.
  interval = None if interval[0] <= 0.0 and interval[1] == float("inf") else interval

  def sample_fn(params, key, labels=None, classifier_params=None, low_res=None):
    if bool(exp.cond_resolution) != (low_res is not None):  # super-resolution models (tasks.superres)
      raise InputError(f"this model is conditioned on {exp.cond_resolution}x{exp.cond_resolution} low-resolution "
                       f"images (config.data.cond_resolution): give low_res and use run_sample.py --task superres"
                       if exp.cond_resolution else "low_res was given but the model has no low-resolution "
                       "conditioning (config.data.cond_resolution=0).")
    if labels is not None and not k and classifier is None:
      raise InputError("labels were given but the model is unconditional (config.model.num_classes=0) and "
                       "there is no classifier to guide with; drop the labels, or pass a classifier.")
    if classifier is not None and labels is None:
      raise InputError("classifier guidance needs labels: the classes to steer towards.")
    score_fn = model_score_fn(exp, params, labels=labels, guidance_scale=w, interval=interval, rescale=rescale,
                              low_res=low_res)
    if classifier is not None:
      logp_fn = guidance.classifier_logp_fn(network_fn(classifier.model, classifier_params), exp.process)
      score_fn = guidance.classifier_guidance_score_fn(score_fn, logp_fn, labels, classifier_scale)
    if clip is not None:
      score_fn = parameterization.clip_denoised(score_fn, exp.process, *clip)
    x, info = samplers.sample(key, exp.process, score_fn, shape, method=method, num_steps=num_steps,
                              denoise=denoise, **opts)
    return x, jnp.asarray(info["nfe"], jnp.int32)

  return jax.jit(sample_fn, out_shardings=(sharding.batch_sharding(mesh, len(shape)),
                                           sharding.replicated(mesh)))


def model_score_fn(exp, params, *, labels=None, guidance_scale: float = 0.0, interval=None, rescale: float = 0.0,
                   low_res=None):
  """`score_fn(x, t)` of `exp`'s network at `params`.

  A class-conditional model is conditioned on `labels` ([B] int32; None: the null label),
  with classifier-free guidance `guidance_scale` w where labels are given
  (`guidance.cfg_score_fn`, applied where sigma/alpha is in `interval`, rescaled by
  `rescale`); a super-resolution model on `low_res`.
  """
  from jaxdiff.train import network_fn  # train imports this module

  k = exp.num_classes
  if k and labels is not None and guidance_scale:
    cond_net = lambda x, c, y: exp.model.apply({"params": params}, x, c, y, train=False)  # noqa: E731
    score_fn = guidance.cfg_score_fn(cond_net, exp.process, exp.prediction, labels, guidance_scale, null_label=k,
                                     interval=interval, rescale=rescale)
  else:
    cond = {"y": labels} if (k and labels is not None) else {}
    if low_res is not None:
      cond["low_res"] = low_res
    score_fn = parameterization.score_fn_from_network(network_fn(exp.model, params, **cond), exp.process,
                                                      exp.prediction)
  if exp.consistency_sigma_data is not None:
    # a consistency model: f = c_skip x / alpha + (1 - c_skip) x0_hat, affine in x0_hat with the same
    # c_skip for both branches, so guidance applied before the wrap is guidance on f
    score_fn = parameterization.consistency_score_fn(score_fn, exp.process, exp.consistency_sigma_data)
  return score_fn


def check_classifier(exp, classifier) -> None:
  """InputError unless `classifier` is a noise-conditional classifier of `exp`'s data and process."""
  if not classifier.is_classifier:
    raise InputError(f"the classifier for classifier guidance is a {type(classifier.model).__name__}, not a "
                     f"noise-conditional classifier; train one with config.model.name='classifier' "
                     f"(e.g. configs/mnist_classifier.py).")
  if exp.num_classes and classifier.num_classes != exp.num_classes:
    raise InputError(f"the classifier has {classifier.num_classes} classes but the model is conditional on "
                     f"{exp.num_classes}; use a classifier trained on the same dataset.")
  if classifier.shape != exp.shape or classifier.centered != exp.centered:
    raise InputError(f"the classifier was trained on data of shape {classifier.shape} "
                     f"(centered={classifier.centered}) but the model makes {exp.shape} "
                     f"(centered={exp.centered}); use a classifier of the same data.")
  if not _same_process(classifier.process, exp.process):
    raise InputError(f"the classifier was trained on x_t of a different process ({_describe(classifier.process)}) "
                     f"than the model's ({_describe(exp.process)}); train it with the model's config.process.")


def _describe(process) -> str:
  n = getattr(process, "num_timesteps", None)
  return type(process).__name__ + (f" with {n} steps" if n is not None else "")


def _same_process(a, b) -> bool:
  if type(a) is not type(b):
    return False
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.shape(x) == np.shape(y) and np.allclose(x, y) for x, y in zip(la, lb)))


def cycle_labels(labels, n: int) -> np.ndarray:
  """`n` labels `int32 [n]` taking `labels` in turn: cycle_labels([3, 5], 5) = [3, 5, 3, 5, 3]."""
  labels = np.asarray(list(labels), np.int32).reshape(-1)
  if labels.size == 0:
    raise InputError("labels is empty; give at least one class label.")
  return labels[np.arange(n) % labels.size]


def parse_labels(labels, num_classes: int, *, allow_null: bool = False) -> list[int]:
  """`--labels` values (ints, or 'null' with `allow_null`) -> ints in [0, num_classes).

  'null' is the null label `num_classes` of a class-conditional model (unconditional
  samples). InputError naming the bad value otherwise.
  """
  given = ",".join(map(str, labels))
  out = []
  for v in labels:
    s = str(v).strip()
    if allow_null and s == "null":
      out.append(num_classes)
      continue
    try:
      y = int(s)
    except ValueError:
      raise InputError(f"--labels={given}: {s!r} is not an integer class label"
                       f"{' (or null)' if allow_null else ''}.") from None
    if not 0 <= y < num_classes:
      raise InputError(f"--labels={given}: label {y} is out of range for {num_classes} classes; use "
                       f"0..{num_classes - 1}{' or null' if allow_null else ''}.")
    out.append(y)
  if not out:
    raise InputError("--labels is empty; give at least one class label, e.g. --labels=0,1,2.")
  return out


def save_samples(x: np.ndarray, exp, prefix: str, write_npz: bool = True, max_grid: int = 256,
                 labels: np.ndarray | None = None) -> dict[str, str]:
  """Writes `<prefix>.png` (a grid, or a scatter for 2-D points) and optionally `<prefix>.npz`.

  The .npz holds `images` (uint8) or `x` (points), and `labels` when given.
  """
  paths = {}
  extra = {} if labels is None else {"labels": np.asarray(labels, np.int32)}
  if exp.data_spec.is_image:
    imgs = viz.to_uint8(x, exp.centered)
    paths["png"] = viz.save_image_grid(imgs[:max_grid], prefix + ".png")
    if write_npz:
      np.savez_compressed(prefix + ".npz", images=imgs, **extra)
      paths["npz"] = prefix + ".npz"
  else:
    from jaxdiff.data import synthetic

    ref, _ = synthetic.gmm2d().sample(2000, seed=123)
    paths["png"] = viz.save_scatter(x, prefix + ".png", reference=ref)
    if write_npz:
      np.savez_compressed(prefix + ".npz", x=np.asarray(x, np.float32), **extra)
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
    if key == "model" and isinstance(value, dict) and value.get("name", "unet") != config.model.name:
      # another network than the base section's U-Net: today's defaults are its class's fields
      config.model = config_lib.model_section(value["name"])
    if isinstance(value, dict) and key in config and key != "process":  # process keys depend on its name
      merged = config[key].to_dict()
      merged.update(value)
      value = merged
    config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return config


def load_classifier(workdir: str, mesh, *, step: int | None = None):
  """(experiment, EMA params) of a noise-conditional classifier trained in `workdir`."""
  from jaxdiff import evaluate
  from jaxdiff import train

  config = load_config(workdir)
  exp = train.build_experiment(config)
  if not exp.is_classifier:
    raise InputError(f"--classifier_workdir={workdir!r} holds a {type(exp.model).__name__} "
                     f"(config.model.name={config.model.name!r}), not a classifier; train one with "
                     f"config.model.name='classifier' (e.g. configs/mnist_classifier.py).")
  _, params = evaluate.restore_ema_params(config, workdir, exp, mesh, step=step)
  return exp, params


def check_draws_samples(exp, workdir: str) -> None:
  """An InputError unless the run in `workdir` (`exp`) draws samples unconditionally of inputs:
  a classifier, an autoencoder or a super-resolution model does not."""
  if exp.is_classifier:
    raise InputError(f"--workdir={workdir!r} holds a noise-conditional classifier, which does not draw "
                     f"samples; pass it as --classifier_workdir of a diffusion model's run.")
  if exp.is_autoencoder:
    raise InputError(f"--workdir={workdir!r} holds an autoencoder, which does not draw samples; train a latent "
                     f"diffusion model in it with --config.latent.autoencoder=jaxdiff:{workdir} (e.g. "
                     f"configs/mnist_latent.py).")
  if exp.cond_resolution:
    raise InputError(f"--workdir={workdir!r} holds a super-resolution model (config.data.cond_resolution="
                     f"{exp.cond_resolution}), which needs low-resolution inputs; use run_sample.py --task "
                     f"superres --input=PATH.")


def generate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
             method: str | None = None, num_steps: int | None = None, num_samples: int = 64,
             seed: int = 0, batch_size: int | None = None, options: dict | None = None,
             out_dir: str | None = None, labels: Sequence[int | str] | None = None,
             guidance_scale: float | None = None, classifier_workdir: str | None = None,
             classifier_scale: float | None = None, keep_samples: bool = False) -> dict[str, Any]:
  """Restores the EMA parameters of `workdir`'s checkpoint and writes samples.

  Args (beyond the sampler's):
    labels: classes to draw, cycled over `num_samples` (class-conditional models: default
      every class in turn; 'null' = unconditional). With a classifier, the classes it
      guides towards.
    guidance_scale: classifier-free guidance w (default config.sampling.guidance_scale).
    classifier_workdir: a run of `config.model.name='classifier'` for classifier guidance.
    classifier_scale: its guidance scale (default 1.0).
    keep_samples: also return the samples (`result["samples"]`, model space, on every process).

  Returns a dict with the paths written, the NFE per sample, wall time and images/s.
  """
  from jaxdiff import evaluate
  from jaxdiff import train

  # multi-host: every process must sample the same thing (or the collectives would hang)
  sharding.check_same_config(config, dict(step=step, method=method, num_steps=num_steps, num_samples=num_samples,
                                          seed=seed, batch_size=batch_size, options=options, labels=labels,
                                          guidance_scale=guidance_scale, classifier_scale=classifier_scale),
                             what="config or flag")
  aot.use_compilation_cache(config.get("compilation_cache_dir", ""))  # the training run's cache
  exp = train.build_experiment(config)
  check_draws_samples(exp, workdir)
  if num_samples < 1:
    raise InputError(f"--num_samples={num_samples} must be >= 1.")
  k = exp.num_classes
  if guidance_scale and not k:
    raise InputError(f"--guidance_scale={guidance_scale:g} needs a class-conditional model, but {workdir!r} "
                     f"is unconditional (config.model.num_classes=0); train with config.model.num_classes>0 "
                     f"(e.g. configs/mnist_cond.py) or use --classifier_workdir for classifier guidance.")
  if classifier_workdir is None and classifier_scale is not None:
    raise InputError(f"--classifier_scale={classifier_scale:g} needs --classifier_workdir (a classifier run).")
  classifier_scale = 1.0 if classifier_scale is None else float(classifier_scale)
  if labels and not k and classifier_workdir is None:
    raise InputError(f"--labels={','.join(map(str, labels))} were given but {workdir!r} is an unconditional "
                     f"model (config.model.num_classes=0); drop --labels, or add --classifier_workdir for "
                     f"classifier guidance.")
  mesh = sharding.create_mesh(config.mesh.to_dict())
  classifier = classifier_params = None
  if classifier_workdir is not None:
    classifier, classifier_params = load_classifier(classifier_workdir, mesh)
    check_classifier(exp, classifier)
    if not labels:
      raise InputError(f"--classifier_workdir needs --labels: the classes to guide towards, e.g. --labels=0,1,2 "
                       f"(0..{classifier.num_classes - 1}).")
  n_labels = k or (classifier.num_classes if classifier is not None else 0)
  label_list = (parse_labels(labels, n_labels, allow_null=bool(k) and classifier is None) if labels
                else list(range(k)) if k else None)
  step, params = evaluate.restore_ema_params(config, workdir, exp, mesh, step=step)
  decode = latent.sample_decoder(exp.latent, mesh)  # latent diffusion: the frozen autoencoder's decoder

  batch_size = sharding.round_up_batch(batch_size or min(config.sampling.batch_size, num_samples), mesh)
  # compiled ahead of the first batch, so the compiler's freed heap is returned first (aot)
  fn = aot.AotJit(make_sampler(exp, config, batch_size=batch_size, mesh=mesh, method=method,
                               num_steps=num_steps, options=options, guidance_scale=guidance_scale,
                               classifier=classifier, classifier_scale=classifier_scale), name="sampler")
  method = resolve_method(method or config.sampling.method)
  w = float(config.sampling.guidance_scale if guidance_scale is None else guidance_scale)

  key = jax.random.key(seed)
  n_batches = int(math.ceil(num_samples / batch_size))
  all_labels = None if label_list is None else cycle_labels(label_list, n_batches * batch_size)
  label_sh = sharding.batch_sharding(mesh, 1)
  out, t0 = [], time.time()
  for b in range(n_batches):
    y = None if all_labels is None else jax.device_put(all_labels[b * batch_size:(b + 1) * batch_size], label_sh)
    x, nfe = fn(params, jax.random.fold_in(key, b), y, classifier_params)
    out.append(sharding.to_host(decode(x)))
    nfe = int(nfe)
    done = min((b + 1) * batch_size, num_samples)
    el = time.time() - t0
    log.info("sampled %d/%d (%s, %d NFE) in %.1fs", done, num_samples, method, nfe, el)
  wall = time.time() - t0
  x = np.concatenate(out)[:num_samples]
  out_dir = out_dir or os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  prefix = os.path.join(out_dir, f"{method}_{nfe}nfe_step{step}_seed{seed}")
  if k and label_list is not None and w:
    prefix += f"_cfg{w:g}"
  if classifier is not None:
    prefix += f"_cg{classifier_scale:g}"
  sample_labels = None if all_labels is None else all_labels[:num_samples]
  paths = save_samples(x, exp, prefix, labels=sample_labels) if sharding.is_main_process() else {}
  result = {"paths": paths, "nfe": nfe, "method": method, "checkpoint_step": step,
            "num_samples": num_samples, "wall_s": wall, "samples_per_s": num_samples / wall,
            "labels": None if sample_labels is None else sample_labels.tolist(),
            "guidance_scale": w if k else 0.0,
            "classifier_scale": classifier_scale if classifier is not None else 0.0}
  if sharding.is_main_process():
    log.info("Wrote %s: %d samples, %s, %d NFE, %.1fs (%.2f samples/s, compile included).",
             paths.get("png"), num_samples, method, nfe, wall, num_samples / wall)
  if keep_samples:
    result["samples"] = x
  return result
