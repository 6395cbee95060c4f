"""Likelihoods of diffusion models: the probability-flow ODE and the DDPM variational bound.

Two estimators, as in the literature:

* `log_likelihood(key, process, score_fn, x)`: the exact log density of the continuous
  model defined by the probability-flow ODE (Song et al. 2021, "instantaneous change of
  variables" of Chen et al. 2018). The state `(x_t, delta_t)` is integrated from `t_min`
  to `T` in one on-device diffrax solve:

      dx/dt     = f(x, t) = f(t) x - g(t)^2 score(x, t) / 2
      ddelta/dt = div_x f(x, t)
      log p(x)  = prior_logp(x_T) + delta_T

  (`d log p_t(x_t) / dt = -div f` along a trajectory, so `log p_{t_min}(x) = log p_T(x_T)
  + int div f dt`). The divergence is exact (a full Jacobian trace, low dimension only) or
  Hutchinson's unbiased estimate `E[eps^T J eps]` from one Jacobian-vector product per probe,
  with the probes drawn once per solve, as in score_sde.
* `bits_per_dim(key, process, score_fn, images_uint8)`: the above for 8-bit images, with
  uniform dequantization `(k + u) / 256` and the change of variables to the model's data
  scale ([-1, 1] or [0, 1]); repeated dequantization draws are averaged.
* `ddpm_vlb` / `vlb_bits_per_dim`: Ho et al.'s variational bound of a discrete-time DDPM
  (prior KL at N, the N-1 KL terms between `q(x_{t-1} | x_t, x_0)` and the model's
  `p(x_{t-1} | x_t)`, and the discretized Gaussian decoder at t = 1), exact over all
  timesteps (one `lax.map` over t) or estimated from K sampled timesteps with a
  standard error.

Every function takes a `score_fn(x, t) -> grad log p_t(x)` (e.g.
`parameterization.score_fn_from_network(net, process, prediction)`), is jittable, and is
jitted here (keyed on `score_fn`'s identity): calling it again with the same `score_fn`
and shapes does not recompile.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InputError, check_choice
from jaxdiff.processes import DDPM, Process, bcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

DIVERGENCES = ("hutchinson_rademacher", "hutchinson_gaussian", "exact")
AUTODIFF = ("forward", "reverse")
SOLVERS = ("tsit5", "dopri5")
VARIANCES = ("fixed_small", "fixed_large")
DECODERS = ("discretized", "gaussian")
# Above this many dimensions per example the exact divergence (one product per dimension) is
# refused: use a Hutchinson estimator.
MAX_EXACT_DIM = 4096
# Both solvers are 7-stage FSAL Runge-Kutta methods: the first step evaluates all 7 stages,
# every later step (accepted or rejected) 6, so NFE = 6 * num_steps + 1, plus one for each
# rejected attempt at the very first step (diffrax evaluates the first stage again; with
# the default dt0 this is rare). Handing diffrax the first stage (`solver_state`) would make
# the count exact, but compiles a second copy of the network's JVP outside the solver's
# stage loop (+50% compile time on the tiny U-Net).
NFE_PER_STEP = 6
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------
# Input checks (eager, on concrete values where possible; one-line messages)
# --------------------------------------------------------------------------------------


def _is_traced(*values) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(values))


def _check_number(name: str, value, *, integer: bool = False) -> None:
  kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
    what = "a positive integer" if integer else "a positive number"
    raise InputError(f"{name}={value!r} must be {what}.")


def _check_process(process, fn: str) -> None:
  if not isinstance(process, Process):
    raise InputError(f"process={process!r} is not a jaxdiff Process; {fn} needs one, e.g. "
                     f"processes.get_process(**config.process).")


def _check_batch_shape(x, fn: str) -> None:
  if x.ndim < 2:
    raise InputError(f"x has shape {tuple(x.shape)}; {fn} needs a batch [B, ...] with at least one data "
                     f"axis (for a single example pass x[None]).")


def _check_continuous(x, fn: str) -> Array:
  """A float batch in the model's scale, with no NaN/inf (checked where x is concrete)."""
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  _check_batch_shape(x, fn)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise InputError(f"x has dtype {x.dtype}, but {fn} takes data in the model's continuous scale "
                     f"(float, e.g. [-1, 1] for centered images): scale integer pixels first "
                     f"(x / 127.5 - 1), or pass the integer images to bits_per_dim, which dequantizes them.")
  if not _is_traced(x) and getattr(x, "is_fully_addressable", True):
    bad = int(jnp.sum(~jnp.isfinite(x)))
    if bad:
      raise InputError(f"x holds {bad} NaN/inf values (shape {tuple(x.shape)}); {fn} needs finite data: "
                       f"drop or repair those examples.")
  return jnp.asarray(x)


