"""Distillation of a trained diffusion model into a few-step student, from a config: `config.distill`.

Three methods (`config.distill.method`), each starting the student from the teacher run's EMA
parameters (same network, process and parameterization):

* 'progressive' (Salimans & Ho 2022): rounds that halve the teacher's DDIM steps, below.
* 'consistency' (Song et al. 2023, consistency distillation): the student learns the
  consistency function `f(x_t, t) = x_{t_min}` of the teacher's probability-flow ODE, on a
  `num_scales`-point Karras grid, against a target network (an EMA of the student with
  `target_decay`; the student itself with 0) evaluated where one teacher ODE step
  (`solver`: 'heun' or 'ddim') lands (`losses.make_consistency_loss`). It samples in 1 or
  a few network evaluations: `config.sampling.method='consistency'`, `num_steps` = the
  NFE. The run's network is then read through `parameterization.consistency_score_fn`
  (`train.Experiment.consistency_sigma_data`).
* 'reflow' (Liu et al. 2023): the teacher's deterministic sampler (`solver`, `teacher_steps`
  grid times) turns fresh noise into samples, and the student learns the ordinary denoising
  objective (`config.loss`) on those pairs (`losses.make_reflow_loss`): its paths become
  straight (rectified flow) or, on any process, paths along which `ddim` is exact, so it
  samples in a few `ddim` steps (any `config.sampling`). With `pairs` (a directory) the
  teacher makes `num_pairs` pairs once (`train.write_reflow_pairs`, `data.pairs`) and the
  student trains on that fixed set, as Liu et al. do, without running the teacher per step.

Progressive distillation:

A run with `config.distill.teacher='<workdir>'` trains a student that samples in a fraction of
its teacher's steps. The student starts from the teacher run's EMA parameters (its latest
checkpoint, or `'<workdir>@<step>'`'s; same network,
process and parameterization). Round r (steps `r * steps_per_round` to `(r + 1) *
steps_per_round`) distils the teacher's `teacher_steps / 2^r` deterministic DDIM steps into
half as many (`losses.make_distillation_loss`); at the start of the next round the student
(its EMA, if one is kept) becomes the teacher, and the student's EMA and optimizer state
(with it the learning-rate schedule) restart. After `rounds = num_steps / steps_per_round`
rounds the student takes `teacher_steps / 2^rounds` DDIM steps:

  run_sample.py --workdir <run>   (config.sampling: ddim, num_steps = that + 1, denoise=False)

The current teacher is part of the train state (`train.DistillState.teacher_params`), so a run
resumes mid-round, or across a round's end, exactly where it stopped. (Reflow on fixed pairs
never runs the teacher after making them, and its state is a plain `train.TrainState`.)

This module holds the schedule of rounds and the teacher's loading and checks; the losses are
`losses.make_distillation_loss` and `losses.make_consistency_loss`, the steps
`train.distill_train_step` and `train.consistency_train_step`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.errors import ConfigError

KEY = "config.distill.teacher"

# Sections that must be the same in the teacher's and the student's configs (the student is the
# teacher's network, fine-tuned): model fields but the compute dtype and dropout, the whole process,
# the parameterization, what the network sees.
_SAME_DATA = ("resolution", "num_channels", "centered", "use_labels", "cond_resolution")
METHODS = ("progressive", "consistency", "reflow")


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("distill", {}).get("teacher", ""))


def method(config: ml_collections.ConfigDict) -> str:
  """'progressive', 'consistency' or 'reflow' for a distillation run, '' for any other."""
  return str(config.distill.get("method", "progressive")) if enabled(config) else ""


def consistency_sigma_data(config: ml_collections.ConfigDict) -> float | None:
  """The sigma_data of a consistency model's c_skip; None unless `config` distils one."""
  return float(config.distill.get("sigma_data", 0.5)) if method(config) == "consistency" else None


def num_rounds(config: ml_collections.ConfigDict) -> int:
  return int(config.training.num_steps) // int(config.distill.steps_per_round)


def final_steps(config: ml_collections.ConfigDict) -> int:
  """The DDIM steps the progressively distilled student takes at the end of the run."""
  return int(config.distill.teacher_steps) >> num_rounds(config)


