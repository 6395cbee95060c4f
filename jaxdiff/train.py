"""Training: optimizer, train state, the pure train step, and the loop behind run_train.py.

The pieces are small top-level functions so they can be used and tested on their own:

* `make_optimizer(...)`  optax chain: global-norm clipping, Adam/AdamW, warmup + schedule;
* `create_train_state(key, model, optimizer, example)`  params, EMA, optimizer state;
* `train_step(state, batch, key, *, model, loss_fn, optimizer, ema_decay, label_dropout)`
  pure; jit, shardings and donation are applied where it is called; class-conditional
  models get the batch's labels, dropped to the null label with `label_dropout`; with
  `microbatches` m > 1 the gradient is taken over m parts of the batch, one at a time
  (`microbatched_value_and_grad`, any objective);
* `classifier_train_step(...)`  the same for a noise-conditional classifier
  (`config.model.name='classifier'`, cross-entropy on noised data);
* `autoencoder_train_step(...)`  the same for latent diffusion's KL autoencoder
  (`config.model.name='autoencoder'`, `losses.make_autoencoder_loss`), and
  `adversarial_autoencoder_train_step(...)` its update against a patch discriminator
  (`config.loss.disc_weight > 0`; `AdversarialState` holds the discriminator);
* `distill_train_step(...)`  progressive distillation's student (`config.distill`,
  `losses.make_distillation_loss`): the teacher is `state.teacher_params`, replaced by the
  student at the start of each round;
* `reflow_train_step(...)`  reflow's student (`config.distill.method='reflow'`,
  `losses.make_reflow_loss`): the fixed teacher's samples paired with their noise;
* `consistency_train_step(...)`  consistency distillation's student (`config.distill.method=
  'consistency'`, `losses.make_consistency_loss`): the fixed teacher and the target network
  (`ConsistencyState.target_params`, an EMA of the student) are part of the state;
* `train_and_evaluate(config, workdir)`  the loop: sharded init, resume from the latest
  checkpoint, metrics pulled from the device only every `log_every` steps, NaN guard before
  every checkpoint, sample grids and a loss curve under the workdir. With
  `config.latent.autoencoder` (latent diffusion) each batch is encoded by the frozen
  autoencoder on the devices before the step, and sample grids are decoded.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from jaxdiff import aot
from jaxdiff import checkpoint as ckpt_lib
from jaxdiff import configs as config_lib
from jaxdiff import data as data_lib
from jaxdiff import distill
from jaxdiff import evaluate
from jaxdiff import generate
from jaxdiff import latent as latent_lib
from jaxdiff import losses
from jaxdiff import models
from jaxdiff import processes
from jaxdiff import sharding
from jaxdiff import tasks
from jaxdiff import viz
from jaxdiff.models import pretrained
from jaxdiff.errors import ConfigError, DataError, NonFiniteLossError

log = logging.getLogger(__name__)
Array = jax.Array


class TrainState(struct.PyTreeNode):
  step: Array  # [] int32, number of optimizer updates applied
  params: Any
  ema_params: Any  # exponential moving average of params (None: no EMA kept)
  opt_state: optax.OptState


class DistillState(TrainState):
  """A progressive-distillation student's train state: also the current round's teacher.

  (A subclass, so that ordinary runs' checkpoints keep `TrainState`'s exact layout.)"""

  teacher_params: Any


class ConsistencyState(DistillState):
  """A consistency-distillation student's train state with a target network: the teacher (fixed)
  and `target_params`, an EMA of the student at `config.distill.target_decay` (Song et al.'s
  theta^-). With decay 0 the target is the student itself and a `DistillState` suffices."""

  target_params: Any


class AdversarialState(TrainState):
  """An autoencoder's train state with its patch discriminator (`config.loss.disc_weight > 0`):
  the discriminator's parameters and optimizer state. Not averaged (no EMA) and not used after
  training: latent runs read `ema_params` alone."""

  disc_params: Any
  disc_opt_state: optax.OptState


class TargetState(TrainState):
  """A consistency-training run's train state with a target network: `target_params`, an EMA of
  the student at `config.loss.target_decay` (Song et al.'s theta^-). With decay 0 (Song &
  Dhariwal's improved recipe) the target is the student itself and a `TrainState` suffices."""

  target_params: Any


def make_schedule(*, learning_rate: float, schedule: str = "constant", warmup_steps: int = 0,
                  num_steps: int | None = None) -> optax.Schedule:
  """Linear warmup from 0, then a constant or cosine-decaying learning rate."""
  if schedule == "constant":
    if warmup_steps:
      return optax.linear_schedule(0.0, learning_rate, warmup_steps)  # holds the end value after
    return optax.constant_schedule(learning_rate)
  if schedule == "cosine":
    if not num_steps:
      raise ConfigError("config.optimizer.schedule='cosine' needs config.training.num_steps > 0.")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), num_steps)
  raise ConfigError(f"config.optimizer.schedule={schedule!r} is not known; use 'constant' or 'cosine'.")


# Parameters that are fixed by construction (no gradient reaches them): weight decay must not
# shrink them either. NCSN++'s Gaussian Fourier frequencies.
FIXED_PARAMS = ("fourier_freqs",)


def _decayed(params):
  """AdamW's mask: every parameter but the `FIXED_PARAMS`."""
  def keep(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) not in FIXED_PARAMS
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    *,
    name: str = "adam",
    learning_rate: float = 2e-4,
    schedule: str = "constant",
    warmup_steps: int = 0,
    num_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
  """Global-norm clipping -> Adam/AdamW, with `make_schedule`'s learning rate."""
  lr = make_schedule(learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                     num_steps=num_steps)
  if name == "adam":
    if weight_decay:
      raise ConfigError(f"config.optimizer.weight_decay={weight_decay} needs name='adamw' (decoupled decay).")
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decayed)
  else:
    raise ConfigError(f"config.optimizer.name={name!r} is not known; use 'adam' or 'adamw'.")
  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  return optax.chain(*chain, opt)


def network_fn(model: nn.Module, params, *, train: bool = False, dropout_key: Array | None = None,
               low_res: Array | None = None, **cond) -> Callable[[Array, Array], Array]:
  """Binds parameters (and conditioning, dropout key) into `net(x, c) -> out`.

  `low_res` (super-resolution models, `config.data.cond_resolution`): low-resolution images
  `[B, h, w, C]`, upsampled and concatenated to x as extra input channels (`tasks.network_input`).
  """
  rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else {}

  def net(x, c):
    if low_res is not None:
      x = tasks.network_input(x, low_res)
    return model.apply({"params": params}, x, c, train=train, rngs=rngs, **cond)

  return net


def create_train_state(key: Array, *, model: nn.Module, optimizer: optax.GradientTransformation,
                       example_x: Array, ema: bool = True, params: Any = None,
                       teacher: bool = False, target: bool = False,
                       discriminator: nn.Module | None = None) -> TrainState:
  """Initial parameters (`params`, e.g. published weights, or `model`'s init), their EMA copy
  (None with `ema=False`) and optimizer state, at step 0. With `teacher=True` (distillation;
  `params` are the teacher's) the parameters are also the (first round's) teacher, and with
  `target=True` (consistency distillation or training) also the target network. With a
  `discriminator` (an autoencoder's adversarial term) it is initialised from `fold_in(key, 1)`
  and gets its own state of `optimizer`: an `AdversarialState`."""
  if params is None and isinstance(model, models.AutoencoderKL):
    params = model.init({"params": key}, example_x)["params"]
  elif params is None:
    t = jnp.zeros((example_x.shape[0],), jnp.float32)
    params = model.init({"params": key}, example_x, t, train=False)["params"]
  fields = dict(step=jnp.zeros((), jnp.int32), params=params,
                ema_params=jax.tree.map(jnp.copy, params) if ema else None, opt_state=optimizer.init(params))
  if discriminator is not None:
    disc = discriminator.init({"params": jax.random.fold_in(key, 1)}, example_x)["params"]
    return AdversarialState(**fields, disc_params=disc, disc_opt_state=optimizer.init(disc))
  if target and not teacher:
    return TargetState(**fields, target_params=jax.tree.map(jnp.copy, params))
  if target:
    return ConsistencyState(**fields, teacher_params=jax.tree.map(jnp.copy, params),
                            target_params=jax.tree.map(jnp.copy, params))
  if teacher:
    return DistillState(**fields, teacher_params=jax.tree.map(jnp.copy, params))
  return TrainState(**fields)


LABEL_DROPOUT_STREAM = 0x6C616265  # fold_in tag of the label-dropout key ("labe")


def drop_labels(key: Array, labels: Array, rate: float, null_label: int) -> Array:
  """Replaces each label by `null_label` with probability `rate` (classifier-free guidance)."""
  drop = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def microbatched_value_and_grad(objective: Callable, microbatches: int = 1) -> Callable:
  """`jax.value_and_grad(objective, has_aux=True)`, one part of the batch at a time.

  `objective(params, batch, key) -> (loss, aux)`, where `batch` is a pytree of arrays that
  share their leading (example) axis and `loss` and every leaf of `aux` are means over the
  examples. Returns `f(params, batch, key) -> ((loss, aux), grads)`: with `microbatches` m > 1
  the batch is split into m equal parts, evaluated one after another in a `lax.scan` (part i
  with `fold_in(key, i)`), and loss, aux and gradients are averaged over the parts, which is
  the full batch's mean gradient (the same update; only the random draws differ). Only one
  part's activations are alive at a time, so memory falls with m; m = 1 is `value_and_grad`.
  (`microbatched` does this for any such function.)
  """
  return microbatched(jax.value_and_grad(objective, has_aux=True), microbatches)