def _check_pixels(x, fn: str) -> Array:
  """An integer batch of 8-bit pixels in [0, 255] (the range is checked where x is concrete)."""
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  _check_batch_shape(x, fn)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    hint = ""
    if not _is_traced(x) and getattr(x, "is_fully_addressable", True) and x.size:
      hint = f" (values in [{float(jnp.min(x)):.3g}, {float(jnp.max(x)):.3g}])"
    raise InputError(f"x has dtype {x.dtype}{hint}, but {fn} takes the integer pixels 0..255 before any "
                     f"scaling or dequantization (e.g. uint8): pass the raw images, e.g. "
                     f"np.round((x + 1) * 127.5).astype(np.uint8) for [-1, 1] data.")
  if not _is_traced(x) and getattr(x, "is_fully_addressable", True) and x.size:
    lo, hi = int(jnp.min(x)), int(jnp.max(x))
    if lo < 0 or hi > 255:
      raise InputError(f"x holds pixel values in [{lo}, {hi}], but {fn} takes 8-bit pixels in [0, 255].")
  return jnp.asarray(x)


def _checked_score(score_fn: ScoreFn, x: Array, t: Array) -> Array:
  """score_fn(x, t), with its shape checked against x at trace time."""
  s = score_fn(x, t)
  if s.shape != x.shape:
    raise InputError(f"score_fn returned shape {tuple(s.shape)} for x of shape {tuple(x.shape)}; it must "
                     f"return the score with x's shape (does the model's data shape match x?).")
  return s.astype(x.dtype)


def _raise_if_failed(success, *, fn: str, process: Process, rtol: float, atol: float, max_steps: int) -> None:
  """Outside jit, turns a solve that ran out of steps into an InputError naming the knobs."""
  if _is_traced(success) or bool(jnp.all(success)):
    return
  raise InputError(f"{fn}: the probability-flow ODE did not reach T={process.T:g} within "
                   f"max_steps={max_steps} solver steps at rtol={rtol:g}, atol={atol:g}; loosen the "
                   f"tolerances (e.g. rtol=atol={min(10 * max(rtol, atol), 1e-2):g}) or raise max_steps.")


@contextlib.contextmanager
def _forward_mode_hint(autodiff: str):
  """Turns JAX's error for `jax.jvp` of a `custom_vjp` function into one that says the fix."""
  try:
    yield
  except TypeError as e:
    if autodiff != "forward" or "custom_vjp" not in str(e):
      raise
    raise InputError(
        "autodiff='forward' (the default) takes Jacobian-vector products of score_fn, but score_fn "
        "uses a jax.custom_vjp function, which forward mode cannot differentiate. Build jaxdiff's "
        "UNet with custom_vjp=False (the same parameters and numbers), or pass autodiff='reverse' "
        "(slower on CPU).") from e


def _check_ode_options(divergence, n_probes, solver, rtol, atol, max_steps, dt0, autodiff) -> None:
  check_choice("divergence", divergence, DIVERGENCES)
  check_choice("autodiff", autodiff, AUTODIFF)
  check_choice("solver", solver, SOLVERS)
  _check_number("n_probes", n_probes, integer=True)
  if divergence == "exact" and n_probes != 1:
    raise InputError(f"n_probes={n_probes} applies to the Hutchinson estimators only; divergence='exact' "
                     f"is deterministic: use n_probes=1.")
  _check_number("rtol", rtol)
  _check_number("atol", atol)
  _check_number("max_steps", max_steps, integer=True)
  if dt0 is not None:
    _check_number("dt0", dt0)


def _check_exact_dim(divergence: str, x) -> None:
  d = math.prod(x.shape[1:])
  if divergence == "exact" and d > MAX_EXACT_DIM:
    raise InputError(f"divergence='exact' needs one Jacobian product per dimension, and x has {d} > {MAX_EXACT_DIM} "
                     f"dimensions per example; use divergence='hutchinson_rademacher'.")


def _tolerances(process: Process, rtol, atol, dt0) -> tuple[Array, Array, float]:
  """rtol and atol as float32 arrays, and the first step (default: 1/64 of [t_min, T])."""
  if dt0 is None:
    dt0 = (float(process.T) - float(process.t_min)) / 64.0
  return jnp.asarray(float(rtol), jnp.float32), jnp.asarray(float(atol), jnp.float32), float(dt0)


