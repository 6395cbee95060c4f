"""Every sampler behind one call: `sample(key, process, score_fn, shape, method=...)`.

`score_fn(x, t) -> grad log p_t(x)` takes `x: [B, ...]` and `t: [B]`; wrap a trained
network of any parameterization with `parameterization.score_fn_from_network`.

Time grid: `ts` holds the decreasing times at which the network is evaluated, from T down
to t_min (by default `process.default_grid(num_steps)`: uniform in t, integer steps for
DDPM, Karras' rho-grid for EDM). A fixed-step method moves from `ts[i]` to `ts[i+1]`;
with `denoise=True` (the default) a last step from `ts[-1]` to the data returns the
denoised `x0_hat(x, ts[-1])` (one more network evaluation). With DDPM and
`ts = N, N-1, ..., 1` the `ancestral` method is exactly Ho et al.'s sampler.

Every fixed-step loop is one `lax.scan`; the whole sampler is traceable, so wrap the call
in `jax.jit` (and close over the parameters) to compile it once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InputError
from jaxdiff.processes import Process, bcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


# --------------------------------------------------------------------------------------
# Small helpers shared by the methods
# --------------------------------------------------------------------------------------


def _full(t, x) -> Array:
  return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def x0_eps_from_score(process: Process, score: Array, x: Array, t: Array) -> tuple[Array, Array]:
  """(x0_hat, eps_hat) from a score at `x = x_t` (Tweedie)."""
  a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
  eps = -s * score
  return (x - s * eps) / a, eps


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a method's step sees: the process, the score function and the options."""

  process: Process
  score_fn: ScoreFn
  opts: dict[str, Any]

  def x0_eps(self, x: Array, t: Array) -> tuple[Array, Array]:
    return x0_eps_from_score(self.process, self.score_fn(x, t), x, t)


@dataclasses.dataclass(frozen=True)
class Method:
  """A fixed-step sampler: `step(ctx, x, t, s, key, carry) -> (x, carry)`, t > s scalars."""

  name: str
  step: Callable[..., tuple[Array, Any]]
  options: dict[str, Any]  # option name -> default
  nfe_per_step: int = 1
  init_carry: Callable[[Array], Any] = lambda x: ()
  check: Callable[[Process, dict], None] = lambda process, opts: None
  doc: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  METHODS[method.name] = method
  return method


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def _ancestral_step(ctx: StepContext, x, t, s, key, carry):
  tt, ss = _full(t, x), _full(s, x)
  x0, _ = ctx.x0_eps(x, tt)
  mean, var = ctx.process.posterior(x, x0, ss, tt)
  z = jax.random.normal(key, x.shape, x.dtype)
  return mean + bcast(jnp.sqrt(var), x) * z, carry


register(Method(
    "ancestral", _ancestral_step, {},
    doc="DDPM ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al.; "
        "for VE this is SMLD's reverse diffusion with the exact posterior)."))


def _ddim_step(ctx: StepContext, x, t, s, key, carry):
  p = ctx.process
  tt, ss = _full(t, x), _full(s, x)
  x0, eps = ctx.x0_eps(x, tt)
  _, post_var = p.posterior(x, x0, ss, tt)
  c2 = ctx.opts["eta"] ** 2 * post_var
  sig_s = p.sigma(ss)
  dir_coef = jnp.sqrt(jnp.maximum(sig_s**2 - c2, 0.0))
  z = jax.random.normal(key, x.shape, x.dtype)
  x = bcast(p.alpha(ss), x) * x0 + bcast(dir_coef, x) * eps + bcast(jnp.sqrt(c2), x) * z
  return x, carry


register(Method(
    "ddim", _ddim_step, {"eta": 0.0},
    doc="DDIM (Song et al. 2021): eta=0 deterministic (the probability-flow ODE's Euler step "
        "in x/alpha and sigma/alpha), eta=1 the ancestral sampler."))


def _euler_step(ctx: StepContext, x, t, s, key, carry):
  tt = _full(t, x)
  drift = ctx.process.probability_flow_drift(x, tt, ctx.score_fn(x, tt))
  return x + (s - t) * drift, carry


register(Method(
    "euler", _euler_step, {},
    doc="First-order Euler step of the probability-flow ODE in t (for EDM, Karras' Euler)."))


# --------------------------------------------------------------------------------------
# The one public entry point
# --------------------------------------------------------------------------------------


