"""What a network predicts, and the conversions between the parameterizations.

For `x_t = alpha x0 + sigma eps` a network may predict

* `eps`   the noise (Ho et al.),
* `x0`    the clean data,
* `v`     `alpha eps - sigma x0` (Salimans & Ho 2022),
* `score` `grad log p_t(x_t) = -eps / sigma`,
* `flow`  `eps - x0`, the velocity of flow matching / rectified flow (Lipman et al. 2023,
          Liu et al. 2023): on `RectifiedFlow` (shift 1) the probability-flow ODE is
          `dx/dt = eps - x0`. It is finite everywhere on any process with alpha + sigma > 0,
          at pure noise too, where x0 = x - flow and eps = x,
* `edm`   Karras et al.'s preconditioned denoiser `D = c_skip x + c_out F(c_in x; c_noise)`
          (only with the `EDM` process, which supplies the c's).

All conversions are exact for any alpha, sigma (not only variance-preserving ones) and
take `alpha, sigma` already broadcast to `x` (or scalars).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.processes import EDM, bcast

Array = jax.Array

PREDICTIONS = ("eps", "x0", "v", "score", "flow", "edm")


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ConfigError(f"prediction={prediction!r} is not known; valid values are: {', '.join(PREDICTIONS)}.")


def to_x0_eps(out: Array, x: Array, alpha, sigma, prediction: str) -> tuple[Array, Array]:
  """Converts a network output of kind `prediction` at `x = x_t` to (x0, eps)."""
  if prediction == "eps":
    eps = out
    x0 = (x - sigma * eps) / alpha
  elif prediction in ("x0", "edm"):
    x0 = out
    eps = (x - alpha * x0) / sigma
  elif prediction == "v":
    norm = alpha**2 + sigma**2
    x0 = (alpha * x - sigma * out) / norm
    eps = (sigma * x + alpha * out) / norm
  elif prediction == "score":
    eps = -sigma * out
    x0 = (x - sigma * eps) / alpha
  elif prediction == "flow":
    # x = alpha x0 + sigma eps and u = eps - x0 give x - sigma u = (alpha + sigma) x0
    norm = alpha + sigma
    x0 = (x - sigma * out) / norm
    eps = (x + alpha * out) / norm
  else:
    check_prediction(prediction)
    raise AssertionError
  return x0, eps


def from_x0_eps(x0: Array, eps: Array, alpha, sigma, prediction: str) -> Array:
  """The quantity of kind `prediction` for given x0 and eps (the regression target)."""
  if prediction == "eps":
    return eps
  if prediction in ("x0", "edm"):
    return x0
  if prediction == "v":
    return alpha * eps - sigma * x0
  if prediction == "score":
    return -eps / sigma
  if prediction == "flow":
    return eps - x0
  check_prediction(prediction)
  raise AssertionError


def convert(out: Array, x: Array, alpha, sigma, source: str, target: str) -> Array:
  """Converts a prediction of kind `source` into kind `target` at `x = x_t`."""
  x0, eps = to_x0_eps(out, x, alpha, sigma, source)
  return from_x0_eps(x0, eps, alpha, sigma, target)


def score_from_eps(eps: Array, sigma) -> Array:
  return -eps / sigma


def eps_from_score(score: Array, sigma) -> Array:
  return -sigma * score


# --------------------------------------------------------------------------------------
# From a network to (x0, eps) and to a score function
# --------------------------------------------------------------------------------------
# `net(x, c) -> out` is a network with its parameters (and any conditioning) already bound;
# `c: [B]` is the process's conditioning input `noise_cond(t)` (or EDM's c_noise).


def predict(net, process, prediction: str, x: Array, t: Array) -> tuple[Array, Array, Array]:
  """Evaluates `net` at (x, t) and returns (x0_hat, eps_hat, raw output)."""
  alpha, sigma = process.alpha(t), process.sigma(t)
  if prediction == "edm":
    if not isinstance(process, EDM):
      raise ConfigError(f"prediction='edm' needs the EDM process (its c_skip/c_out/c_in), "
                        f"not {type(process).__name__}; use prediction='eps', 'x0', 'v' or 'flow' instead.")
    c_skip, c_out, c_in, c_noise = process.precond(sigma)
    out = net(bcast(c_in, x) * x, c_noise)
    x0 = bcast(c_skip, x) * x + bcast(c_out, x) * out.astype(x.dtype)
    return x0, (x - x0) / bcast(sigma, x), out
  out = net(x, process.noise_cond(t))
  x0, eps = to_x0_eps(out.astype(x.dtype), x, bcast(alpha, x), bcast(sigma, x), prediction)
  return x0, eps, out


def score_fn_from_network(net, process, prediction: str):
  """Wraps a network of any parameterization into `score_fn(x, t) -> grad log p_t(x)`."""
  check_prediction(prediction)

  def score_fn(x: Array, t: Array) -> Array:
    _, eps, _ = predict(net, process, prediction, x, t)
    return -eps / bcast(process.sigma(t), x)

  return score_fn


def clip_denoised(score_fn, process, lo: float = -1.0, hi: float = 1.0):
  """Wraps a score function so its implied x0_hat is clipped to the data range [lo, hi].

  Ho et al.'s `clip_denoised` (diffusers' `clip_sample`): a model that is not yet exact can
  predict x0 far outside the data range at high noise, which deterministic samplers carry
  to the end; clipping keeps every sampler's denoised estimate inside the data range.
  """

  def clipped(x: Array, t: Array) -> Array:
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    eps = -s * score_fn(x, t)
    x0 = jnp.clip((x - s * eps) / a, lo, hi)
    return -((x - a * x0) / s) / s

  return clipped


# --------------------------------------------------------------------------------------
# Consistency models (Song et al. 2023)
# --------------------------------------------------------------------------------------


def consistency_skip(process, t: Array, sigma_data: float = 0.5) -> Array:
  """`c_skip(t) = sigma_data^2 / ((s(t) - s(t_min))^2 + sigma_data^2)`, s = sigma / alpha.

  The weight of the input in a consistency function (`consistency_x0`): 1 at t_min (the
  boundary condition f(x, t_min) = x / alpha), falling to 0 at high noise. Song et al.'s c_skip
  with the noise level measured in `x / alpha`, where every Gaussian process is `x0 + s eps`
  (its probability-flow ODE is the same one in that variable, for any alpha)."""
  t = jnp.asarray(t, jnp.float32)
  s = process.sigma(t) / process.alpha(t)
  s_min = process.sigma(process.t_min) / process.alpha(process.t_min)
  return sigma_data**2 / ((s - s_min) ** 2 + sigma_data**2)


def consistency_x0(process, x0_hat: Array, x: Array, t: Array, sigma_data: float = 0.5) -> Array:
  """A consistency model's output `f(x, t) = c_skip x / alpha + (1 - c_skip) x0_hat` at `x = x_t`.

  `x0_hat` is the network's denoised estimate in any parameterization (`predict`), so a student
  initialised from a diffusion model starts as that model's denoiser at high noise, and f meets
  the boundary condition f(x, t_min) = x / alpha (the data, up to the smallest noise) for any
  weights. `c_skip` is `consistency_skip`; `t` is `[B]`."""
  c = bcast(consistency_skip(process, t, sigma_data), x)
  return c * (x / bcast(process.alpha(t), x)) + (1.0 - c) * x0_hat


def consistency_score_fn(score_fn, process, sigma_data: float = 0.5):
  """Wraps the score function of a consistency model's network into the score function whose
  denoised estimate is the consistency function `consistency_x0` (what every sampler reads).

  A trained consistency model maps x_t to the start of its probability-flow trajectory in one
  evaluation, so `samplers.sample(method='consistency')` draws in 1 or a few steps. The
  wrapped function is a score only in name: it is not the gradient of log p_t."""

  def wrapped(x: Array, t: Array) -> Array:
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    x0_hat = (x + s * s * score_fn(x, t)) / a
    f = consistency_x0(process, x0_hat, x, t, sigma_data)
    return -((x - a * f) / s) / s

  return wrapped