# --------------------------------------------------------------------------------------
# The probability-flow ODE with its divergence
# --------------------------------------------------------------------------------------


def _drift_fn(process: Process, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
  """`drift(x, t)` of the probability-flow ODE for a scalar time t."""

  def drift(x: Array, t: Array) -> Array:
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    return process.probability_flow_drift(x, tt, _checked_score(score_fn, x, tt))

  return drift


def _drift_and_divergence_fn(drift, divergence: str, n_probes: int, autodiff: str = "forward"):
  """`fn(x, t, probes) -> (drift [B, ...], divergence [B])`.

  `autodiff="forward"` takes Jacobian-vector products (`jax.jvp` / `jax.linearize`):
  inside the solver's while loop these cost ~1.7x a forward on XLA:CPU. `"reverse"` takes
  vector-Jacobian products instead (eps^T J eps = eps^T (J^T eps), J_ii = (J^T e_i)_i),
  which also works for networks with `jax.custom_vjp` layers, but XLA:CPU runs the
  transposed convolutions of a VJP inside a while loop ~2-4x slower than outside one.
  """

  def data_axes(a: Array, first: int = 1) -> tuple[int, ...]:
    return tuple(range(first, a.ndim))

  if divergence == "exact":

    def exact(x, t, probes):
      del probes
      b, d = x.shape[0], math.prod(x.shape[1:])
      fn = lambda z: drift(z, t)  # noqa: E731
      if autodiff == "forward":
        f, jvp_fn = jax.linearize(fn, x)
        product = lambda v: jvp_fn(v)  # noqa: E731  J v
      else:
        f, vjp_fn = jax.vjp(fn, x)
        product = lambda v: vjp_fn(v.astype(f.dtype))[0]  # noqa: E731  J^T v

      def diagonal_entry(i):
        # Examples are independent, so e_i in every row gives (J_b)_{ii} for all b at once.
        e = jax.nn.one_hot(i, d, dtype=x.dtype).reshape(x.shape[1:])
        return product(jnp.broadcast_to(e, x.shape)).reshape(b, d)[:, i]

      diag = jax.lax.map(diagonal_entry, jnp.arange(d), batch_size=min(d, 64))
      return f, jnp.sum(diag, axis=0)

    return exact

  def hutchinson(x, t, probes):
    fn = lambda z: drift(z, t)  # noqa: E731
    if autodiff == "forward" and n_probes == 1:
      # One forward-mode pass gives the drift and J eps together.
      f, jv = jax.jvp(fn, (x,), (probes[0],))
      return f, jnp.sum(probes[0] * jv, axis=data_axes(x))
    if autodiff == "forward":
      f, product = jax.linearize(fn, x)
    else:
      f, vjp_fn = jax.vjp(fn, x)
      product = lambda v: vjp_fn(v.astype(f.dtype))[0]  # noqa: E731
    jv = jax.vmap(product)(probes)
    return f, jnp.mean(jnp.sum(probes * jv, axis=data_axes(jv, 2)), axis=0)

  return hutchinson


def _draw_probes(key: Array, x: Array, divergence: str, n_probes: int) -> Array:
  shape = (n_probes,) + x.shape
  if divergence == "hutchinson_rademacher":
    return jax.random.rademacher(key, shape, dtype=x.dtype)
  if divergence == "hutchinson_gaussian":
    return jax.random.normal(key, shape, dtype=x.dtype)
  return jnp.zeros((1,), x.dtype)  # exact: unused


@functools.partial(jax.jit,
                   static_argnames=("score_fn", "divergence", "n_probes", "solver", "max_steps", "dt0",
                                    "autodiff"))
def _ode_log_likelihood(key, process, x, rtol, atol, *, dt0, score_fn, divergence, n_probes, solver,
                        max_steps, autodiff="forward"):
  """Solves the likelihood ODE in one on-device diffrax while loop.

  rtol and atol are traced (changing them does not recompile). dt0 is static: a traced dt0
  makes diffrax check its sign with a runtime callback, and a program with host callbacks
  is never written to the persistent compilation cache.
  """
  import diffrax  # imported on first use: `import jaxdiff` stays light

  fn = _drift_and_divergence_fn(_drift_fn(process, score_fn), divergence, n_probes, autodiff)

  def vector_field(t, y, probes):
    return fn(y[0], t, probes)

  probes = _draw_probes(key, x, divergence, n_probes)
  t0, t1 = float(process.t_min), float(process.T)
  # The score's shape, checked before diffrax traces the vector field: diffrax 0.7.0 reports
  # any error raised there as "Terms are not compatible with solver!".
  jax.eval_shape(functools.partial(_checked_score, score_fn), x, jnp.full((x.shape[0],), t1, jnp.float32))
  y0 = (x, jnp.zeros((x.shape[0],), x.dtype))
  solver_obj = diffrax.Tsit5() if solver == "tsit5" else diffrax.Dopri5()
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver_obj, t0=t0, t1=t1, dt0=dt0, y0=y0, args=probes,
      saveat=diffrax.SaveAt(t1=True),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      adjoint=diffrax.RecursiveCheckpointAdjoint(),  # no gradients are taken through the solve
      max_steps=max_steps, throw=False)
  x_t, delta = sol.ys[0][0], sol.ys[1][0]
  success = sol.result == diffrax.RESULTS.successful
  prior = process.prior_logp(x_t)
  num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
  logp = jnp.where(success, prior + delta, jnp.nan)
  info = {"nfe": NFE_PER_STEP * num_steps + 1, "num_steps": num_steps,
          "num_accepted_steps": jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
          "prior_logp": prior, "delta_logp": delta, "z": x_t, "success": success}
  return logp, info