def _validate_grid(ts, process: Process) -> None:
  try:
    arr = np.asarray(ts, dtype=np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced grid: values checked by the caller
  if arr.ndim != 1 or arr.shape[0] < 1:
    raise InputError(f"ts must be a 1-D array of times; got shape {arr.shape}.")
  if np.any(np.diff(arr) >= 0):
    raise InputError(f"ts must be strictly decreasing (from T towards t_min); got {arr[:6]}...")
  lo, hi = process.t_min, process.T
  tol = 1e-6 * max(1.0, abs(hi))
  if arr[0] > hi + tol or arr[-1] < lo - tol:
    raise InputError(f"ts must lie in [t_min, T] = [{lo:g}, {hi:g}] of {type(process).__name__}; "
                     f"got [{arr[-1]:g}, {arr[0]:g}].")


def _check_score_fn(score_fn: ScoreFn, x: Array) -> None:
  t = jnp.zeros((x.shape[0],), jnp.float32)
  out = jax.eval_shape(score_fn, x, t)
  if not hasattr(out, "shape") or out.shape != x.shape or out.dtype != x.dtype:
    got = f"{getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}"
    raise InputError(f"score_fn(x, t) must return an array of x's shape and dtype "
                     f"{x.shape} {x.dtype}; it returned {got}.")


def sample(
    key: Array,
    process: Process,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    *,
    method: str,
    num_steps: int | None = None,
    ts: Array | None = None,
    denoise: bool = True,
    x_init: Array | None = None,
    **options,
) -> tuple[Array, dict[str, Any]]:
  """Draws samples of `shape = (B, ...)` from the reverse of `process`.

  Args:
    key: PRNG key.
    process: the diffusion process the score belongs to.
    score_fn: `score_fn(x [B,...], t [B]) -> grad log p_t(x)`.
    shape: the output shape, batch first; any trailing shape (images, 2-D points).
    method: one of `METHODS` (see README for each).
    num_steps: number of evaluation times in the default grid.
    ts: explicit decreasing evaluation times in [t_min, T]; overrides `num_steps`.
    denoise: finish with `x0_hat(x, ts[-1])` (one more network evaluation).
    x_init: start from this `x_T` instead of a prior draw (e.g. SDEdit).
    **options: the method's options (e.g. `eta` for ddim); unknown ones are an error.

  Returns:
    (samples [shape], info) with `info["nfe"]` the number of network evaluations (an int).
  """
  if method not in METHODS:
    raise InputError(f"method={method!r} is not known; valid methods are: {', '.join(sorted(METHODS))}.")
  m = METHODS[method]
  unknown = sorted(set(options) - set(m.options))
  if unknown:
    valid = ", ".join(sorted(m.options)) or "(none)"
    raise InputError(f"option(s) {unknown} are not known for method={method!r}; its options are: {valid}.")
  opts = {**m.options, **options}
  m.check(process, opts)

  if ts is None:
    if num_steps is None:
      raise InputError(f"sample(method={method!r}) needs num_steps=<int> or an explicit ts grid.")
    if int(num_steps) < 1:
      raise InputError(f"num_steps={num_steps} must be >= 1.")
    ts = process.default_grid(int(num_steps))
  else:
    _validate_grid(ts, process)
  ts = jnp.asarray(ts, jnp.float32)
  n = ts.shape[0]

  k_init, k_loop = jax.random.split(key)
  if x_init is None:
    x = process.prior_sample(k_init, tuple(shape))
  else:
    if tuple(x_init.shape) != tuple(shape):
      raise InputError(f"x_init has shape {tuple(x_init.shape)} but shape={tuple(shape)}.")
    x = x_init
  _check_score_fn(score_fn, x)
  ctx = StepContext(process, score_fn, opts)

  def body(carry, inp):
    x, c = carry
    i, t, s = inp
    x, c = m.step(ctx, x, t, s, jax.random.fold_in(k_loop, i), c)
    return (x, c), None

  nfe = 0
  if n > 1:
    steps = (jnp.arange(n - 1), ts[:-1], ts[1:])
    (x, _), _ = jax.lax.scan(body, (x, m.init_carry(x)), steps)
    nfe += (n - 1) * m.nfe_per_step
  if denoise:
    x, _ = ctx.x0_eps(x, _full(ts[-1], x))
    nfe += 1
  return x, {"nfe": nfe, "num_steps": n}


def describe_methods() -> str:
  """A one-line-per-method summary (used by the README and `--help`)."""
  lines = []
  for name in sorted(METHODS):
    m = METHODS[name]
    opts = ", ".join(f"{k}={v!r}" for k, v in m.options.items()) or "-"
    lines.append(f"{name}: {m.doc} [options: {opts}; NFE/step: {m.nfe_per_step}]")
  return "\n".join(lines)


__all__ = ["sample", "METHODS", "Method", "register", "x0_eps_from_score", "describe_methods"]