def microbatched(fn: Callable, microbatches: int = 1) -> Callable:
  """`fn(params, batch, key) -> out` (a pytree of means over the batch's examples, e.g. a loss
  and its gradients) evaluated on `microbatches` parts of the batch one after another and
  averaged (`microbatched_value_and_grad` explains the parts); m = 1 is `fn` itself.

  Part i holds examples i, i + m, i + 2m, ...: a batch sharded over devices along its first
  axis splits into parts that are each spread over all devices (each device's share must be
  divisible by m: `sharding.check_batch_size(..., microbatches=m)`). Each part's gradient is
  reduced over the devices, so on a multi-device mesh m parts cost m gradient reductions.
  """
  if microbatches == 1:
    return fn
  if microbatches < 1:
    raise ConfigError(f"config.training.microbatches={microbatches} must be >= 1.")
  m = microbatches

  def split(x):
    if x.shape[0] % m:
      raise ConfigError(f"config.training.microbatches={m} does not divide the batch of {x.shape[0]} "
                        f"examples; use a batch size that is a multiple of {m}.")
    return jnp.moveaxis(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 1, 0)

  def f(params, batch, key):
    parts = jax.tree.map(split, batch)

    def body(total, i_part):
      i, part = i_part
      out = fn(params, part, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda x: x[0], parts)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, params, first, key))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(m), parts))
    return jax.tree.map(lambda t: t / m, total)

  return f


def _network_inputs(batch: dict[str, Array], key: Array, *, model: nn.Module, label_dropout: float,
                    cond_resolution: int) -> dict[str, Array]:
  """`x` and the conditioning a denoising network sees: labels (some dropped to the null label
  for classifier-free guidance) and, for super-resolution, the area-downsampled batch."""
  inputs = {"x": batch["x"]}
  if cond_resolution:
    inputs["low_res"] = tasks.area_downsample(batch["x"], cond_resolution)
  if "label" in batch:
    labels = batch["label"]
    if label_dropout > 0.0:
      null_label = getattr(model, "num_classes", 0)
      if not null_label:
        raise ConfigError(f"config.training.label_dropout={label_dropout} needs a class-conditional model "
                          f"(config.model.num_classes > 0); {type(model).__name__} has none.")
      labels = drop_labels(jax.random.fold_in(key, LABEL_DROPOUT_STREAM), labels, label_dropout, null_label)
    inputs["y"] = labels
  if "noise" in batch:  # reflow's fixed pairs: the noise each x came from
    inputs["noise"] = batch["noise"]
  return inputs