def log_likelihood(key: Array, process: Process, score_fn: ScoreFn, x: Array, *,
                   divergence: str = "hutchinson_rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   n_probes: int = 1, solver: str = "tsit5", max_steps: int = 4096,
                   dt0: float | None = None, autodiff: str = "forward") -> tuple[Array, dict[str, Array]]:
  """log p(x) in nats under the probability-flow ODE of `score_fn`, one value per example.

  Integrates `(x, delta)` from `process.t_min` to `process.T` in one diffrax solve on
  device and returns `prior_logp(x_T) + delta_T`. The density is that of the data at
  `t_min` (score_sde's convention; for DDPM the first noise level, t = 1), for the model
  whose marginal at T is exactly the prior (so even an exact score differs from the data
  density by the prior mismatch, `log p_T(x_T) - prior_logp(x_T)`).

  Args:
    key: PRNG key for the Hutchinson probes (drawn once, fixed through the solve).
    process: the diffusion process the model was trained with.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]`, e.g.
      `parameterization.score_fn_from_network(net, process, prediction)`. Examples must
      not interact (true of diffusion networks), as the exact divergence relies on it.
    x: `[B, ...]` float data in the model's scale (e.g. [-1, 1] for centered images).
    divergence: "hutchinson_rademacher" (default; lowest variance), "hutchinson_gaussian",
      or "exact" (trace of the Jacobian, one product per dimension; at most 4096 dimensions).
    rtol, atol: the PID step-size controller's tolerances.
    n_probes: Hutchinson probes per example, averaged (one linearization, vmapped products).
    solver: "tsit5" or "dopri5" (both 5th order, 6 evaluations per step).
    max_steps: the solve fails (InputError outside jit; NaN inside) after this many steps.
    dt0: first step size (default: 1/64 of the interval); the controller adapts it.
    autodiff: "forward" (default: Jacobian-vector products, the fastest) or "reverse"
      (vector-Jacobian products), for a score_fn with `jax.custom_vjp` functions, which
      forward mode cannot differentiate. jaxdiff's U-Net has them unless built with
      `custom_vjp=False` (the same numbers), as `evaluate.make_likelihood_fn` does.

  Returns:
    `(logp [B], info)`: info holds `nfe` (vector-field evaluations, `6 * num_steps + 1`,
    int32; a rejected first step adds one more each, see `NFE_PER_STEP`), `num_steps`,
    `num_accepted_steps`, `prior_logp [B]`, `delta_logp [B]`, the latent `z = x_T [B, ...]`
    and `success` (bool). Called inside jit, a failed solve gives NaN and `success=False`
    instead of an error.

  Raises:
    InputError: for an unknown option, integer or non-finite x, an x of the wrong shape,
      "exact" above 4096 dimensions, or a solve that ran out of `max_steps`.
  """
  _check_process(process, "log_likelihood")
  _check_ode_options(divergence, n_probes, solver, rtol, atol, max_steps, dt0, autodiff)
  x = _check_continuous(x, "log_likelihood")
  _check_exact_dim(divergence, x)
  rtol_a, atol_a, dt0 = _tolerances(process, rtol, atol, dt0)
  with _forward_mode_hint(autodiff):
    logp, info = _ode_log_likelihood(key, process, x.astype(jnp.float32), rtol_a, atol_a, dt0=dt0,
                                     score_fn=score_fn, divergence=divergence, n_probes=int(n_probes),
                                     solver=solver, max_steps=int(max_steps), autodiff=autodiff)
  _raise_if_failed(info["success"], fn="log_likelihood", process=process, rtol=rtol, atol=atol,
                   max_steps=max_steps)
  return logp, info