def student_steps(teacher_steps: int, step, steps_per_round: int):
  """The student's DDIM steps in the round of (0-based) update `step`: teacher_steps / 2^(r + 1).

  `step` may be traced (the train step's `state.step`); the result is then an int32 array.
  """
  if isinstance(step, (int, np.integer)):
    return (teacher_steps // 2) >> (int(step) // steps_per_round)
  return jnp.right_shift(jnp.int32(teacher_steps // 2), (step // steps_per_round).astype(jnp.int32))


def check_process(process) -> None:
  """The rounds halve the process's default grid (`Process.default_grid_at`), which must be the
  grid `ddim` samples the student on, and nest: n + 1 points every other one of 2n + 1."""
  for n in (4, 8, 16):
    fine, coarse = (np.asarray(process.default_grid(m), np.float64) for m in (2 * n + 1, n + 1))
    at = np.asarray(process.default_grid_at(np.arange(2 * n + 1) / (2 * n)), np.float64)
    scale = max(1.0, abs(float(process.T)))
    if not (np.allclose(fine, at, rtol=1e-5, atol=1e-6 * scale)
            and np.allclose(fine[::2], coarse, rtol=1e-5, atol=1e-6 * scale)):
      raise ConfigError(
          f"{KEY}: progressive distillation halves the sampler's time grid, but the {type(process).__name__} "
          f"process's default_grid({n + 1}) is not every other point of default_grid({2 * n + 1}) (or not its "
          f"default_grid_at), so the student could not be sampled on the grid it was trained for. Distil a "
          f"teacher of a process whose grids nest (the built-in ones do).")


def validate(config: ml_collections.ConfigDict) -> None:
  """The numbers of `config.distill` (no file is read; the teacher is checked by `load_teacher`)."""
  if not enabled(config):
    return
  d, t = config.distill, config.training
  if config.model.name in ("classifier", "autoencoder"):
    raise ConfigError(f"{KEY}={d.teacher!r} distils a diffusion model, but config.model.name={config.model.name!r}; "
                      f"use the teacher run's network.")
  if str(t.get("init_from", "") or ""):
    raise ConfigError(f"{KEY}={d.teacher!r} starts the student from the teacher's parameters; "
                      f"config.training.init_from={t.init_from!r} would start it elsewhere: set one of them to ''.")
  if method(config) not in METHODS:
    raise ConfigError(f"config.distill.method={d.get('method')!r} is not known; valid methods are: "
                      f"{', '.join(METHODS)}.")
  if str(d.get("pairs", "")) and method(config) != "reflow":
    raise ConfigError(f"config.distill.pairs={d.pairs!r} holds reflow's fixed pairs, but config.distill.method="
                      f"{method(config)!r}; set it to '' (or the method to 'reflow').")
  if method(config) == "consistency":
    return _validate_consistency(config)
  if method(config) == "reflow":
    return _validate_reflow(config)
  from jaxdiff import processes

  check_process(processes.get_process(**config.process.to_dict()))
  spr, n0 = int(d.steps_per_round), int(d.teacher_steps)
  if spr < 1:
    raise ConfigError(f"config.distill.steps_per_round={d.steps_per_round} must be >= 1 (the training steps of each "
                      f"halving; Salimans & Ho: 50k).")
  if int(t.num_steps) % spr:
    raise ConfigError(f"config.training.num_steps={t.num_steps} is not a whole number of rounds of "
                      f"config.distill.steps_per_round={spr}; use a multiple of it (rounds x steps_per_round).")
  rounds = num_rounds(config)
  if n0 < 2 or n0 % (2**rounds):
    lo = 2**rounds
    raise ConfigError(f"config.distill.teacher_steps={d.teacher_steps} cannot be halved {rounds} times "
                      f"(config.training.num_steps / config.distill.steps_per_round = {t.num_steps} / {spr}); use "
                      f"a multiple of {lo} (e.g. {lo * max(1, round(n0 / lo))}), or fewer rounds.")
  final = n0 >> rounds
  s = config.sampling
  want = dict(method="ddim", eta=0.0, num_steps=final + 1, denoise=False)
  got = dict(method=s.method, eta=float(s.eta), num_steps=int(s.num_steps), denoise=bool(s.denoise))
  if got != want:
    fix = " ".join(f"--config.sampling.{k}={v}" for k, v in want.items())
    raise ConfigError(f"{KEY}: after {rounds} rounds the student takes {final} deterministic DDIM steps ({final} + 1 "
                      f"grid points, no extra denoising step), which config.sampling must say (it samples the "
                      f"run); it has {got}. Set {fix}.")


def _check_loss(config: ml_collections.ConfigDict) -> None:
  """Builds the run's loss, whose constructor checks the method's keys (solver, metric, grid)."""
  from jaxdiff import processes
  from jaxdiff import train  # train imports this module

  train.make_loss(config, processes.get_process(**config.process.to_dict()))


PAIRS_DTYPES = ("float32", "float16")  # config.distill.pairs_dtype: how fixed reflow pairs are stored


def _validate_reflow(config: ml_collections.ConfigDict) -> None:
  d = config.distill
  if int(d.get("steps_per_round", 0)):
    raise ConfigError(f"config.distill.steps_per_round={d.steps_per_round} counts progressive distillation's rounds; "
                      f"config.distill.method='reflow' has none: set it to 0.")
  _check_loss(config)  # losses.make_reflow_loss: solver, teacher_steps
  num, batch = int(d.get("num_pairs", 0)), int(config.training.batch_size)
  dtype = str(d.get("pairs_dtype", "float32"))
  if dtype not in PAIRS_DTYPES:
    raise ConfigError(f"config.distill.pairs_dtype={dtype!r} is not known; use one of {', '.join(PAIRS_DTYPES)} "
                      f"(float16 halves the pairs' disk space).")
  if str(d.get("pairs", "")):
    if "://" in str(d.pairs):
      raise ConfigError(f"config.distill.pairs={d.pairs!r}: the pairs are memory-mapped files, so they need a "
                        f"filesystem path (on a pod, one every host mounts, e.g. the bucket through gcsfuse); "
                        f"config.checkpoint_dir is what may be a bucket URL.")
    if int(config.data.get("cond_resolution", 0) or 0):
      raise ConfigError(f"config.distill.pairs={d.pairs!r}: fixed pairs hold no low-resolution inputs, so a "
                        f"super-resolution student (config.data.cond_resolution={config.data.cond_resolution}) "
                        f"trains on fresh pairs: set config.distill.pairs=''.")
    if num < 0 or (0 < num < batch):
      raise ConfigError(f"config.distill.num_pairs={num} must be >= config.training.batch_size={batch} (Liu et "
                        f"al. draw millions; the number the teacher samples once), or 0 to use pairs already "
                        f"in {d.pairs!r}.")
  elif num:
    raise ConfigError(f"config.distill.num_pairs={num} is the size of a fixed set of pairs, which needs "
                      f"config.distill.pairs (their directory); set it, or num_pairs=0 for fresh pairs every batch.")


def _validate_consistency(config: ml_collections.ConfigDict) -> None:
  d = config.distill
  for key in ("teacher_steps", "steps_per_round"):  # progressive distillation's rounds
    if int(d.get(key, 0)):
      raise ConfigError(f"config.distill.{key}={d.get(key)} counts progressive distillation's rounds; "
                        f"config.distill.method='consistency' has none: set it to 0 (consistency distillation "
                        f"trains for config.training.num_steps on config.distill.num_scales grid times).")
  _check_loss(config)  # losses.make_consistency_loss: solver, metric, num_scales, sigma_data
  if not 0.0 <= float(d.target_decay) < 1.0:
    raise ConfigError(f"config.distill.target_decay={d.target_decay} must be in [0, 1) (the target network's "
                      f"EMA rate; Song et al.: 0.95; 0: the student itself, without gradient).")
  from jaxdiff import configs  # configs imports this module

  configs.check_consistency_sampler(config.sampling, KEY)


def check_teacher(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict) -> None:
  """The teacher run's config must describe the student's network, process and inputs."""
  where = f"{KEY}={config.distill.teacher!r}"
  if teacher_config.model.name in ("classifier", "autoencoder"):
    raise ConfigError(f"{where} holds a {teacher_config.model.name}, not a diffusion model.")
  if method(teacher_config) == "consistency":
    raise ConfigError(f"{where} holds a consistency model, whose output is not a diffusion model's denoiser; "
                      f"distil its teacher ({teacher_config.distill.teacher!r}) instead.")
  if teacher_config.loss.get("objective", "denoising") == "consistency":
    raise ConfigError(f"{where} holds a consistency model (config.loss.objective='consistency'), whose output is "
                      f"not a diffusion model's denoiser; distil a diffusion model's run.")
  from jaxdiff.models import pretrained

  diffs = pretrained.network_differences(config, teacher_config, "in the teacher")
  if config.process.to_dict() != teacher_config.process.to_dict():
    diffs.append(f"process: {config.process.to_dict()} here, {teacher_config.process.to_dict()} in the teacher")
  for k in _SAME_DATA:
    a, b = config.data.get(k), teacher_config.data.get(k)
    if pretrained.canonical_value(a) != pretrained.canonical_value(b):
      diffs.append(f"data.{k}: {a!r} here, {b!r} in the teacher")
  for k in ("autoencoder", "scaling_factor"):
    a, b = config.latent.get(k), teacher_config.get("latent", {}).get(k, "" if k == "autoencoder" else 0.0)
    if pretrained.canonical_value(a) != pretrained.canonical_value(b):
      diffs.append(f"latent.{k}: {a!r} here, {b!r} in the teacher")
  if diffs:
    raise ConfigError(f"{where}: the student is the teacher's network, fine-tuned, so the configs must agree; they "
                      f"differ in " + "; ".join(diffs) + ". Start from the teacher's config file (only "
                      "model.dtype and model.dropout may differ).")


def load_teacher(config: ml_collections.ConfigDict, mesh, abstract_params: Any) -> tuple[int, Any]:
  """`(step, params)`: the teacher run's EMA parameters, checked against `config`, in the student's
  parameter dtypes and shardings (`abstract_params`: shapes with shardings)."""
  from jaxdiff import evaluate

  return evaluate.load_run_params(str(config.distill.teacher), mesh, abstract_params, key=KEY,
                                  check=lambda teacher_config: check_teacher(config, teacher_config))