def train_step(state: TrainState, batch: dict[str, Array], key: Array, *, model: nn.Module,
               loss_fn: Callable, optimizer: optax.GradientTransformation,
               ema_decay: float, label_dropout: float = 0.0,
               cond_resolution: int = 0, microbatches: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update. Pure: `(state, batch, key) -> (state, metrics)`.

  A batch with "label" trains a class-conditional `model` (`num_classes > 0`); with
  `label_dropout > 0` each label becomes the null label `model.num_classes` with that
  probability (key: `fold_in(key, LABEL_DROPOUT_STREAM)`), which trains the unconditional
  model classifier-free guidance needs alongside the conditional one. With
  `cond_resolution > 0` (super-resolution) the network also sees the batch area-downsampled
  to that size, computed here on the device. `microbatches` m > 1 computes the gradient over
  m parts of the batch one at a time (`microbatched_value_and_grad`): the same update with
  1/m of the activation memory.
  """
  inputs = _network_inputs(batch, key, model=model, label_dropout=label_dropout, cond_resolution=cond_resolution)

  def objective(params, inputs, key):
    k_loss, k_drop = jax.random.split(key)
    cond = {k: v for k, v in inputs.items() if k != "x"}
    net = network_fn(model, params, train=True, dropout_key=k_drop, **cond)
    loss, _ = loss_fn(net, inputs["x"], k_loss)
    return loss, {}

  (loss, _), grads = microbatched_value_and_grad(objective, microbatches)(state.params, inputs, key)
  return apply_gradients(state, grads, optimizer=optimizer, ema_decay=ema_decay), {
      "loss": loss, "grad_norm": optax.tree.norm(grads)}


def next_distillation_round(state: DistillState, optimizer: optax.GradientTransformation) -> DistillState:
  """The student (its EMA, if kept) becomes the teacher and the new student starts from it, with a
  fresh EMA and optimizer state (Salimans & Ho, Algorithm 2: eta <- theta)."""
  new = state.params if state.ema_params is None else state.ema_params
  return state.replace(params=new, ema_params=None if state.ema_params is None else new,
                       opt_state=optimizer.init(new), teacher_params=new)


def distill_train_step(state: DistillState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                       loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float,
                       teacher_steps: int, steps_per_round: int, label_dropout: float = 0.0,
                       cond_resolution: int = 0, microbatches: int = 1) -> tuple[DistillState, dict[str, Array]]:
  """One update of progressive distillation's student. Pure: `(state, batch, key) -> (state, metrics)`.

  Update `state.step` belongs to round r = step // steps_per_round, in which the student learns
  to take `teacher_steps / 2^(r + 1)` DDIM steps where `state.teacher_params` takes twice as many
  (`loss_fn = losses.make_distillation_loss(...)`). The first update of each round after the
  first starts it (`next_distillation_round`, under `lax.cond`). The teacher sees the same
  conditioning as the student (labels, with the same ones dropped; low-res images) and no
  dropout. Metrics add `student_steps`.
  """
  if not isinstance(state, DistillState):
    raise ConfigError("distill_train_step needs a DistillState (create_train_state(..., teacher=True) from the "
                      "teacher's parameters).")
  starts_round = (state.step > 0) & (state.step % steps_per_round == 0)
  state = jax.lax.cond(starts_round, functools.partial(next_distillation_round, optimizer=optimizer),
                       lambda s: s, state)
  n = distill.student_steps(teacher_steps, state.step, steps_per_round)
  state, metrics = _student_update(
      state, batch, key, lambda net, bind, params, x, k: loss_fn(net, bind(state.teacher_params), x, k, n),
      model=model, optimizer=optimizer, ema_decay=ema_decay, label_dropout=label_dropout,
      cond_resolution=cond_resolution, microbatches=microbatches)
  return state, {**metrics, "student_steps": n.astype(jnp.float32)}


def _student_update(state: TrainState, batch: dict[str, Array], key: Array, loss_call: Callable, *,
                    model: nn.Module, optimizer: optax.GradientTransformation, ema_decay: float,
                    label_dropout: float, cond_resolution: int, microbatches: int,
                    aux_metrics: tuple[str, ...] = ()) -> tuple[TrainState, dict]:
  """A student's update (distillation, consistency training): `loss_call(net, bind, params, x, key)
  -> (loss, aux)` sees the student `net` (with dropout) and `bind(p, same_dropout=False)`, which
  binds other parameters (teacher, target) to the same network with the student's conditioning
  (labels, with the same ones dropped; low-res images), without dropout or, with
  `same_dropout=True`, with the student's dropout mask. Metrics add aux's `aux_metrics` entries.
  A batch with "noise" (reflow's fixed pairs) passes it on: `loss_call(..., noise=...)`."""
  inputs = _network_inputs(batch, key, model=model, label_dropout=label_dropout, cond_resolution=cond_resolution)

  def objective(params, inputs, key):
    k_loss, k_drop = jax.random.split(key)
    cond = {k: v for k, v in inputs.items() if k not in ("x", "noise")}
    net = network_fn(model, params, train=True, dropout_key=k_drop, **cond)

    def bind(p, same_dropout=False):
      return network_fn(model, p, train=same_dropout, dropout_key=k_drop, **cond)

    extra = {"noise": inputs["noise"]} if "noise" in inputs else {}
    loss, aux = loss_call(net, bind, params, inputs["x"], k_loss, **extra)
    return loss, {k: aux[k] for k in aux_metrics}

  (loss, aux), grads = microbatched_value_and_grad(objective, microbatches)(state.params, inputs, key)
  return apply_gradients(state, grads, optimizer=optimizer, ema_decay=ema_decay), {
      "loss": loss, "grad_norm": optax.tree.norm(grads), **aux}


def _metric_kw(metric_params: Any) -> dict[str, Any]:
  """A consistency loss's `metric_params` keyword, only when there are some (a loss_fn of your
  own need not take it)."""
  return {} if metric_params is None else {"metric_params": metric_params}


def _move_target(new: TrainState, old: TrainState, target_decay: float) -> TrainState:
  """The target network's EMA step towards the updated student: theta^- <- decay theta^- + (1 - decay) theta."""
  return new.replace(target_params=optax.incremental_update(new.params, old.target_params,
                                                            step_size=1.0 - target_decay))


def consistency_train_step(state: DistillState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                           loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float,
                           target_decay: float = 0.0, label_dropout: float = 0.0, cond_resolution: int = 0,
                           microbatches: int = 1, metric_params: Any = None) -> tuple[DistillState, dict[str, Array]]:
  """One update of a consistency-distillation student. Pure: `(state, batch, key) -> (state, metrics)`.

  `loss_fn = losses.make_consistency_loss(...)` sees the student (with dropout), the target
  network (`state.target_params` of a `ConsistencyState`, which then moves towards the updated
  student at rate `1 - target_decay`; the student's own parameters with a `DistillState` and
  `target_decay=0`) and the fixed teacher `state.teacher_params`; the last two without dropout,
  all three with the student's conditioning (labels, with the same ones dropped; low-res images).
  `metric_params`: the loss's frozen metric network (LPIPS weights, `frozen_inputs`).
  """
  has_target = isinstance(state, ConsistencyState)
  if not isinstance(state, DistillState) or has_target != bool(target_decay):
    need = "a ConsistencyState (create_train_state(..., teacher=True, target=True))" if target_decay else \
        "a DistillState (create_train_state(..., teacher=True))"
    raise ConfigError(f"consistency_train_step with target_decay={target_decay} needs {need} from the teacher's "
                      f"parameters; it got a {type(state).__name__}.")

  def loss_call(net, bind, params, x, k):
    return loss_fn(net, bind(state.target_params if has_target else params), bind(state.teacher_params), x, k,
                   **_metric_kw(metric_params))

  new, metrics = _student_update(state, batch, key, loss_call, model=model, optimizer=optimizer,
                                 ema_decay=ema_decay, label_dropout=label_dropout, cond_resolution=cond_resolution,
                                 microbatches=microbatches)
  return (_move_target(new, state, target_decay) if has_target else new), metrics


def consistency_training_step(state: TrainState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                              loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float,
                              target_decay: float = 0.0, label_dropout: float = 0.0, cond_resolution: int = 0,
                              microbatches: int = 1, metric_params: Any = None) -> tuple[TrainState, dict[str, Array]]:
  """One update of consistency training (no teacher). Pure: `(state, batch, key) -> (state, metrics)`.

  `loss_fn = losses.make_consistency_training_loss(...)` sees the student and the target network
  (`state.target_params` of a `TargetState`, which then moves towards the updated student at rate
  `1 - target_decay`; the student's own parameters with a `TrainState` and `target_decay=0`),
  both with the same conditioning and the same dropout mask (a dropout key shared by the two, as
  Song et al.'s and Song & Dhariwal's training do: the two evaluations differ only in their
  input), and `state.step`, which sets the grid's size. Metrics add `num_scales`.
  `metric_params`: the loss's frozen metric network (LPIPS weights, `frozen_inputs`).
  """
  has_target = isinstance(state, TargetState)
  if has_target != bool(target_decay) or isinstance(state, DistillState):
    need = "a TargetState (create_train_state(..., target=True))" if target_decay else "a TrainState"
    raise ConfigError(f"consistency_training_step with target_decay={target_decay} needs {need}; it got a "
                      f"{type(state).__name__}.")

  def loss_call(net, bind, params, x, k):
    return loss_fn(net, bind(state.target_params if has_target else params, same_dropout=True), x, k, state.step,
                   **_metric_kw(metric_params))

  new, metrics = _student_update(state, batch, key, loss_call, model=model, optimizer=optimizer,
                                 ema_decay=ema_decay, label_dropout=label_dropout, cond_resolution=cond_resolution,
                                 microbatches=microbatches, aux_metrics=("num_scales",))
  return (_move_target(new, state, target_decay) if has_target else new), metrics


def reflow_train_step(state: TrainState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                      loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float,
                      label_dropout: float = 0.0, cond_resolution: int = 0,
                      microbatches: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One update of a reflow student. Pure: `(state, batch, key) -> (state, metrics)`.

  `loss_fn = losses.make_reflow_loss(...)`: the fixed teacher `state.teacher_params` samples
  from fresh noise with the student's conditioning (labels, with the same ones dropped, so a
  class-conditional student keeps its unconditional half), and the student learns the pairs.
  A batch with "noise" is a batch of fixed pairs (`write_reflow_pairs`: x is the teacher's
  sample from that noise, for its "label", already dropped where the teacher sampled without
  one): the student learns them and the teacher is not run (nor are labels dropped again), so
  any TrainState will do; a run on fixed pairs keeps no teacher in its state.
  """
  if "noise" not in batch and not isinstance(state, DistillState):
    raise ConfigError("reflow_train_step on fresh pairs needs a DistillState (create_train_state(..., teacher=True) "
                      f"from the teacher's parameters); it got a {type(state).__name__}.")
  if "noise" in batch:
    label_dropout = 0.0

  def loss_call(net, bind, params, x, k, noise=None):
    del params  # the student's: only `net` uses them
    if noise is not None:
      return loss_fn(net, None, x, k, noise=noise)
    return loss_fn(net, bind(state.teacher_params), x, k)

  return _student_update(state, batch, key, loss_call, model=model, optimizer=optimizer, ema_decay=ema_decay,
                         label_dropout=label_dropout, cond_resolution=cond_resolution, microbatches=microbatches)


def train_steps(state: TrainState, batches: tuple[dict[str, Array], ...], key: Array, *,
                step_fn: Callable) -> tuple[TrainState, dict[str, Array]]:
  """`len(batches)` steps of `step_fn(state, batch, key)` in one `lax.scan`.

  Step i draws with `fold_in(key, state.step)`, as the training loop's single steps do, so a
  run gives the same numbers for any `config.training.steps_per_call`. Returns the state
  after the last step and each metric stacked over the steps ([len(batches)]).
  """
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  def body(s, batch):
    return step_fn(s, batch, jax.random.fold_in(key, s.step))

  return jax.lax.scan(body, state, stacked)


def run_steps(state: TrainState, batches, key: Array, frozen: dict[str, Any], *, step_fn: Callable,
              n: int) -> tuple[TrainState, dict[str, Array]]:
  """The training loop's jitted program: one `step_fn(state, batch, key)` (n = 1; `batches` is the
  batch) or `train_steps` over n batches, with the `frozen_inputs` as `step_fn`'s keywords."""
  step = functools.partial(step_fn, **frozen)
  return step(state, batches, key) if n == 1 else train_steps(state, batches, key, step_fn=step)


def classifier_train_step(state: TrainState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                          loss_fn: Callable, optimizer: optax.GradientTransformation,
                          ema_decay: float, microbatches: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One update of a noise-conditional classifier (`losses.make_classifier_loss`). Pure."""

  def objective(params, batch, key):
    k_loss, k_drop = jax.random.split(key)
    net = network_fn(model, params, train=True, dropout_key=k_drop)
    loss, aux = loss_fn(net, batch["x"], batch["label"], k_loss)
    return loss, {"accuracy": aux["accuracy"]}  # (the per-example entries do not average)

  inputs = {"x": batch["x"], "label": batch["label"]}
  (loss, aux), grads = microbatched_value_and_grad(objective, microbatches)(state.params, inputs, key)
  return apply_gradients(state, grads, optimizer=optimizer, ema_decay=ema_decay), {
      "loss": loss, "grad_norm": optax.tree.norm(grads), "accuracy": aux["accuracy"]}


def autoencoder_train_step(state: TrainState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                           loss_fn: Callable, optimizer: optax.GradientTransformation, ema_decay: float,
                           microbatches: int = 1, metric_params: Any = None) -> tuple[TrainState, dict[str, Array]]:
  """One update of a KL autoencoder (`losses.make_autoencoder_loss`; the posterior sample draws
  from `key`; `metric_params`: LPIPS weights of a perceptual term). Pure."""

  def objective(params, batch, key):
    return loss_fn(lambda x, k: model.apply({"params": params}, x, k), batch["x"], key, metric_params)

  (loss, aux), grads = microbatched_value_and_grad(objective, microbatches)(state.params, {"x": batch["x"]}, key)
  return apply_gradients(state, grads, optimizer=optimizer, ema_decay=ema_decay), {
      "loss": loss, "grad_norm": optax.tree.norm(grads), **aux}


def decoder_last_layer(tree: Any) -> Array:
  """The leaf of an `AutoencoderKL` tree (parameters or gradients) at the decoder's last
  convolution's kernel: where the adversarial weight compares gradients (Esser et al.)."""
  return tree["decoder"]["conv_out"]["kernel"]


def adversarial_autoencoder_train_step(
    state: AdversarialState, batch: dict[str, Array], key: Array, *, model: nn.Module, discriminator: nn.Module,
    objective: Callable, optimizer: optax.GradientTransformation, ema_decay: float, disc_weight: float,
    disc_start: int, microbatches: int = 1, metric_params: Any = None,
    adversarial: bool | None = None) -> tuple[AdversarialState, dict[str, Array]]:
  """One update of a KL autoencoder and its patch discriminator: LDM's objective (Rombach et al.
  2022, after Esser et al. 2021). Pure.

  The autoencoder minimises `objective(x, recon, mean, logvar)` (`losses.make_autoencoder_objective`:
  reconstruction, perceptual and KL terms) + w * (-mean D(recon)), with the adaptive weight w =
  `disc_weight` * ||grad L_rec|| / ||grad L_adv|| at the decoder's last layer
  (`losses.adaptive_adversarial_weight`). One forward pass serves both gradients (`jax.vjp`,
  pulled back twice). The discriminator takes one step of the hinge loss
  (`losses.hinge_discriminator_loss`) on the batch and its reconstructions, with its own state of
  `optimizer`; both use the parameters from before this step. Before update `disc_start` the
  autoencoder takes the plain objective's gradient and the discriminator and its optimizer state
  stand still.

  `adversarial` fixes the phase when the program is built: None compares `state.step` with
  `disc_start` inside the program (both phases are computed then and selected with `jnp.where`,
  because a `lax.cond` that skipped the discriminator ran each step 15-30x slower on XLA:CPU, so
  every warm-up step pays for the discriminator); False is the warm-up update and never evaluates
  the discriminator; True is the adversarial update whatever the step. The training loop
  compiles False and True and switches at `disc_start`. Metrics: the autoencoder's `loss` and
  terms, `generator_loss` (-mean D(recon)), `adversarial_weight` (w), `discriminator_loss`,
  `logits_real`, `logits_fake`, `grad_norm`, `disc_grad_norm` (0 before `disc_start`).
  """
  if not isinstance(state, AdversarialState):
    raise ConfigError("adversarial_autoencoder_train_step needs an AdversarialState "
                      "(create_train_state(..., discriminator=...)).")
  if adversarial is False:
    return _warmup_autoencoder_step(state, batch, key, model=model, objective=objective, optimizer=optimizer,
                                    ema_decay=ema_decay, microbatches=microbatches, metric_params=metric_params)
  if adversarial is None:
    on = state.step >= disc_start
    select = lambda a, b: jax.tree.map(lambda u, v: jnp.where(on, u, v), a, b)  # noqa: E731
  else:
    select = lambda a, b: a  # noqa: E731
  off = lambda v: select(v, jnp.zeros_like(v))  # noqa: E731  (0 before disc_start)

  def grads_fn(params, batch, key):
    ae_params, d_params = params
    x = batch["x"]

    def forward(p):
      recon, mean, logvar = model.apply({"params": p}, x, key)
      loss, aux = objective(x, recon, mean, logvar, metric_params)
      adversarial = -jnp.mean(discriminator.apply({"params": d_params}, recon))
      return (loss, adversarial), (aux, recon)

    (loss, adversarial), pullback, (aux, recon) = jax.vjp(forward, ae_params, has_aux=True)
    one, zero = jnp.ones_like(loss), jnp.zeros_like(loss)
    (g_rec,), (g_adv,) = pullback((one, zero)), pullback((zero, one))
    w = off(disc_weight * losses.adaptive_adversarial_weight(decoder_last_layer(g_rec), decoder_last_layer(g_adv)))
    g_ae = jax.tree.map(lambda a, b: a + w.astype(b.dtype) * b, g_rec, g_adv)

    def disc_objective(dp):
      real, fake = jnp.split(discriminator.apply({"params": dp}, jnp.concatenate(
          [x, jax.lax.stop_gradient(recon).astype(x.dtype)])), 2)
      return losses.hinge_discriminator_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

    (d_loss, (real, fake)), g_d = jax.value_and_grad(disc_objective, has_aux=True)(d_params)
    metrics = {"loss": loss + w * adversarial, **aux, "generator_loss": off(adversarial), "adversarial_weight": w,
               "discriminator_loss": off(d_loss), "logits_real": off(real), "logits_fake": off(fake)}
    return metrics, (g_ae, jax.tree.map(off, g_d))

  metrics, (g_ae, g_d) = microbatched(grads_fn, microbatches)((state.params, state.disc_params),
                                                              {"x": batch["x"]}, key)
  new = apply_gradients(state, g_ae, optimizer=optimizer, ema_decay=ema_decay)
  updates, disc_opt_state = optimizer.update(g_d, state.disc_opt_state, state.disc_params)
  disc_params = optax.apply_updates(state.disc_params, updates)
  # the discriminator and its optimizer stand still until disc_start
  new = new.replace(disc_params=select(disc_params, state.disc_params),
                    disc_opt_state=select(disc_opt_state, state.disc_opt_state))
  return new, {**metrics, "grad_norm": optax.tree.norm(g_ae), "disc_grad_norm": optax.tree.norm(g_d)}


# the adversarial step's metrics that are 0 before disc_start
_ADVERSARIAL_METRICS = ("generator_loss", "adversarial_weight", "discriminator_loss", "logits_real", "logits_fake",
                        "disc_grad_norm")


def _warmup_autoencoder_step(state: AdversarialState, batch: dict[str, Array], key: Array, *, model: nn.Module,
                             objective: Callable, optimizer: optax.GradientTransformation, ema_decay: float,
                             microbatches: int, metric_params: Any) -> tuple[AdversarialState, dict[str, Array]]:
  """`adversarial_autoencoder_train_step` before `disc_start` without the discriminator in the
  program: `autoencoder_train_step` on the plain objective (the discriminator's state is passed
  through), with the adversarial metrics at 0."""
  new, metrics = autoencoder_train_step(
      state, batch, key, model=model, loss_fn=lambda ae, x, k, mp: objective(x, *ae(x, k), mp), optimizer=optimizer,
      ema_decay=ema_decay, microbatches=microbatches, metric_params=metric_params)
  return new, {**metrics, **dict.fromkeys(_ADVERSARIAL_METRICS, jnp.zeros_like(metrics["loss"]))}


def apply_gradients(state: TrainState, grads, *, optimizer: optax.GradientTransformation,
                    ema_decay: float) -> TrainState:
  """The optimizer update and the EMA of the parameters: the end of every train step."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = (None if state.ema_params is None
         else optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay))
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


# --------------------------------------------------------------------------------------
# Building everything from a config
# --------------------------------------------------------------------------------------


@struct.dataclass
class Experiment:
  """The objects a config describes (built once, shared by training and sampling)."""

  model: nn.Module = struct.field(pytree_node=False)
  process: processes.Process
  prediction: str = struct.field(pytree_node=False)
  data_spec: data_lib.DataSpec = struct.field(pytree_node=False)
  centered: bool = struct.field(pytree_node=False)
  cond_resolution: int = struct.field(pytree_node=False, default=0)  # low-res side (super-resolution)
  latent: latent_lib.LatentSpace | None = struct.field(pytree_node=False, default=None)  # latent diffusion
  # a consistency model (distilled or trained: consistency_sigma_data): its c_skip's sigma_data; None: a diffusion model
  consistency_sigma_data: float | None = struct.field(pytree_node=False, default=None)
  # an autoencoder's patch discriminator (config.loss.disc_weight > 0); None: no adversarial term
  discriminator: nn.Module | None = struct.field(pytree_node=False, default=None)

  @property
  def shape(self) -> tuple[int, ...]:
    """One example of what the network sees: the data's shape, or the latents' (latent diffusion)."""
    return tuple(self.latent.shape if self.latent is not None else self.data_spec.shape)

  @property
  def data_range(self) -> tuple[float, float] | None:
    """The range a denoised estimate is clipped to: pixel images' [-1, 1] (or [0, 1] uncentred);
    None for vector data and latents, which are unbounded."""
    if not self.data_spec.is_image or self.latent is not None:
      return None
    return (-1.0 if self.centered else 0.0, 1.0)

  @property
  def num_classes(self) -> int:
    """Classes of a class-conditional model or classifier (0: unconditional)."""
    return int(getattr(self.model, "num_classes", 0))

  @property
  def is_classifier(self) -> bool:
    """A noise-conditional classifier (trained with cross-entropy, used for guidance)."""
    return isinstance(self.model, models.NoiseClassifier)

  @property
  def is_autoencoder(self) -> bool:
    """Latent diffusion's KL autoencoder (trained on reconstruction + KL; encodes for latent runs)."""
    return isinstance(self.model, models.AutoencoderKL)


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  config_lib.validate(config)
  d = config.data
  spec = data_lib.spec(d.dataset, d.resolution, d.num_channels, data_dir=d.data_dir or None,
                       use_labels=d.use_labels)
  model_kwargs = config.model.to_dict()
  cond_resolution = int(d.get("cond_resolution", 0))
  if cond_resolution:  # input: x and the upsampled low-res image (2C channels); output: C
    model_kwargs.setdefault("out_channels", d.num_channels)
  model = models.create_model(**model_kwargs)
  process = processes.get_process(**config.process.to_dict())
  space = latent_lib.latent_space(tuple(spec.shape), **config.latent.to_dict())
  exp = Experiment(model=model, process=process, prediction=config.loss.prediction,
                   data_spec=spec, centered=bool(config.data.centered), cond_resolution=cond_resolution,
                   latent=space, consistency_sigma_data=consistency_sigma_data(config),
                   discriminator=make_discriminator(config))
  if d.use_labels and not exp.num_classes:
    raise ConfigError(f"config.data.use_labels=True but config.model.num_classes=0 (an unconditional "
                      f"model); set --config.model.num_classes={spec.num_classes or 'K'} to condition on "
                      f"the labels, or --config.data.use_labels=False.")
  if exp.num_classes and spec.num_classes > 0 and spec.num_classes != exp.num_classes:
    raise ConfigError(f"config.model.num_classes={exp.num_classes} but {d.dataset!r} has {spec.num_classes} "
                      f"classes; set --config.model.num_classes={spec.num_classes}.")
  return exp


def make_discriminator(config: ml_collections.ConfigDict) -> nn.Module | None:
  """An autoencoder's patch discriminator (`config.loss.disc_weight > 0`, `disc_features` wide,
  `disc_layers` deep), else None."""
  c = config.loss
  if config.model.name != "autoencoder" or not float(c.get("disc_weight", 0.0)):
    return None
  from jaxdiff.models.discriminator import PatchDiscriminator

  m = config.model  # the autoencoder's compute and parameter dtypes
  disc = PatchDiscriminator(features=int(c.disc_features), num_layers=int(c.disc_layers),
                            dtype=models.resolve_dtype(m.dtype, "config.model.dtype"),
                            param_dtype=models.resolve_dtype(m.param_dtype, "config.model.param_dtype"))
  disc.check()
  return disc


def make_loss(config: ml_collections.ConfigDict, process: processes.Process, *,
              data_range: tuple[float, float] | None = None):
  """The objective `config` describes: denoising, cross-entropy for `model.name='classifier'`,
  the autoencoder's, consistency training's (`config.loss.objective='consistency'`), or
  progressive, consistency or reflow distillation's (the teacher's x0 clipped to `data_range`,
  `Experiment.data_range`, with `config.distill.clip_teacher`)."""
  if config.model.name == "classifier":
    return losses.make_classifier_loss(process, t_sampling=config.loss.t_sampling)
  lpips_res = _lpips_resolution(config)
  if config.model.name == "autoencoder":
    return losses.make_autoencoder_loss(**_autoencoder_kwargs(config, data_range))
  if consistency_training(config):
    c = config.loss
    lognormal = {k: float(c[k]) for k in ("p_mean", "p_std") if k in c}  # else iCT's -1.1, 2.0
    return losses.make_consistency_training_loss(
        process, prediction=c.prediction, num_steps=int(config.training.num_steps), scales=tuple(c.scales),
        metric=c.metric, weighting=c.weighting, t_sampling=c.t_sampling, sigma_data=float(c.sigma_data),
        reduce=c.reduce, lpips_resolution=lpips_res, data_range=data_range, **lognormal)
  if distill.enabled(config):
    clip = data_range if config.distill.clip_teacher else None
    d = config.distill
    if distill.method(config) == "reflow":  # the denoising loss, on pairs of noise and teacher samples
      return losses.make_reflow_loss(process, solver=d.solver, num_steps=int(d.teacher_steps), clip=clip,
                                     **_denoising_kwargs(config))
    if distill.method(config) == "consistency":
      return losses.make_consistency_loss(process, prediction=config.loss.prediction, num_scales=int(d.num_scales),
                                          solver=d.solver, metric=d.metric, sigma_data=float(d.sigma_data),
                                          reduce=config.loss.reduce, clip=clip,
                                          lpips_resolution=lpips_res, data_range=data_range)
    return losses.make_distillation_loss(process, prediction=config.loss.prediction,
                                         weighting=config.distill.weighting, reduce=config.loss.reduce, clip=clip)
  return losses.make_denoising_loss(process, **_denoising_kwargs(config))


REFLOW_PAIRS_STREAM = 0x70616972  # fold_in tag of reflow's fixed pairs' keys ("pair")
# pairs.json entries that must match the run that reads the pairs
_PAIRS_MATCH = ("teacher", "solver", "teacher_steps", "clip_teacher", "prediction", "shape", "use_labels",
                "label_dropout")


def reflow_pairs_dir(config: ml_collections.ConfigDict) -> str:
  """The directory of a reflow run's fixed pairs (`config.distill.pairs`), '' for fresh pairs every batch."""
  if distill.method(config) != "reflow":
    return ""
  return os.path.abspath(str(config.distill.pairs)) if config.distill.get("pairs") else ""


def _pairs_meta(config: ml_collections.ConfigDict, exp: Experiment) -> dict[str, Any]:
  d = config.distill
  run, _ = evaluate.split_run(str(d.teacher))  # the same run however its path is written (its step: below)
  return {"teacher": os.path.abspath(run), "solver": str(d.solver), "teacher_steps": int(d.teacher_steps),
          "clip_teacher": bool(d.clip_teacher), "prediction": str(config.loss.prediction), "shape": list(exp.shape),
          "use_labels": bool(exp.num_classes),
          "label_dropout": float(config.training.label_dropout) if exp.num_classes else 0.0}


def _teacher_step(teacher: str) -> int | None:
  """The checkpoint step `config.distill.teacher` names ('<workdir>@<step>', or the run's latest)."""
  workdir, step = evaluate.split_run(teacher)
  if step is not None:
    return step
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(generate.load_config(workdir), workdir), async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def write_reflow_pairs(config: ml_collections.ConfigDict, exp: Experiment, mesh, abstract_params: Any,
                       directory: str) -> tuple[dict[str, Any], tuple[int, Any] | None]:
  """Makes reflow's fixed pairs in `directory` unless it holds them. Returns their `pairs.json`
  and, if it loaded the teacher to make them, `(its step, its parameters)` (the student starts
  from them), else None.

  `config.distill.num_pairs` draws of fresh noise x_T, each carried to the teacher's sample by
  its deterministic sampler (`losses.make_reflow_coupling`, as the on-the-fly loss does), in
  sharded batches of `config.training.batch_size`. A class-conditional teacher samples for
  uniform labels, `config.training.label_dropout` of them dropped to the null label (the
  student learns those pairs unconditionally, as it would fresh ones). Keys: `fold_in(key(seed),
  REFLOW_PAIRS_STREAM)`, then the batch index. Stored as `config.distill.pairs_dtype`. Pairs
  already there must come from the same teacher run and checkpoint step, sampler and shapes
  (ConfigError names what differs). The batches are written as they are made
  (`data.pairs.PairsWriter`): an interrupted run started again continues after the last one
  written, and makes the same pairs as one uninterrupted.
  """
  want = _pairs_meta(config, exp)
  meta = sharding.main_process_value(data_lib.pairs.read_meta(directory))
  if meta is not None:
    for k in _PAIRS_MATCH:
      if meta.get(k) != want[k]:
        raise ConfigError(f"config.distill.pairs={directory!r} holds pairs made with {k}={meta.get(k)!r}, but this "
                          f"run has {want[k]!r}; point config.distill.pairs at a new directory (they are made "
                          f"there) or remove that one.")
    now = _teacher_step(str(config.distill.teacher))
    if now != meta.get("teacher_step"):
      raise ConfigError(f"config.distill.pairs={directory!r} was made from step {meta.get('teacher_step')} of "
                        f"{meta['teacher']}, but config.distill.teacher={config.distill.teacher!r} is step {now}: pin "
                        f"the teacher with --config.distill.teacher={meta['teacher']}@{meta.get('teacher_step')}, or "
                        f"make new pairs in a new directory.")
    num = int(config.distill.num_pairs)
    if num and num != meta["num_pairs"]:
      raise ConfigError(f"config.distill.num_pairs={num} but {directory!r} holds {meta['num_pairs']} pairs; set "
                        f"--config.distill.num_pairs={meta['num_pairs']} (or 0: use what is there), or use a new "
                        f"directory.")
    stored, asked = meta.get("dtype", "float32"), str(config.distill.get("pairs_dtype", "float32"))
    log.info("Reflow on the %d fixed pairs in %s (stored as %s%s).", meta["num_pairs"], directory, stored,
             f"; config.distill.pairs_dtype={asked} applies to pairs made anew" if asked != stored else "")
    check_pairs_visible(directory)
    return meta, None
  d, tc = config.distill, config.training
  num = int(d.num_pairs)
  if num < 1:
    raise ConfigError(f"config.distill.pairs={directory!r} holds no pairs yet and config.distill.num_pairs={num}: "
                      f"set how many the teacher should make, e.g. --config.distill.num_pairs=100000.")
  teacher_step, params = distill.load_teacher(config, mesh, abstract_params)
  couple = losses.make_reflow_coupling(exp.process, prediction=config.loss.prediction, solver=d.solver,
                                       num_steps=int(d.teacher_steps),
                                       clip=exp.data_range if d.clip_teacher else None)
  batch, shape = int(tc.batch_size), tuple(exp.shape)

  def make(params, key):
    k_eps, k_y, k_drop = jax.random.split(key, 3)
    cond = {}
    if exp.num_classes:
      labels = jax.random.randint(k_y, (batch,), 0, exp.num_classes)
      cond["y"] = drop_labels(k_drop, labels, want["label_dropout"], exp.num_classes)
    x_T = exp.process.prior_std * jax.random.normal(k_eps, (batch, *shape))
    x_T = jax.lax.with_sharding_constraint(x_T, sharding.batch_sharding(mesh, 1 + len(shape)))
    out = {"noise": x_T, "x": couple(network_fn(exp.model, params, **cond), x_T, k_eps)}
    if exp.num_classes:
      out["label"] = cond["y"]
    return out

  out_sh = {k: sharding.batch_sharding(mesh, 1 + len(shape)) for k in ("noise", "x")}
  if exp.num_classes:
    out_sh["label"] = sharding.batch_sharding(mesh, 1)
  step = aot.AotJit(jax.jit(make, out_shardings=out_sh), name="reflow_pairs")
  root = jax.random.fold_in(jax.random.key(config.seed), REFLOW_PAIRS_STREAM)
  n_batches = -(-num // batch)
  # what makes the rows: a rerun continues unfinished pairs only if it would make the same ones
  made = dict(want, teacher_step=int(teacher_step), seed=int(config.seed), batch_size=batch)
  dtype = str(d.get("pairs_dtype", "float32"))
  writer = (data_lib.pairs.PairsWriter(directory, num_pairs=num, shape=shape, labels=bool(exp.num_classes),
                                       made=made, dtype=dtype) if sharding.is_main_process() else None)
  if writer is not None and writer.discarded:
    log.warning("Removed the unfinished reflow pairs in %s and began again: %s.", writer.partial, writer.discarded)
  start = sharding.main_process_value(-(-writer.filled // batch) if writer is not None else 0)
  log.info("Making %d reflow pairs in %s: %d batches of %d, the teacher's (step %d) %s sampler with %d grid times%s.",
           num, directory, n_batches, batch, teacher_step, d.solver, d.teacher_steps,
           f"; continuing after the {start} batches already made" if start else "")
  t0 = time.time()
  try:
    for i in range(start, n_batches):
      chunk = {k: sharding.to_host(v) for k, v in step(params, jax.random.fold_in(root, i)).items()}
      if writer is not None:
        writer.add(chunk)
      if (i + 1) % max(1, n_batches // 10) == 0 or i + 1 == n_batches:
        log.info("Reflow pairs: %d/%d batches (%s).", i + 1, n_batches, _fmt_time(time.time() - t0))
  except BaseException:
    if writer is not None and writer.filled:
      log.warning("Stopped with %d of %d reflow pairs made; they are kept in %s, and the same run started again "
                  "continues from there.", writer.filled, num, writer.partial)
    raise
  meta = dict(made, dtype=dtype, seconds=round(time.time() - t0, 1), resumed_from=start * batch)
  if writer is not None:
    writer.close(meta)
  sharding.main_process_value(True)  # every host waits until process 0 has written them
  check_pairs_visible(directory)
  return dict(meta, num_pairs=num), (teacher_step, params)


def check_pairs_visible(directory: str) -> None:
  """DataError unless this process sees the complete pairs in `directory` (process 0 writes them
  and every host reads them: a host-local disk holds them on one host only)."""
  if data_lib.pairs.read_meta(directory) is None:
    raise DataError(f"config.distill.pairs={directory!r}: process {jax.process_index()} of {jax.process_count()} "
                    f"does not see the pairs process 0 wrote there; every host reads them, so put them on a "
                    f"filesystem all hosts mount (NFS, Filestore, a gcsfuse bucket).")


# config.loss keys of consistency training alone (objective='consistency')
CT_KEYS = ("objective", "scales", "metric", "sigma_data", "target_decay")


def consistency_training(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` trains a consistency model from data (`config.loss.objective='consistency'`)."""
  return config.loss.get("objective", "denoising") == "consistency"


def consistency_sigma_data(config: ml_collections.ConfigDict) -> float | None:
  """The sigma_data of a consistency model's c_skip (trained or distilled); None for a diffusion model."""
  if consistency_training(config):
    return float(config.loss.sigma_data)
  return distill.consistency_sigma_data(config)


# config.loss keys of the autoencoder alone (model.name='autoencoder')
AUTOENCODER_KEYS = ("kl_weight", "reconstruction", "perceptual_weight", "disc_weight", "disc_start", "disc_features",
                    "disc_layers")


def _lpips_resolution(config: ml_collections.ConfigDict) -> int:
  """The side an LPIPS metric or perceptual term resizes images to (config.lpips; 0: their own)."""
  return int(config.get("lpips", {}).get("resolution", 224))


def _autoencoder_kwargs(config: ml_collections.ConfigDict, data_range: tuple[float, float] | None) -> dict[str, Any]:
  """`losses.make_autoencoder_objective`'s arguments."""
  return dict(kl_weight=float(config.loss.kl_weight), reconstruction=config.loss.reconstruction,
              perceptual_weight=float(config.loss.get("perceptual_weight", 0.0)),
              lpips_resolution=_lpips_resolution(config),
              data_range=data_range)


def _autoencoder_terms(config: ml_collections.ConfigDict) -> str:
  """The autoencoder objective's terms, for the log: 'reconstruction + KL [+ LPIPS] [+ adversarial ...]'."""
  c = config.loss
  terms = [f"{c.reconstruction} reconstruction", "KL"]
  if float(c.perceptual_weight):
    terms.append(f"{float(c.perceptual_weight):g} LPIPS")
  if float(c.disc_weight):
    terms.append(f"adversarial ({float(c.disc_weight):g}, adaptive; from update {int(c.disc_start)})")
  return " + ".join(terms)


def _denoising_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`make_denoising_loss`'s arguments: config.loss without the autoencoder's keys and
  consistency training's."""
  kw = config.loss.to_dict()
  for key in AUTOENCODER_KEYS + CT_KEYS:
    kw.pop(key, None)
  kw["target"] = kw.get("target") or None
  return kw


def make_train_step(config: ml_collections.ConfigDict, exp: Experiment, optimizer) -> Callable:
  """`step(state, batch, key) -> (state, metrics)` for `config` (not jitted)."""
  tc = config.training
  if exp.discriminator is not None:  # the step takes the objective of (x, reconstruction, posterior)
    objective = losses.make_autoencoder_objective(**_autoencoder_kwargs(config, exp.data_range))
    return functools.partial(adversarial_autoencoder_train_step, model=exp.model, discriminator=exp.discriminator,
                             objective=objective, optimizer=optimizer, ema_decay=tc.ema_decay,
                             disc_weight=float(config.loss.disc_weight), disc_start=int(config.loss.disc_start),
                             microbatches=int(tc.microbatches))
  loss_fn = make_loss(config, exp.process, data_range=exp.data_range)
  if exp.is_classifier or exp.is_autoencoder:
    step = classifier_train_step if exp.is_classifier else autoencoder_train_step
    return functools.partial(step, model=exp.model, loss_fn=loss_fn, optimizer=optimizer,
                             ema_decay=tc.ema_decay, microbatches=int(tc.microbatches))
  kw = dict(model=exp.model, loss_fn=loss_fn, optimizer=optimizer, ema_decay=tc.ema_decay,
            label_dropout=float(tc.label_dropout) if exp.num_classes else 0.0,
            cond_resolution=exp.cond_resolution, microbatches=int(tc.microbatches))
  if consistency_training(config):
    return functools.partial(consistency_training_step, target_decay=float(config.loss.target_decay), **kw)
  if distill.method(config) == "reflow":
    return functools.partial(reflow_train_step, **kw)
  if distill.method(config) == "consistency":
    return functools.partial(consistency_train_step, target_decay=float(config.distill.target_decay), **kw)
  if distill.enabled(config):
    return functools.partial(distill_train_step, teacher_steps=int(config.distill.teacher_steps),
                             steps_per_round=int(config.distill.steps_per_round), **kw)
  return functools.partial(train_step, **kw)


def lpips_key(config: ml_collections.ConfigDict) -> str:
  """The key that makes the run's loss use LPIPS ('config.loss.metric' of consistency training,
  'config.distill.metric' of consistency distillation, 'config.loss.perceptual_weight' of an
  autoencoder), or '' when it does not."""
  if config.model.name == "autoencoder":
    return "config.loss.perceptual_weight" if float(config.loss.get("perceptual_weight", 0.0)) else ""
  if consistency_training(config) and config.loss.metric == "lpips":
    return "config.loss.metric"
  if distill.method(config) == "consistency" and config.distill.metric == "lpips":
    return "config.distill.metric"
  return ""


def frozen_inputs(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """The train step's frozen keyword inputs, replicated over `mesh`: `{'metric_params': LPIPS
  weights}` (`config.lpips.weights`, comma-separated files) for an LPIPS consistency loss or an
  autoencoder's perceptual term, else
  {}. The loop passes them as an argument of each jitted call (closed over, XLA would embed the
  15M weights in the program as constants); they are not trained and not checkpointed."""
  if not lpips_key(config):
    return {}
  from jaxdiff.models import lpips

  params = lpips.load_lpips(*[p.strip() for p in str(config.lpips.weights).split(",") if p.strip()])
  return {"metric_params": sharding.replicate(params, mesh)}


def _keeps_target(config: ml_collections.ConfigDict) -> bool:
  """A consistency model's target network with a decay > 0 lives in the train state."""
  if consistency_training(config):
    return bool(float(config.loss.target_decay))
  return distill.method(config) == "consistency" and bool(config.distill.target_decay)


def abstract_train_state(config, exp: Experiment, optimizer, mesh):
  """The train state's shapes and shardings, without allocating it."""
  example = jnp.zeros((1,) + exp.shape, jnp.float32)
  if exp.cond_resolution:  # the network also sees the upsampled low-res image as channels
    example = jnp.concatenate([example, example], axis=-1)
  init = functools.partial(create_train_state, model=exp.model, optimizer=optimizer, example_x=example,
                           # reflow on fixed pairs never runs the teacher: its state keeps none
                           teacher=distill.enabled(config) and not reflow_pairs_dir(config),
                           target=_keeps_target(config), discriminator=exp.discriminator)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh)
  with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return init, with_sh, shardings


class _Metrics:
  """Metrics of the steps since the last flush, kept on the device until `flush`.

  `flush` pulls them to the host in one transfer, raises NonFiniteLossError on a NaN/inf
  loss, logs one progress line and appends a row to `<workdir>/metrics.jsonl`. On resume,
  rows past the restored step (written by the interrupted run) are dropped from the file.
  """

  def __init__(self, path: str, resume_step: int, num_steps: int, lr_at: Callable[[int], Any]):
    self.path, self.num_steps, self.lr_at = path, num_steps, lr_at
    self.rows = [r for r in self._read(path) if r.get("step", 0) <= resume_step]
    if sharding.is_main_process():
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.rows)
    self.pending: list[tuple[int, dict]] = []
    self.t0 = self.t_last = time.time()
    self.step_last = resume_step

  @staticmethod
  def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
      return []
    rows = []
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
          pass
    return rows

  def add(self, step: int, metrics: dict[str, Array]) -> None:
    """Metrics of the step(s) ending at `step`: scalars, or [n] for the n steps of one call."""
    self.pending.append((step, metrics))

  def flush(self, step: int, on_nonfinite: Callable[[int, float], Exception]) -> dict | None:
    if not self.pending:
      return None
    fetched = []  # one dict of floats per step
    for (last, _), m in zip(self.pending, jax.device_get([m for _, m in self.pending])):
      m = {k: np.atleast_1d(v) for k, v in m.items()}
      n = len(m["loss"])
      fetched += [(last - n + 1 + i, {k: float(v[i]) for k, v in m.items()}) for i in range(n)]
    self.pending = []
    for s, m in fetched:
      if not math.isfinite(m["loss"]):
        raise on_nonfinite(s, m["loss"])
    fetched = [m for _, m in fetched]
    now = time.time()
    rate = (step - self.step_last) / max(now - self.t_last, 1e-9)
    self.t_last, self.step_last = now, step
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    row = {"step": step, **mean, "steps_per_sec": rate, "lr": float(self.lr_at(step)),
           "elapsed_s": now - self.t0}
    self.rows.append(row)
    if sharding.is_main_process():
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    eta = (self.num_steps - step) / max(rate, 1e-9)
    # classifiers: accuracy; autoencoders: reconstruction, kl
    extra = "".join(f" | {k} {v:.4g}" for k, v in mean.items() if k not in ("loss", "grad_norm"))
    log.info("step %d/%d | loss %.4f | grad_norm %.3f%s | %.2f steps/s | ETA %s", step, self.num_steps,
             mean["loss"], mean["grad_norm"], extra, rate, _fmt_time(eta))
    return row


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _restore_or_init(ckpt, init, abstract, state_sh, init_key, data_iter, config, exp, workdir, mesh, teacher=None):
  """The latest checkpoint's state (and data position), or a fresh sharded state at step 0:
  a random init, the published weights `config.training.init_from` names, or (distillation)
  the teacher run's EMA parameters (`teacher`: `(step, params)` already loaded, or None)."""
  init_from = config.training.init_from
  if ckpt.latest_step() is not None:
    start, state = ckpt.restore(abstract, data_iterator=data_iter)
    log.info("Resumed from %s/%d%s.", ckpt.directory, start,
             f" (config.training.init_from={init_from!r} only starts a fresh run)" if init_from else "")
    return start, state
  # never materialised unsharded; compiled ahead so the compiler's freed heap is returned first
  params = None  # a random init
  if init_from.startswith("jaxdiff:"):  # another jaxdiff run's EMA parameters (fine-tuning)
    def check(run_config):
      pretrained.check_jaxdiff_run(init_from, config, run_config, consistency_sigma_data(config) is not None,
                                   consistency_sigma_data(run_config) is not None)

    run_step, params = evaluate.load_run_params(init_from.partition(":")[2], mesh, abstract.params,
                                                key=pretrained.KEY, value=init_from, check=check)
    log.info("Initialising from %s (its step %d, EMA parameters).", init_from, run_step)
  elif init_from:
    host = pretrained.load_pretrained(init_from, exp.model, exp.shape,
                                      negate_output=config.process.name == "ve")  # VE: score_sde's -eps
    pretrained.check_fits(host, abstract.params, init_from)
    host = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), host, abstract.params)
    params = sharding.put_host_tree(host, state_sh.params)
    log.info("Initialising from %s.", init_from)
  elif distill.method(config) == "reflow":  # the student starts as the teacher
    teacher_step, params = teacher or distill.load_teacher(config, mesh, abstract.params)
    how = (f"fixed pairs of noise and the teacher's samples in {reflow_pairs_dir(config)}" if reflow_pairs_dir(config)
           else "each batch pairs fresh noise with the teacher's samples")
    log.info("Reflow of %s (step %d): %s (%s, %d grid times).", config.distill.teacher, teacher_step, how,
             config.distill.solver, config.distill.teacher_steps)
  elif distill.method(config) == "consistency":  # the student starts as the teacher
    teacher_step, params = distill.load_teacher(config, mesh, abstract.params)
    d = config.distill
    log.info("Consistency distillation of %s (step %d): %d grid times, %s teacher steps, %s metric, target EMA "
             "%g.", d.teacher, teacher_step, d.num_scales, d.solver, d.metric, d.target_decay)
  elif distill.enabled(config):  # progressive distillation: the student starts as the teacher
    teacher_step, params = distill.load_teacher(config, mesh, abstract.params)
    log.info("Distilling %s (step %d): %d rounds of %d steps, %d -> %d DDIM steps.", config.distill.teacher,
             teacher_step, distill.num_rounds(config), config.distill.steps_per_round, config.distill.teacher_steps,
             distill.final_steps(config))
  state = aot.AotJit(jax.jit(lambda k, p: init(k, params=p), out_shardings=state_sh), name="init")(init_key, params)
  if sharding.is_main_process():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  return 0, state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, resuming from the latest checkpoint in `workdir`.

  Writes under `workdir`: `checkpoints/`, `metrics.jsonl`, `loss_curve.png`,
  `samples_<step>.png` and `config.json`. Returns the last logged metrics.
  """
  sharding.check_same_config(config)  # multi-host: every process must run the same config
  exp = build_experiment(config)
  aot.use_compilation_cache(config.compilation_cache_dir)
  os.makedirs(workdir, exist_ok=True)
  tc, o = config.training, config.optimizer
  mesh = sharding.create_mesh(config.mesh.to_dict())
  sharding.check_batch_size(tc.batch_size, mesh, microbatches=int(tc.microbatches))
  # num_steps=0 (only with init_from) imports published weights: a step-0 checkpoint, no data read
  importing = tc.num_steps == 0
  distilling = distill.method(config) == "progressive"
  # progressive distillation restarts the optimizer, with its schedule, every round
  round_steps = int(config.distill.steps_per_round) if distilling else tc.num_steps
  optimizer = make_optimizer(**o.to_dict(), num_steps=max(round_steps, 1))

  init_key, train_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
  train_key = sharding.replicate(train_key, mesh)  # lives where the step runs (on every host)
  init, abstract, state_sh = abstract_train_state(config, exp, optimizer, mesh)

  data_iter, teacher = None, None
  pairs_dir = reflow_pairs_dir(config)  # reflow on fixed pairs: made first (once), then the data
  if pairs_dir:  # (the teacher, if loaded to make them, is where a fresh student starts)
    _, teacher = write_reflow_pairs(config, exp, mesh, abstract.params, pairs_dir)
  if not importing:
    shard_index, shard_count = sharding.process_shard()
    # Each host reads the rows of every global batch its devices hold: the same global batches
    # for any number of hosts.
    rows = dict(batch_size=sharding.local_batch_size(tc.batch_size), seed=config.seed, shard_index=shard_index,
                shard_count=shard_count, batch_rows=sharding.local_batch_rows(mesh, tc.batch_size))
    if pairs_dir:
      host_iter = data_lib.pairs.create_pairs_dataset(
          pairs_dir, use_labels=bool(exp.num_classes), num_threads=config.data.num_threads,
          prefetch_buffer_size=config.data.prefetch_buffer_size, num_workers=config.data.num_workers, **rows)
    else:
      host_iter = data_lib.create_dataset(**data_lib.dataset_kwargs(config.data), **rows)
    # Global sharded batches, `prefetch_to_device` ahead; checkpoints save the next unconsumed one.
    data_iter = data_lib.prefetch_to_device(host_iter, mesh, size=config.data.prefetch_to_device)

  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(config, workdir), max_to_keep=tc.keep_checkpoints)
  start, state = _restore_or_init(ckpt, init, abstract, state_sh, init_key, data_iter, config, exp, workdir, mesh,
                                  teacher=teacher)
  del teacher  # not held on the devices while training
  if importing and start == 0:
    ckpt.save(0, state, meta={"config": config.to_dict()})  # without a data position: training it later
    log.info("Imported %s as step 0 in %s.", tc.init_from, ckpt.directory)  # starts the data afresh
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("Model %s: %s parameters; %s on mesh %s.", config.model.name, f"{n_params:,}",
           _autoencoder_terms(config) if exp.is_autoencoder else type(exp.process).__name__, dict(mesh.shape))

  batch_sh = {"x": sharding.batch_sharding(mesh, 1 + len(exp.shape))}
  if pairs_dir:
    batch_sh["noise"] = batch_sh["x"]
  if config.data.use_labels:
    batch_sh["label"] = sharding.batch_sharding(mesh, 1)
  # Compiled at the first call, ahead of running it (the compiler's freed heap is returned
  # before the step's buffers are allocated); with a cache dir, a warm restart loads the
  # compiled step without tracing it (the config is the key). `steps_per_call` k > 1: calls
  # of k steps (`train_steps`), and single steps only where a log, checkpoint or sample step
  # falls inside a call (a second program, compiled only if needed).
  # An autoencoder with a discriminator has two phases, each its own program: the warm-up
  # before config.loss.disc_start never evaluates the discriminator (half the adversarial
  # step's cost), and no call of k steps crosses disc_start.
  one_step = make_train_step(config, exp, optimizer)
  disc_start = int(config.loss.disc_start) if exp.discriminator is not None else None
  frozen = frozen_inputs(config, mesh)  # {} but for an LPIPS loss: its weights, an argument of every call
  k = int(tc.steps_per_call)
  programs: dict[tuple[int, bool | None], aot.AotJit] = {}

  def step_program(n: int, step: int) -> aot.AotJit:
    phase = None if disc_start is None else step >= disc_start
    if (n, phase) not in programs:
      fn = one_step if phase is None else functools.partial(one_step, adversarial=phase)
      name = ("train_step" if n == 1 else f"train_steps_{n}") + ("_warmup" if phase is False else "")
      programs[n, phase] = aot.AotJit(
          jax.jit(functools.partial(run_steps, step_fn=fn, n=n),
                  in_shardings=(state_sh, batch_sh if n == 1 else (batch_sh,) * n, sharding.replicated(mesh),
                                sharding.replicated(mesh)),
                  out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,)),
          cache_dir=config.compilation_cache_dir if config.cache_executables else "",
          fingerprint=config.to_json_best_effort(), name=name)
    return programs[n, phase]

  # the steps after which the loop saves, logs or samples (no call of k steps runs past one)
  def is_ckpt(s: int) -> bool:
    return s % tc.checkpoint_every == 0 or s == tc.num_steps

  def is_log(s: int) -> bool:
    return s % tc.log_every == 0 or is_ckpt(s)

  def is_sample(s: int) -> bool:
    return bool(tc.sample_every) and s % tc.sample_every == 0 and s != tc.num_steps

  if k > 1:
    misaligned = [f"{name}={v}" for name, v in (
        ("training.log_every", tc.log_every), ("training.checkpoint_every", tc.checkpoint_every),
        ("training.sample_every", tc.sample_every), ("training.num_steps", tc.num_steps),
        ("the resumed step", start), ("loss.disc_start", disc_start or 0)) if v % k]
    if misaligned:
      log.warning("config.training.steps_per_call=%d does not divide %s: the steps up to those "
                  "points run one at a time, in a second compiled program.", k, ", ".join(misaligned))

  schedule = make_schedule(learning_rate=o.learning_rate, schedule=o.schedule,
                           warmup_steps=o.warmup_steps, num_steps=round_steps)

  def lr_at(step: int):
    return schedule(step % round_steps if distilling else step)

  metrics = _Metrics(os.path.join(workdir, "metrics.jsonl"), start, tc.num_steps, lr_at)
  last_good = start

  def nonfinite(step: int, loss: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"loss became {loss} at step {step}; stopping before it reaches a checkpoint (the last good "
        f"one, step {last_good}, is kept in {ckpt.directory}). Lower config.optimizer.learning_rate "
        f"(now {o.learning_rate}) or set config.optimizer.grad_clip (now {o.grad_clip}), then rerun "
        f"to resume.")

  sampler = None
  batch = None  # the last training batch (super-resolution samples restore its low-res images)
  # latent diffusion: the frozen autoencoder encodes each batch on the devices, decodes samples
  encode = vae_params = None
  if exp.latent is not None:
    vae_params = latent_lib.load_params(exp.latent, mesh)
    # reflow's fixed pairs are the teacher's latents already; samples are still decoded
    encode = None if pairs_dir else latent_lib.make_encoder(exp.latent, mesh)
    log.info("Latent diffusion in %s: images %s -> latents %s (scaling_factor %.5g, shift_factor %.5g).",
             exp.latent.source, exp.latent.image_shape, exp.latent.shape, exp.latent.autoencoder.scaling_factor,
             exp.latent.autoencoder.shift_factor)
  decode = latent_lib.sample_decoder(exp.latent, mesh, vae_params)
  if exp.is_autoencoder:
    measure = jax.jit(functools.partial(latent_lib.measure_statistics, exp.model),
                      out_shardings={"reconstruction": sharding.batch_sharding(mesh, 1 + len(exp.shape)),
                                     "latent_mean": sharding.replicated(mesh),
                                     "latent_std": sharding.replicated(mesh)})

  def write_reconstructions(step: int) -> None:
    """An autoencoder's reconstructions of the last batch (pairs: input | output) and its latents'
    statistics (`latent.STATS_FILE`, what latent diffusion runs scale their latents by)."""
    if batch is None:
      return
    out = measure(state.ema_params, batch["x"], jax.random.fold_in(sample_key, step))
    x, recon = sharding.to_host(batch["x"]), sharding.to_host(out["reconstruction"])
    pixels = [viz.to_uint8(a, exp.centered) for a in (x, recon)]
    std = float(out["latent_std"])
    stats = {"step": step, "num_examples": int(x.shape[0]), "latent_mean": float(out["latent_mean"]),
             "latent_std": std, "scaling_factor": 1.0 / max(std, 1e-12), "shift_factor": float(out["latent_mean"]),
             "psnr_db": float(np.mean(tasks.psnr(pixels[1], pixels[0], 255.0)))}
    log.info("Autoencoder at step %d: reconstruction PSNR %.2f dB on the last batch; latents' mean %.4g, std %.4g "
             "(scaling_factor %.5g).", step, stats["psnr_db"], stats["latent_mean"], std, stats["scaling_factor"])
    if sharding.is_main_process():
      latent_lib.write_stats(workdir, stats)
      n = tc.num_final_samples
      if n > 0:
        pairs = np.concatenate([pixels[0][:n], pixels[1][:n]], axis=2)
        viz.save_image_grid(pairs, os.path.join(workdir, f"reconstructions_{step:06d}.png"))

  def write_samples(step: int) -> None:
    nonlocal sampler
    if exp.is_autoencoder:
      return write_reconstructions(step)
    if tc.num_final_samples <= 0 or exp.is_classifier:
      return
    cond = {}
    if exp.cond_resolution:  # super-resolution: the last batch, area-downsampled and super-resolved
      if batch is None:
        return
      cond["low_res"] = tasks.area_downsample(batch["x"], exp.cond_resolution)
    num_steps = None
    if distilling:  # the student of the round that ended at `step` (its DDIM steps + 1 grid points)
      num_steps = 1 + distill.student_steps(int(config.distill.teacher_steps), max(step - 1, 0),
                                            int(config.distill.steps_per_round))
    if sampler is None or sampler[0] != num_steps:
      n = tc.batch_size if exp.cond_resolution else tc.num_final_samples
      sampler = num_steps, generate.make_sampler(exp, config, batch_size=n, mesh=mesh, num_steps=num_steps)
    # A class-conditional model draws each class in turn (guided by config.sampling.guidance_scale).
    labels = (generate.cycle_labels(range(exp.num_classes), tc.num_final_samples)
              if exp.num_classes else None)
    x, _ = sampler[1](state.ema_params, jax.random.fold_in(sample_key, step), labels, **cond)
    x = sharding.to_host(decode(x))
    if sharding.is_main_process():
      generate.save_samples(x, exp, os.path.join(workdir, f"samples_{step:06d}"), write_npz=False)

  step, last = start, {}
  try:
    while step < tc.num_steps:
      inside = range(step + 1, step + k)
      n = k if step + k <= tc.num_steps and not any(is_log(s) or is_sample(s) or s == disc_start for s in inside) else 1
      batches = tuple(next(data_iter) for _ in range(n))  # already on the devices
      batch = batches[-1]
      with jax.transfer_guard(tc.transfer_guard):  # 'disallow' proves there is no implicit transfer
        if encode is not None:  # latent diffusion: the step sees the batches' latents
          zs = encode(vae_params, tuple(b["x"] for b in batches), train_key, state.step)
          batches = tuple({**b, "x": z} for b, z in zip(batches, zs))
          batch = batches[-1]
        # fold_in with the on-device step: no host-to-device transfer in the loop
        if n == 1:
          state, m = step_program(1, step)(state, batch, jax.random.fold_in(train_key, state.step), frozen)
        else:
          state, m = step_program(n, step)(state, batches, train_key, frozen)
      step += n
      metrics.add(step, m)
      if is_log(step):
        last = metrics.flush(step, nonfinite) or last  # raises before a bad state is saved
      if is_ckpt(step):
        ckpt.save(step, state, data_iterator=data_iter, meta={"config": config.to_dict()})
        last_good = step
        if sharding.is_main_process():
          _write_loss_curve(metrics.rows, workdir)
      if is_sample(step):
        write_samples(step)
      if distilling and step % round_steps == 0 and step < tc.num_steps:
        n_done = distill.student_steps(int(config.distill.teacher_steps), step - 1, round_steps)
        log.info("Distillation round %d/%d done at step %d: the student takes %d DDIM steps and becomes the "
                 "teacher of the next round.", step // round_steps, distill.num_rounds(config), step, n_done)
  finally:
    # Whatever stopped the loop (NaN, Ctrl-C, an error), let in-flight async saves finish
    # so the last good checkpoint is complete on disk.
    if data_iter is not None:
      data_iter.close()
    ckpt.close()
  write_samples(step)
  log.info("Done: %d steps in %s; outputs in %s.", step - start, _fmt_time(time.time() - metrics.t0), workdir)
  return last


def _write_loss_curve(rows, workdir: str) -> None:
  if rows:
    viz.save_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows],
                        os.path.join(workdir, "loss_curve.png"))