# --------------------------------------------------------------------------------------
# Bits per dimension of 8-bit images (uniform dequantization)
# --------------------------------------------------------------------------------------


def dequantization_scale(centered: bool) -> tuple[float, float]:
  """`(a, b)` with model data `x = a (k + u) + b` for pixel k and dequantization noise u.

  `y = (k + u) / 256` in [0, 1); centered data is `2 y - 1`. Since `z = k + u` has unit
  bins, `-log2 P(k) <= -E_u[log2 p_z(k + u)] = -E_u[log2 p_x(x)] - D log2(a)`; per
  dimension the offset `-log2(a)` is 7 bits for [-1, 1] data and 8 for [0, 1] data
  (score_sde's `7 - inverse_scaler(-1)`).
  """
  return (2.0 / 256.0, -1.0) if centered else (1.0 / 256.0, 0.0)


def bpd_from_logp(logp: Array, num_dims: int, scale: float = 1.0) -> Array:
  """Bits per dimension of a density `logp` (nats) of data `x = scale * z + shift` in z's units."""
  return -(logp / num_dims + math.log(scale)) / LN2


@functools.partial(jax.jit, static_argnames=("score_fn", "centered", "n_repeats", "divergence", "n_probes",
                                             "solver", "max_steps", "dt0", "autodiff"))
def _ode_bits_per_dim(key, process, pixels, rtol, atol, *, dt0, score_fn, centered, n_repeats, divergence,
                      n_probes, solver, max_steps, autodiff="forward"):
  a, b = dequantization_scale(centered)
  ode = dict(divergence=divergence, n_probes=n_probes, solver=solver, max_steps=max_steps, autodiff=autodiff)
  d = math.prod(pixels.shape[1:])

  def one_draw(k):
    k_u, k_probe = jax.random.split(k)
    u = jax.random.uniform(k_u, pixels.shape, jnp.float32)
    x = (pixels.astype(jnp.float32) + u) * a + b
    logp, info = _ode_log_likelihood(k_probe, process, x, rtol, atol, dt0=dt0, score_fn=score_fn, **ode)
    return bpd_from_logp(logp, d, a), info["nfe"], info["success"]

  bpd, nfe, success = jax.lax.map(one_draw, jax.random.split(key, n_repeats))
  mean = jnp.mean(bpd, axis=0)
  if n_repeats > 1:
    stderr = jnp.std(bpd, axis=0, ddof=1) / math.sqrt(n_repeats)
  else:
    stderr = jnp.full_like(mean, jnp.nan)
  return mean, stderr, {"bpd": bpd, "nfe": nfe, "success": jnp.all(success)}


def bits_per_dim(key: Array, process: Process, score_fn: ScoreFn, x: Array, *, centered: bool = True,
                 n_repeats: int = 1, divergence: str = "hutchinson_rademacher", rtol: float = 1e-5,
                 atol: float = 1e-5, n_probes: int = 1, solver: str = "tsit5", max_steps: int = 4096,
                 dt0: float | None = None, autodiff: str = "forward") -> tuple[Array, Array, dict[str, Array]]:
  """Bits/dim of 8-bit images under the probability-flow ODE, with uniform dequantization.

  Each of `n_repeats` draws dequantizes `x` to `(x + u) / 256`, maps it to the model's
  scale (`2 y - 1` when `centered`) and solves the likelihood ODE with fresh probes; the
  bits/dim include the change of variables to pixel units (+7 for [-1, 1] data, +8 for
  [0, 1], see `dequantization_scale`) and are averaged over the draws, as score_sde does.

  Args:
    key: PRNG key (dequantization noise and probes).
    process, score_fn: as for `log_likelihood`.
    x: `[B, H, W, C]` (any `[B, ...]`) integer pixels in [0, 255], not scaled.
    centered: the model's data scale: [-1, 1] (True) or [0, 1] (False), as in training.
    n_repeats: dequantization (and probe) draws per example.
    divergence, rtol, atol, n_probes, solver, max_steps, dt0, autodiff: as for `log_likelihood`.

  Returns:
    `(mean_bpd [B], stderr [B], info)`: the per-example mean over draws and its standard
    error (std over draws / sqrt(n_repeats); NaN for n_repeats=1). info holds `bpd
    [n_repeats, B]`, `nfe [n_repeats]` and `success`.
  """
  _check_process(process, "bits_per_dim")
  _check_ode_options(divergence, n_probes, solver, rtol, atol, max_steps, dt0, autodiff)
  _check_number("n_repeats", n_repeats, integer=True)
  x = _check_pixels(x, "bits_per_dim")
  _check_exact_dim(divergence, x)
  rtol_a, atol_a, dt0 = _tolerances(process, rtol, atol, dt0)
  with _forward_mode_hint(autodiff):
    mean, stderr, info = _ode_bits_per_dim(
        key, process, x, rtol_a, atol_a, dt0=dt0, score_fn=score_fn, centered=bool(centered),
        n_repeats=int(n_repeats), divergence=divergence, n_probes=int(n_probes), solver=solver,
        max_steps=int(max_steps), autodiff=autodiff)
  _raise_if_failed(info["success"], fn="bits_per_dim", process=process, rtol=rtol, atol=atol,
                   max_steps=max_steps)
  return mean, stderr, info


