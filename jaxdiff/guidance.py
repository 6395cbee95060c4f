"""Guided sampling: classifier-free guidance and classifier guidance, as score functions.

Every sampler of `jaxdiff.sample` takes a `score_fn(x [B,...], t [B]) -> grad log p_t(x)`,
so guidance is a wrapper that returns another score function, and works with every method:

* `cfg_score_fn(net, process, prediction, labels, w, null_label=K)`: classifier-free
  guidance (Ho & Salimans 2022) for a class-conditional network `net(x, c, y)` trained
  with label dropout (`config.training.label_dropout`). The conditional and unconditional
  (null-label) outputs come from ONE network call on a batch of 2B (`[x, x]`, `[y, null]`)
  and are combined as `cond + w * (cond - uncond)`, so `w = 0` is plain conditional
  sampling and `w > 0` sharpens towards the class (diffusers' `guidance_scale` is 1 + w).
  Optional: a guidance interval (Kynkaanniemi et al. 2024; `w` applied only where the
  noise level sigma/alpha lies in [lo, hi]) and guidance rescale (Lin et al. 2024, the
  guided x0_hat rescaled to the conditional one's standard deviation).
* `classifier_guidance_score_fn(score_fn, classifier_logp_fn, labels, scale)`: classifier
  guidance (Dhariwal & Nichol 2021), `score + scale * grad_x log p(y | x_t, t)` with a
  noise-conditional classifier (`jaxdiff.models.NoiseClassifier`, trained by
  `run_train.py --config configs/mnist_classifier.py`); `classifier_logp_fn` turns such a
  network into `log p(. | x_t, t)`.

The guidance combination is the same whatever the network predicts: eps, x0, v, the score
and EDM's denoiser are affine in each other with the same coefficients for the two
outputs, and `(1 + w) - w = 1`, so combining scores equals combining raw outputs.

With an exact classifier, classifier guidance at `scale = 1 + w` and classifier-free
guidance at `w` are the same score (`grad log p_t(x|y) - grad log p_t(x) = grad log
p_t(y|x)`); tests/test_guidance.py checks both against a Gaussian mixture's closed forms.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxdiff import parameterization
from jaxdiff.errors import InputError
from jaxdiff.processes import Process, bcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def check_guidance(guidance_scale, interval: Sequence[float] | None = None, rescale: float = 0.0) -> None:
  """InputError for a non-finite scale, an empty/negative interval or rescale outside [0, 1]."""
  if isinstance(guidance_scale, (int, float)) and not math.isfinite(guidance_scale):
    raise InputError(f"guidance_scale={guidance_scale} must be a finite number (0 = no guidance).")
  if interval is not None:
    if len(interval) != 2 or not 0.0 <= float(interval[0]) < float(interval[1]):
      raise InputError(f"guidance_interval={tuple(interval)} must be (lo, hi) noise levels sigma/alpha with "
                       f"0 <= lo < hi, e.g. (0.0, inf) for everywhere.")
  if not 0.0 <= float(rescale) <= 1.0:
    raise InputError(f"guidance_rescale={rescale} must be in [0, 1] (0 = off; Lin et al. use 0.7).")


def noise_level(process: Process, t: Array) -> Array:
  """sigma(t) / alpha(t), the noise level of `x_t / alpha` (EDM's sigma), `[B]`."""
  return process.sigma(t) / process.alpha(t)


def cfg_score_fn(net: Callable[[Array, Array, Array], Array], process: Process, prediction: str,
                 labels: Array, guidance_scale: float | Array, *, null_label: int,
                 interval: Sequence[float] | None = None, rescale: float = 0.0) -> ScoreFn:
  """Classifier-free guidance: a `score_fn(x, t)` from a class-conditional network.

  Args:
    net: `net(x, c, y) -> out`, the class-conditional network with its parameters bound;
      `c = process.noise_cond(t)` (EDM: c_noise), `y` int32 labels with `null_label` for the
      unconditional model.
    process: the diffusion process.
    prediction: what `net` outputs ('eps', 'x0', 'v', 'score' or 'edm').
    labels: `[B]` (or scalar) int labels to sample; entries equal to `null_label` give
      unconditional samples.
    guidance_scale: `w`, a float or a `[B]` array: `out = cond + w * (cond - uncond)`.
    null_label: the label of the unconditional model (the network's `num_classes`).
    interval: `(lo, hi)`: apply `w` only where sigma/alpha is in [lo, hi] (None: everywhere).
    rescale: phi in [0, 1]: mix the guided x0_hat with itself rescaled to the conditional
      x0_hat's per-example standard deviation (Lin et al. 2024, Sec. 3.4); 0 = off.

  Returns:
    `score_fn(x [B, ...], t [B]) -> [B, ...]`, one network call per evaluation on a batch
    of 2B.
  """
  parameterization.check_prediction(prediction)
  check_guidance(guidance_scale, interval, rescale)
  labels = jnp.asarray(labels, jnp.int32)
  lo, hi = (None, None) if interval is None else (float(interval[0]), float(interval[1]))

  def score_fn(x: Array, t: Array) -> Array:
    b = x.shape[0]
    y = jnp.concatenate([jnp.broadcast_to(labels, (b,)), jnp.full((b,), null_label, jnp.int32)])
    both = parameterization.score_fn_from_network(lambda xx, c: net(xx, c, y), process, prediction)
    score = both(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    cond, uncond = score[:b], score[b:]
    w = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (b,))
    if lo is not None:
      sig = noise_level(process, t)
      w = jnp.where((sig >= lo) & (sig <= hi), w, 0.0)
    guided = cond + bcast(w, x).astype(x.dtype) * (cond - uncond)
    if rescale:
      guided = _rescale(process, x, t, cond, guided, rescale)
    return guided

  return score_fn


def _rescale(process: Process, x: Array, t: Array, cond: Array, guided: Array, phi: float) -> Array:
  """Lin et al.'s guidance rescale, applied to x0_hat = (x + sigma^2 score) / alpha."""
  a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
  x0_c = (x + s**2 * cond) / a
  x0_g = (x + s**2 * guided) / a
  axes = tuple(range(1, x.ndim))
  std_c = jnp.std(x0_c, axis=axes, keepdims=True)
  std_g = jnp.std(x0_g, axis=axes, keepdims=True)
  factor = phi * std_c / jnp.maximum(std_g, 1e-12) + (1.0 - phi)
  x0 = x0_g * factor
  return (a * x0 - x) / s**2


# --------------------------------------------------------------------------------------
# Classifier guidance
# --------------------------------------------------------------------------------------


def classifier_input(process: Process, x: Array, t: Array) -> tuple[Array, Array]:
  """What a noise-conditional classifier sees: `(x_t / sqrt(alpha^2 + sigma^2), noise_cond(t))`.

  The scaling makes the input unit-variance for every process (a no-op for variance-
  preserving ones); training (`losses.make_classifier_loss`) and guidance both use it.
  """
  a, s = process.alpha(t), process.sigma(t)
  return x / bcast(jnp.sqrt(a**2 + s**2), x).astype(x.dtype), process.noise_cond(t)


def classifier_logp_fn(net: Callable[[Array, Array], Array], process: Process) -> Callable[[Array, Array], Array]:
  """`logp_fn(x_t, t) -> log p(. | x_t, t)` `[B, K]` from a classifier `net(x, c) -> logits`."""

  def logp_fn(x: Array, t: Array) -> Array:
    logits = net(*classifier_input(process, x, t))
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return logp_fn


def classifier_guidance_score_fn(score_fn: ScoreFn, classifier_logp_fn: Callable[[Array, Array], Array],
                                 labels: Array, scale: float | Array) -> ScoreFn:
  """Classifier guidance: `score_fn(x, t) + scale * grad_x log p(labels | x_t, t)`.

  Args:
    score_fn: the (unconditional, or conditional/CFG-guided) score function.
    classifier_logp_fn: `(x_t [B, ...], t [B]) -> [B, K]` log-probabilities of the K
      classes (`classifier_logp_fn(net, process)` for a trained `NoiseClassifier`); the
      examples must not interact (the gradient is taken of the sum over the batch).
    labels: `[B]` (or scalar) int classes to guide towards, in [0, K).
    scale: the guidance scale s (a float or `[B]`); with the exact posterior, s = 1 turns
      an unconditional score into the class-conditional one.
  """
  labels = jnp.asarray(labels, jnp.int32)

  def guided(x: Array, t: Array) -> Array:
    y = jnp.broadcast_to(labels, (x.shape[0],))

    def logp(xx):
      lp = classifier_logp_fn(xx, t)
      return jnp.sum(jnp.take_along_axis(lp, y[:, None], axis=-1))

    grad = jax.grad(logp)(x)
    s = bcast(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (x.shape[0],)), x)
    return score_fn(x, t) + (s * grad).astype(x.dtype)

  return guided


__all__ = ["cfg_score_fn", "classifier_guidance_score_fn", "classifier_logp_fn", "classifier_input",
           "check_guidance", "noise_level"]