# --------------------------------------------------------------------------------------
# The DDPM variational bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021)
# --------------------------------------------------------------------------------------


def _log_ndtr_diff(lo: Array, hi: Array) -> Array:
  """log(Phi(hi) - Phi(lo)) for lo < hi (either may be infinite), accurate in both tails."""
  flip = (lo + hi) > 0  # in the upper tail use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
  a = jnp.where(flip, -hi, lo)
  b = jnp.where(flip, -lo, hi)
  log_b = jax.scipy.special.log_ndtr(b)
  log_a = jax.scipy.special.log_ndtr(a)
  return log_b + jnp.log(-jnp.expm1(log_a - log_b))


def discretized_gaussian_log_prob(x: Array, mean: Array, std: Array, *,
                                  data_range: tuple[float, float] = (-1.0, 1.0),
                                  num_bins: int = 256) -> Array:
  """log P(x) per element for a Gaussian discretized to `num_bins` levels (Ho et al.'s decoder).

  The levels are `lo + k (hi - lo) / (num_bins - 1)`; each owns the interval of half a
  level spacing either side, the first reaching down to -inf and the last up to +inf, so
  the probabilities of all levels sum to one. `x` must lie on the levels.
  """
  lo, hi = (float(v) for v in data_range)
  return _discretized_gaussian_log_prob(x, mean, std, data_range=(lo, hi), num_bins=int(num_bins))


@functools.partial(jax.jit, static_argnames=("data_range", "num_bins"))
def _discretized_gaussian_log_prob(x, mean, std, *, data_range, num_bins):
  lo, hi = data_range
  half = 0.5 * (hi - lo) / (num_bins - 1)
  std = jnp.broadcast_to(std, jnp.shape(x))
  lower = jnp.where(x < lo + half, -jnp.inf, (x - half - mean) / std)
  upper = jnp.where(x > hi - half, jnp.inf, (x + half - mean) / std)
  return _log_ndtr_diff(lower, upper)


def _gaussian_kl(mean_q, var_q, mean_p, var_p, axes) -> Array:
  """KL(N(mean_q, var_q) || N(mean_p, var_p)) summed over `axes` (variances broadcast)."""
  per_dim = 0.5 * (jnp.log(var_p / var_q) + var_q / var_p - 1.0) + 0.5 * (mean_q - mean_p) ** 2 / var_p
  return jnp.sum(jnp.broadcast_to(per_dim, mean_q.shape), axis=axes)


@functools.partial(jax.jit, static_argnames=("score_fn", "num_sampled_steps", "variance", "decoder",
                                             "data_range", "clip_denoised"))
def _ddpm_vlb(key, process, x, *, score_fn, num_sampled_steps, variance, decoder, data_range,
              clip_denoised):
  n = process.num_timesteps
  batch = x.shape[0]
  axes = tuple(range(1, x.ndim))
  lo, hi = data_range

  def x0_hat(x_t, t):
    # Tweedie: E[x0 | x_t] = (x_t + sigma^2 score) / alpha, the model's denoised estimate.
    a, s = bcast(process.alpha(t), x_t), bcast(process.sigma(t), x_t)
    x0 = (x_t + s**2 * _checked_score(score_fn, x_t, t)) / a
    return jnp.clip(x0, lo, hi) if clip_denoised else x0

  def step_kl(t, k):
    """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) at x_t ~ q(x_t | x0), `t: [B]` in 2..N."""
    x_t = process.marginal(x, t, jax.random.normal(k, x.shape, x.dtype))
    mean_q, var_q = process.posterior(x_t, x, t - 1.0, t)
    mean_p, _ = process.posterior(x_t, x0_hat(x_t, t), t - 1.0, t)
    if variance == "fixed_small":  # p's variance is q's: only the means differ
      return 0.5 * jnp.sum((mean_q - mean_p) ** 2, axis=axes) / var_q
    beta = process.betas[t.astype(jnp.int32) - 1]
    return _gaussian_kl(mean_q, bcast(var_q, x), mean_p, bcast(beta, x), axes)

  k_t, k_steps, k_dec = jax.random.split(key, 3)
  if num_sampled_steps is None:  # all N - 1 terms, one network call per step for the whole batch
    ts = jnp.broadcast_to(jnp.arange(2, n + 1, dtype=jnp.float32)[:, None], (n - 1, batch))
  else:
    ts = jax.random.randint(k_t, (num_sampled_steps, batch), 2, n + 1).astype(jnp.float32)
  keys = jax.random.split(k_steps, ts.shape[0])
  terms = jax.lax.map(lambda tk: step_kl(*tk), (ts, keys))  # [steps, B]
  if num_sampled_steps is None:
    diffusion = jnp.sum(terms, axis=0)
    stderr = jnp.zeros_like(diffusion)
  else:
    diffusion = (n - 1) * jnp.mean(terms, axis=0)
    if num_sampled_steps > 1:
      stderr = (n - 1) * jnp.std(terms, axis=0, ddof=1) / math.sqrt(num_sampled_steps)
    else:
      stderr = jnp.full_like(diffusion, jnp.nan)

  # Prior: KL(q(x_N | x0) || N(0, prior_std^2 I)).
  t_n = jnp.full((batch,), float(n), jnp.float32)
  prior = _gaussian_kl(bcast(process.alpha(t_n), x) * x, bcast(process.sigma(t_n) ** 2, x),
                       jnp.zeros_like(x), jnp.asarray(process.prior_std**2, x.dtype), axes)

  # Decoder -log p(x0 | x1): mean x0_hat(x1, 1) (the posterior mean at s = 0), variance the
  # posterior variance of step 2, beta_2 (1 - abar_1) / (1 - abar_2), under both variance
  # choices (the step-1 posterior variance is 0), as in improved-diffusion.
  t_1 = jnp.ones((batch,), jnp.float32)
  x_1 = process.marginal(x, t_1, jax.random.normal(k_dec, x.shape, x.dtype))
  mean_dec, _ = process.posterior(x_1, x0_hat(x_1, t_1), jnp.zeros_like(t_1), t_1)
  _, var_dec = process.posterior(x_1, x, t_1, 2.0 * t_1)
  std_dec = bcast(jnp.sqrt(var_dec), x)
  if decoder == "discretized":
    log_dec = discretized_gaussian_log_prob(x, mean_dec, std_dec, data_range=data_range)
  else:
    log_dec = jax.scipy.stats.norm.logpdf(x, mean_dec, std_dec)
  decoder_nll = -jnp.sum(log_dec, axis=axes)

  nats = prior + diffusion + decoder_nll
  info = {"prior": prior, "diffusion": diffusion, "decoder": decoder_nll, "terms": terms, "t": ts,
          "nfe": jnp.asarray(ts.shape[0] + 1, jnp.int32)}
  return nats, stderr, info


def _check_vlb_options(process, fn, num_sampled_steps, variance, decoder) -> None:
  _check_process(process, fn)
  if not isinstance(process, DDPM):
    raise InputError(f"{fn} needs a discrete-time DDPM process, not {type(process).__name__}; "
                     f"use log_likelihood / bits_per_dim (the probability-flow ODE) instead.")
  if process.num_timesteps < 2:
    raise InputError(f"{fn} needs a DDPM with at least 2 steps; got num_timesteps={process.num_timesteps}.")
  check_choice("variance", variance, VARIANCES)
  check_choice("decoder", decoder, DECODERS)
  if num_sampled_steps is not None:
    _check_number("num_sampled_steps", num_sampled_steps, integer=True)


def ddpm_vlb(key: Array, process: DDPM, score_fn: ScoreFn, x: Array, *,
             num_sampled_steps: int | None = None, variance: str = "fixed_small",
             decoder: str = "discretized", data_range: tuple[float, float] = (-1.0, 1.0),
             clip_denoised: bool = False) -> tuple[Array, Array, dict[str, Array]]:
  """Ho et al.'s variational bound -log p(x0) <= L_prior + sum_t L_{t-1} + L_0, in nats.

  * `L_prior = KL(q(x_N | x0) || N(0, I))`;
  * `L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))` for t = 2..N, at one draw
    `x_t ~ q(x_t | x0)` per term; the model's mean is the posterior mean with `x0` replaced
    by `x0_hat = (x_t + sigma_t^2 score) / alpha_t` (the network's own x0 / eps prediction);
    its variance is the posterior variance ("fixed_small") or beta_t ("fixed_large");
  * `L_0 = -log p(x0 | x1)`: the discretized Gaussian decoder on 256 levels of
    `data_range` ("discretized", for 8-bit data), or the Gaussian density ("gaussian", for
    continuous data).

  Args:
    key: PRNG key (the x_t draws and sampled timesteps).
    process: a `processes.DDPM`.
    score_fn: `score_fn(x, t) -> score`, t the DDPM step 1..N (as from
      `parameterization.score_fn_from_network`).
    x: `[B, ...]` float data in the model's scale; for "discretized", on the 256 levels of
      `data_range` (e.g. `k / 127.5 - 1`).
    num_sampled_steps: None evaluates all N - 1 KL terms (one `lax.map` over t, N - 1
      network calls per batch); K estimates their sum from K timesteps per example drawn
      uniformly from 2..N (unbiased; its standard error is returned).
    variance: "fixed_small" or "fixed_large" (Ho et al.'s two fixed choices).
    decoder: "discretized" or "gaussian".
    data_range: (lo, hi) of the data, for the decoder's levels and for clipping.
    clip_denoised: clip x0_hat to data_range (the model improved-diffusion evaluates).

  Returns:
    `(nats [B], stderr [B], info)`: the bound, the standard error of its sampled-timestep
    estimate (0 when all terms are evaluated; NaN for K=1), and info with the parts
    `prior`, `diffusion`, `decoder` `[B]`, the per-step `terms` and their `t`
    `[steps, B]`, and `nfe` (network calls per example).
  """
  _check_vlb_options(process, "ddpm_vlb", num_sampled_steps, variance, decoder)
  x = _check_continuous(x, "ddpm_vlb")
  lo, hi = (float(v) for v in data_range)
  if not lo < hi:
    raise InputError(f"data_range={tuple(data_range)} must be (lo, hi) with lo < hi, e.g. (-1.0, 1.0).")
  return _ddpm_vlb(key, process, x.astype(jnp.float32), score_fn=score_fn,
                   num_sampled_steps=None if num_sampled_steps is None else int(num_sampled_steps),
                   variance=variance, decoder=decoder, data_range=(lo, hi),
                   clip_denoised=bool(clip_denoised))


def vlb_bits_per_dim(key: Array, process: DDPM, score_fn: ScoreFn, x: Array, *, centered: bool = True,
                     num_sampled_steps: int | None = None, variance: str = "fixed_small",
                     clip_denoised: bool = False) -> tuple[Array, Array, dict[str, Array]]:
  """The DDPM bound in bits/dim for 8-bit images `x` (integers in [0, 255]).

  Pixels are scaled as in Ho et al., `k / 127.5 - 1` (centered) or `k / 255`, and the
  discretized decoder gives a probability mass, so no dequantization offset is needed.
  Returns `(bpd [B], stderr [B], info)` as `ddpm_vlb` (in bits/dim).
  """
  _check_vlb_options(process, "vlb_bits_per_dim", num_sampled_steps, variance, "discretized")
  x = _check_pixels(x, "vlb_bits_per_dim")
  data_range = (-1.0, 1.0) if centered else (0.0, 1.0)
  scaled = x.astype(jnp.float32) / 255.0 * (data_range[1] - data_range[0]) + data_range[0]
  nats, stderr, info = _ddpm_vlb(
      key, process, scaled, score_fn=score_fn,
      num_sampled_steps=None if num_sampled_steps is None else int(num_sampled_steps),
      variance=variance, decoder="discretized", data_range=data_range, clip_denoised=bool(clip_denoised))
  per_dim = math.prod(x.shape[1:]) * LN2
  return nats / per_dim, stderr / per_dim, info


__all__ = ["log_likelihood", "bits_per_dim", "ddpm_vlb", "vlb_bits_per_dim", "discretized_gaussian_log_prob",
           "dequantization_scale", "bpd_from_logp", "DIVERGENCES", "SOLVERS", "VARIANCES", "DECODERS",
           "MAX_EXACT_DIM"]
