"""Every sampler behind one call: `sample(key, process, score_fn, shape, method=...)`.

`score_fn(x, t) -> grad log p_t(x)` takes `x: [B, ...]` and `t: [B]`; wrap a trained
network of any parameterization with `parameterization.score_fn_from_network`.

Time grid: `ts` holds the decreasing times at which the network is evaluated, from T down
to t_min (by default the method's grid of `num_steps` points: `process.default_grid`
(uniform in t, integer steps for DDPM, Karras' rho-grid for EDM), a rho=7 grid in
sigma/alpha for `heun` (and, without t_min, `consistency`), a grid uniform in log-SNR for
`dpm_solver++`). A fixed-step
method moves from `ts[i]` to `ts[i+1]`; with `denoise=True` (the default) a last step from
`ts[-1]` to the data returns the denoised `x0_hat(x, ts[-1])` (one more network
evaluation). With DDPM and `ts = N, N-1, ..., 1` the `ancestral` method is exactly Ho et
al.'s sampler.

Methods (see `METHODS` and `describe_methods()`; NFE = network evaluations):

| method            | what                                               | NFE per step |
|-------------------|----------------------------------------------------|--------------|
| `ancestral`       | DDPM posterior sampling                            | 1            |
| `ddim`            | DDIM, `eta` in [0, 1]                              | 1            |
| `euler_maruyama`  | Euler-Maruyama on the reverse SDE (score_sde)      | 1            |
| `reverse_diffusion` | score_sde's reverse-diffusion predictor          | 1            |
| `pc`              | a predictor + Langevin corrector (score_sde)       | 1 + n_corrector_steps |
| `ald`             | annealed Langevin dynamics (NCSN), alpha=1 only    | n_steps_each |
| `euler`           | Euler on the probability-flow ODE in t             | 1            |
| `heun`            | Karras et al.'s 2nd-order sampler with churn       | 2            |
| `dpm_solver++`    | DPM-Solver++ multistep, order 1..3                 | 1            |
| `consistency`     | consistency models' multistep sampler              | 1            |
| `ode`             | adaptive Tsit5/Dopri5 (diffrax) on the PF ODE      | adaptive     |

Every fixed-step loop is one `lax.scan`; the `ode` solve is one on-device diffrax while
loop. The whole sampler is traceable, so wrap the call in `jax.jit` (and close over the
parameters) to compile it once.

Controlled generation (inpainting, colorization: `jaxdiff.tasks`) uses one generic hook,
`sample(..., project=fn)`: `fn(x, t, key) -> x` is applied to the state at the time it is
at, after every update of every method (see `sample`).
"""

from __future__ import annotations

import dataclasses
import math
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
  """The time `t` (a scalar) for every example of `x`: `[B]`, what `score_fn` takes."""
  return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def _one(t) -> Array:
  """A scalar time as a `[1]` array: process coefficients broadcast from it against x."""
  return jnp.reshape(jnp.asarray(t, jnp.float32), (1,))


def x0_eps_from_score(process: Process, score: Array, x: Array, t: Array) -> tuple[Array, Array]:
  """(x0_hat, eps_hat) from a score at `x = x_t` (Tweedie)."""
  a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
  eps = -s * score
  return (x - s * eps) / a, eps


def _noise_level(process: Process, t: Array) -> tuple[Array, Array]:
  """(alpha(t), sigma(t) / alpha(t)): the scale and the noise level of `x / alpha`.

  In `y = x / alpha` every Gaussian process is `y = x0 + sigma_tilde eps`, an alpha=1
  process with noise `sigma_tilde = sigma / alpha`; its probability-flow ODE is
  `dy / dsigma_tilde = eps_hat` (Karras et al. 2022, eq. 4; DDIM's variables).
  """
  a = process.alpha(t)
  return a, process.sigma(t) / a


def _t_from_noise_level(process: Process, sig: Array) -> Array:
  """The time at which `sigma / alpha = sig` (log-SNR = -2 log sig)."""
  return process.t_from_log_snr(-2.0 * jnp.log(sig))


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a method's step sees: the process, the score function, the options and the grid."""

  process: Process
  score_fn: ScoreFn
  opts: dict[str, Any]
  ts: Array | None = None  # the whole grid, `[n]` float32
  project: Callable[[Array, Array, Array], Array] | None = None  # see `sample(project=...)`

  def projected(self, x: Array, t, key: Array) -> Array:
    """`project(x, t, key')` with a key of its own derived from `key` (x itself if no hook)."""
    if self.project is None:
      return x
    return self.project(x, jnp.asarray(t, jnp.float32), jax.random.fold_in(key, _PROJECT_STREAM))

  def score(self, x: Array, t) -> Array:
    """The score at scalar time `t` for every example."""
    return self.score_fn(x, _full(t, x))

  def x0_eps(self, x: Array, t) -> tuple[Array, Array]:
    """(x0_hat, eps_hat) at scalar (or `[B]`) time `t`."""
    tt = _full(t, x) if jnp.ndim(t) == 0 else t
    return x0_eps_from_score(self.process, self.score_fn(x, tt), x, tt)


# fold_in tag of the keys `project` gets (independent of the steps' own noise).
_PROJECT_STREAM = 0x70726F6A


def _no_carry(x: Array, opts: dict) -> Any:
  del x, opts
  return ()


def _no_check(process: Process, opts: dict) -> None:
  del process, opts


@dataclasses.dataclass(frozen=True)
class Method:
  """A sampling method.

  A fixed-step method gives `step(ctx, x, t, s, key, carry) -> (x, carry)` (t > s are
  scalars), run as one `lax.scan` over the grid; an adaptive one gives `solve(ctx, x, key)
  -> (x, nfe, num_steps)` instead.

  Attributes:
    name: the user-facing name.
    step: the fixed-step update (None for adaptive methods).
    options: option name -> default.
    nfe_per_step: network evaluations per step, an int or `fn(opts) -> int`.
    init_carry: `fn(x, opts)` -> the scan carry a multistep method keeps.
    check: `fn(process, opts)` raising InputError for options or processes it does not take.
    check_grid: `fn(process, opts, t_last)`, a check that needs the grid's last time (a
      float: t_min for default grids, ts[-1] for a concrete user grid; skipped if traced).
    doc: one line for the README and `--help`.
    grid: `fn(process, num_steps, opts) -> ts`, the default grid (None: `process.default_grid`).
    final: `fn(ctx, x, key, denoise) -> x`, what happens at the last grid point (None:
      `x0_hat(x, ts[-1])` if denoise), with `final_nfe(opts, denoise)` evaluations.
    solve: the adaptive solver (None for fixed-step methods).
  """

  name: str
  step: Callable[..., tuple[Array, Any]] | None
  options: dict[str, Any]
  nfe_per_step: int | Callable[[dict], int] = 1
  init_carry: Callable[[Array, dict], Any] = _no_carry
  check: Callable[[Process, dict], None] = _no_check
  check_grid: Callable[[Process, dict, float], None] | None = None
  doc: str = ""
  grid: Callable[[Process, int, dict], Array] | None = None
  final: Callable[..., Array] | None = None
  final_nfe: Callable[[dict, bool], int] | None = None
  solve: Callable[..., tuple[Array, Array, Array]] | None = None

  def step_nfe(self, opts: dict) -> int:
    """Network evaluations per grid step with options `opts`."""
    return int(self.nfe_per_step(opts) if callable(self.nfe_per_step) else self.nfe_per_step)

  def fixed_nfe(self, opts: dict, num_points: int, denoise: bool = True) -> int:
    """Network evaluations of a fixed-step run over `num_points` grid times."""
    if self.final_nfe is not None:
      final = int(self.final_nfe(opts, denoise))
    else:
      final = int(denoise)
    return (num_points - 1) * self.step_nfe(opts) + final


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  METHODS[method.name] = method
  return method


def _check_choice(method: str, name: str, value, choices) -> None:
  if value not in choices:
    raise InputError(f"{method} option {name}={value!r} is not known; valid values are: "
                     f"{', '.join(repr(c) for c in choices)}.")


def _check_number(method: str, name: str, value, *, lo: float, strict: bool = False,
                  integer: bool = False) -> None:
  """Requires `value >= lo` (or `> lo` if strict), and an int if `integer`."""
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if ok and integer:
    ok = float(value).is_integer()
  if ok:
    ok = value > lo if strict else value >= lo
  if not ok:
    kind = "an integer" if integer else "a number"
    rel = ">" if strict else ">="
    raise InputError(f"{method} option {name}={value!r} must be {kind} {rel} {lo:g}.")


def _alpha_is_one(process: Process) -> bool | None:
  """Whether alpha(t) = 1 on the whole interval (None if the process is traced)."""
  try:
    a = np.asarray(process.alpha(jnp.asarray([process.T, 0.5 * (process.T + process.t_min), process.t_min])))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return bool(np.allclose(a, 1.0, rtol=0, atol=1e-6))


# --------------------------------------------------------------------------------------
# Ancestral, DDIM, Euler-Maruyama, reverse diffusion, Euler (one NFE per step)
# --------------------------------------------------------------------------------------


def _ancestral_step(ctx: StepContext, x, t, s, key, carry):
  x0, _ = ctx.x0_eps(x, t)
  mean, var = ctx.process.posterior(x, x0, _one(s), _one(t))
  z = jax.random.normal(key, x.shape, x.dtype)
  return mean + bcast(jnp.sqrt(var), x) * z, carry


register(Method(
    "ancestral", _ancestral_step, {},
    doc="DDPM ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020; "
        "for VE it is SMLD's reverse diffusion with the exact posterior). All processes."))


def _check_ddim(process: Process, opts: dict) -> None:
  del process
  _check_number("ddim", "eta", opts["eta"], lo=0.0)


def _ddim_step(ctx: StepContext, x, t, s, key, carry):
  p = ctx.process
  tt, ss = _one(t), _one(s)
  x0, eps = ctx.x0_eps(x, t)
  _, post_var = p.posterior(x, x0, ss, tt)
  c2 = ctx.opts["eta"] ** 2 * post_var
  dir_coef = jnp.sqrt(jnp.maximum(p.sigma(ss) ** 2 - c2, 0.0))
  x = bcast(p.alpha(ss), x) * x0 + bcast(dir_coef, x) * eps
  if ctx.opts["eta"]:  # a static option: eta=0 draws no noise
    z = jax.random.normal(key, x.shape, x.dtype)
    x = x + bcast(jnp.sqrt(c2), x) * z
  return x, carry


register(Method(
    "ddim", _ddim_step, {"eta": 0.0}, check=_check_ddim,
    doc="DDIM (Song et al. 2021): eta=0 deterministic (the probability-flow ODE's Euler step "
        "in x/alpha and sigma/alpha), eta=1 the ancestral sampler. All processes."))


def _euler_maruyama_step(ctx: StepContext, x, t, s, key, carry):
  f, g2 = ctx.process.f_g2(_one(t))
  drift = bcast(f, x) * x - bcast(g2, x) * ctx.score(x, t)  # reverse SDE drift
  z = jax.random.normal(key, x.shape, x.dtype)
  return x + (s - t) * drift + bcast(jnp.sqrt(jnp.maximum(g2, 0.0) * (t - s)), x) * z, carry


register(Method(
    "euler_maruyama", _euler_maruyama_step, {},
    doc="Euler-Maruyama on the reverse-time SDE dx = (f x - g^2 score) dt + g dW "
        "(score_sde's EulerMaruyamaPredictor). All processes."))


def _reverse_diffusion_step(ctx: StepContext, x, t, s, key, carry):
  # The forward step s -> t is x_t = a x_s + sqrt(v) z; score_sde reverses it as
  # x_s = x_t - [(a - 1) x_t - v score] + sqrt(v) z.
  a, v = ctx.process.transition(_one(s), _one(t))
  z = jax.random.normal(key, x.shape, x.dtype)
  x = bcast(2.0 - a, x) * x + bcast(v, x) * ctx.score(x, t) + bcast(jnp.sqrt(v), x) * z
  return x, carry


register(Method(
    "reverse_diffusion", _reverse_diffusion_step, {},
    doc="score_sde's ReverseDiffusionPredictor on the discretization x_t = a x_s + sqrt(v) z "
        "of the process's own transition between grid points. All processes."))


def _euler_step(ctx: StepContext, x, t, s, key, carry):
  drift = ctx.process.probability_flow_drift(x, _one(t), ctx.score(x, t))
  return x + (s - t) * drift, carry


register(Method(
    "euler", _euler_step, {},
    doc="First-order Euler step of the probability-flow ODE dx/dt = f x - g^2 score / 2 in t "
        "(for EDM, Karras' Euler sampler). All processes."))


# --------------------------------------------------------------------------------------
# Langevin: the predictor-corrector sampler and annealed Langevin dynamics
# --------------------------------------------------------------------------------------

PREDICTORS = ("ancestral", "ddim", "euler_maruyama", "reverse_diffusion", "euler")


def _langevin_corrector(ctx: StepContext, x, t, alpha_i, key):
  """score_sde's LangevinCorrector: `n_corrector_steps` steps at time t.

  Step size `2 alpha_i (snr ||z|| / ||score||)^2` with the norms averaged over the batch,
  as in score_sde (`alpha_i = 1 - beta_i` for VP-type processes, 1 for VE).
  """
  n, snr = int(ctx.opts["n_corrector_steps"]), ctx.opts["snr"]
  batch = x.shape[0]

  def body(j, x):
    g = ctx.score(x, t)
    z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
    g_norm = jnp.mean(jnp.linalg.norm(g.reshape(batch, -1), axis=-1))
    z_norm = jnp.mean(jnp.linalg.norm(z.reshape(batch, -1), axis=-1))
    eps = 2.0 * alpha_i * (snr * z_norm / jnp.maximum(g_norm, 1e-20)) ** 2
    return ctx.projected(x + eps * g + jnp.sqrt(2.0 * eps) * z, t, jax.random.fold_in(key, j))

  if n == 0:
    return x
  if n == 1:
    return body(0, x)
  return jax.lax.fori_loop(0, n, body, x)


def _pc_alpha(ctx: StepContext, s, t) -> Array:
  """alpha_i = a^2 of the transition from s to t (1 - beta_i for VP, 1 for VE)."""
  a, _ = ctx.process.transition(_one(s), _one(t))
  return (a**2)[0]


def _pc_step(ctx: StepContext, x, t, s, key, carry):
  k_corr, k_pred = jax.random.split(key)
  x = _langevin_corrector(ctx, x, t, _pc_alpha(ctx, s, t), k_corr)
  return METHODS[ctx.opts["predictor"]].step(ctx, x, t, s, k_pred, carry)


def _pc_final(ctx: StepContext, x, key, denoise: bool):
  ts = ctx.ts
  alpha_i = _pc_alpha(ctx, ts[-1], ts[-2]) if ts.shape[0] > 1 else jnp.float32(1.0)
  x = _langevin_corrector(ctx, x, ts[-1], alpha_i, key)
  return ctx.x0_eps(x, ts[-1])[0] if denoise else x


def _check_pc(process: Process, opts: dict) -> None:
  del process
  _check_choice("pc", "predictor", opts["predictor"], PREDICTORS)
  _check_number("pc", "snr", opts["snr"], lo=0.0, strict=True)
  _check_number("pc", "n_corrector_steps", opts["n_corrector_steps"], lo=0, integer=True)
  _check_number("pc", "eta", opts["eta"], lo=0.0)


register(Method(
    "pc", _pc_step,
    {"predictor": "reverse_diffusion", "snr": 0.16, "n_corrector_steps": 1, "eta": 0.0},
    nfe_per_step=lambda o: 1 + int(o["n_corrector_steps"]), check=_check_pc,
    final=_pc_final, final_nfe=lambda o, d: int(o["n_corrector_steps"]) + int(d),
    doc="Predictor-corrector (Song et al. 2021): at every grid point n_corrector_steps Langevin "
        "corrector steps with signal-to-noise ratio snr, then one step of the predictor "
        f"({' | '.join(PREDICTORS)}; eta for ddim). All processes."))


def _geometric_grid(process: Process, num_steps: int, opts: dict) -> Array:
  """NCSN's noise levels: sigma/alpha geometric from T to t_min (VE's own uniform-t grid)."""
  del opts
  _, hi = _noise_level(process, _one(process.T))
  _, lo = _noise_level(process, _one(process.t_min))
  sig = jnp.exp(jnp.linspace(jnp.log(hi[0]), jnp.log(lo[0]), num_steps))
  ts = _t_from_noise_level(process, sig)
  ts = ts.at[0].set(process.T)
  return ts.at[-1].set(process.t_min) if num_steps > 1 else ts


def _ald_langevin(ctx: StepContext, x, t, key):
  """Song & Ermon's inner loop at noise level sigma(t): step_lr * (sigma / sigma_L)^2."""
  p, ts = ctx.process, ctx.ts
  sig = p.sigma(_one(t))[0]
  sig_last = p.sigma(_one(ts[-1]))[0]
  step = ctx.opts["step_lr"] * (sig / sig_last) ** 2

  def body(j, x):
    z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
    x = x + 0.5 * step * ctx.score(x, t) + jnp.sqrt(step) * z
    return ctx.projected(x, t, jax.random.fold_in(key, j))

  return jax.lax.fori_loop(0, int(ctx.opts["n_steps_each"]), body, x)


def _ald_step(ctx: StepContext, x, t, s, key, carry):
  del s
  return _ald_langevin(ctx, x, t, key), carry


def _ald_final(ctx: StepContext, x, key, denoise: bool):
  x = _ald_langevin(ctx, x, ctx.ts[-1], key)
  return ctx.x0_eps(x, ctx.ts[-1])[0] if denoise else x


def _check_ald(process: Process, opts: dict) -> None:
  _check_number("ald", "n_steps_each", opts["n_steps_each"], lo=1, integer=True)
  _check_number("ald", "step_lr", opts["step_lr"], lo=0.0, strict=True)
  if _alpha_is_one(process) is False:
    raise InputError(
        f"method='ald' (annealed Langevin dynamics, NCSN) needs a process with alpha(t) = 1 "
        f"(VE or EDM), not {type(process).__name__}; use method='pc' (Langevin corrector) with it.")


def _check_ald_grid(process: Process, opts: dict, t_last: float) -> None:
  # The step at every level, relative to that level's variance, is at most
  # step_lr / sigma_L^2 (sigma_L: the last level); Langevin on a Gaussian diverges at 4.
  try:
    sig_last = float(np.asarray(process.sigma(jnp.asarray([t_last])))[0])
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  rel = opts["step_lr"] / sig_last**2
  if rel >= 2.0:
    raise InputError(
        f"ald option step_lr={opts['step_lr']:g} is too large for {type(process).__name__} with the "
        f"grid's smallest noise level sigma_L={sig_last:g}: step_lr / sigma_L^2 = {rel:.3g} must be "
        f"< 2 (NCSN: 2e-5 / 0.01^2 = 0.2); use step_lr <= {0.2 * sig_last**2:.2g}.")


register(Method(
    "ald", _ald_step, {"n_steps_each": 100, "step_lr": 2e-5},
    nfe_per_step=lambda o: int(o["n_steps_each"]), check=_check_ald, check_grid=_check_ald_grid,
    grid=_geometric_grid,
    final=_ald_final, final_nfe=lambda o, d: int(o["n_steps_each"]) + int(d),
    doc="Annealed Langevin dynamics (Song & Ermon 2019, NCSN): n_steps_each Langevin steps of "
        "size step_lr (sigma_i / sigma_min)^2 at every noise level of the grid (default: "
        "geometric in sigma, NCSN's levels); step_lr is NCSN's "
        "absolute eps: keep step_lr / sigma_min^2 ~ 0.1-0.2 (1e-6 for EDM's sigma_min = 0.002). "
        "VE and EDM only (alpha = 1)."))


# --------------------------------------------------------------------------------------
# Heun (Karras et al. 2022, Algorithm 2)
# --------------------------------------------------------------------------------------


def karras_grid_points(process: Process, i: Array, num_intervals, rho: float = 7.0) -> tuple[Array, Array]:
  """`(times, noise levels)` of points `i` (0 .. N) of Karras' grid with N = `num_intervals`
  intervals: levels sigma/alpha spaced uniformly in level^(1/rho) from the process's at T (i = 0)
  to its at t_min (i = N), mapped to times (exactly T and t_min at the ends). `i` and N may be
  traced (consistency training's grid grows during a run)."""
  _, hi = _noise_level(process, _one(process.T))
  _, lo = _noise_level(process, _one(process.t_min))
  i = jnp.asarray(i)
  frac = i.astype(jnp.float32) / jnp.asarray(num_intervals, jnp.float32)
  level = (hi[0] ** (1 / rho) + frac * (lo[0] ** (1 / rho) - hi[0] ** (1 / rho))) ** rho
  t = jnp.where(i == 0, jnp.float32(process.T), _t_from_noise_level(process, level))
  return jnp.where(i == num_intervals, jnp.float32(process.t_min), t), level


def _rho_grid(process: Process, num_steps: int, opts: dict) -> Array:
  """Karras' grid of `num_steps` times (`karras_grid_points`)."""
  return karras_grid_points(process, jnp.arange(num_steps), max(num_steps - 1, 1), float(opts["rho"]))[0]


def _churn(ctx: StepContext, y, t, key):
  """Karras' stochastic churn at t: returns (y_hat, t_hat, sigma_hat) in y = x / alpha."""
  p, o = ctx.process, ctx.opts
  _, sig = _noise_level(p, _one(t))
  if not o["s_churn"]:  # a static option: no churn, no extra work
    return y, _one(t), sig
  n = ctx.ts.shape[0]
  in_range = (sig >= o["s_tmin"]) & (sig <= o["s_tmax"])
  gamma = jnp.where(in_range, min(o["s_churn"] / n, math.sqrt(2.0) - 1.0), 0.0)
  t_hat = jnp.where(gamma > 0, _t_from_noise_level(p, sig * (1.0 + gamma)), _one(t))
  _, sig_hat = _noise_level(p, t_hat)  # consistent with t_hat even where t_hat is clamped
  z = jax.random.normal(key, y.shape, y.dtype)
  std = jnp.sqrt(jnp.maximum(sig_hat**2 - sig**2, 0.0)) * o["s_noise"]
  return y + bcast(std, y) * z, t_hat, sig_hat


def _heun_step(ctx: StepContext, x, t, s, key, carry):
  p = ctx.process
  a_t, _ = _noise_level(p, _one(t))
  a_s, sig_s = _noise_level(p, _one(s))
  y_hat, t_hat, sig_hat = _churn(ctx, x / bcast(a_t, x), t, key)
  a_hat = p.alpha(t_hat)
  _, d1 = ctx.x0_eps(bcast(a_hat, x) * y_hat, jnp.broadcast_to(t_hat, (x.shape[0],)))
  h = bcast(sig_s - sig_hat, x)
  y_s = y_hat + h * d1
  _, d2 = ctx.x0_eps(bcast(a_s, x) * y_s, s)
  y_s = y_hat + h * (0.5 * (d1 + d2))
  return bcast(a_s, x) * y_s, carry


def _heun_final(ctx: StepContext, x, key, denoise: bool):
  if not denoise:
    return x
  # Karras' last step to sigma = 0 is Euler: x_hat + (0 - sigma_hat) d = D(x_hat; sigma_hat).
  p, t = ctx.process, ctx.ts[-1]
  a_t, _ = _noise_level(p, _one(t))
  y_hat, t_hat, _ = _churn(ctx, x / bcast(a_t, x), t, key)
  return ctx.x0_eps(bcast(p.alpha(t_hat), x) * y_hat, jnp.broadcast_to(t_hat, (x.shape[0],)))[0]


def _check_heun(process: Process, opts: dict) -> None:
  del process
  for name in ("s_churn", "s_tmin", "s_noise"):
    _check_number("heun", name, opts[name], lo=0.0)
  _check_number("heun", "rho", opts["rho"], lo=0.0, strict=True)
  if not opts["s_tmax"] >= opts["s_tmin"]:
    raise InputError(f"heun option s_tmax={opts['s_tmax']!r} must be >= s_tmin={opts['s_tmin']!r}.")


register(Method(
    "heun", _heun_step,
    {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0, "rho": 7.0},
    nfe_per_step=2, check=_check_heun, grid=_rho_grid, final=_heun_final,
    final_nfe=lambda o, d: int(d),
    doc="Karras et al. (2022) Algorithm 2: Heun's 2nd-order method on the PF ODE in the noise "
        "level sigma/alpha (exactly EDM's sampler for alpha=1 processes) with stochastic churn "
        "(s_churn, s_tmin, s_tmax, s_noise; levels in sigma/alpha units), default grid rho-spaced "
        "in sigma/alpha; the final step to the data is Euler (= x0_hat). All processes."))


# --------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022), multistep, data prediction
# --------------------------------------------------------------------------------------


def _log_snr_grid(process: Process, num_steps: int, opts: dict) -> Array:
  if opts["grid"] == "time":
    return process.default_grid(num_steps)
  lam = jnp.linspace(process.log_snr(_one(process.T))[0], process.log_snr(_one(process.t_min))[0],
                     num_steps)
  ts = process.t_from_log_snr(lam)
  ts = ts.at[0].set(process.T)
  return ts.at[-1].set(process.t_min) if num_steps > 1 else ts


def _phi_integrals(h: Array) -> tuple[Array, Array, Array]:
  """I_k = int_0^h e^(u - h) u^k / k! du for k = 0, 1, 2 (stable for small h > 0).

  I_0 = 1 - e^-h, I_1 = h - I_0, I_2 = h^2/2 - I_1: direct where h is large, a Taylor
  series where the subtraction would cancel.
  """
  i0 = -jnp.expm1(-h)
  i1_direct = h - i0
  i2_direct = 0.5 * h * h - i1_direct
  # Series: I_1 = sum_{j>=2} (-1)^j h^j / j!, I_2 = sum_{j>=3} (-1)^(j+1) h^j / j!.
  i1_series, i2_series, term = jnp.zeros_like(h), jnp.zeros_like(h), h
  for j in range(2, 11):
    term = term * h / j  # h^j / j!
    i1_series = i1_series + (-1) ** j * term
    if j >= 3:
      i2_series = i2_series + (-1) ** (j + 1) * term
  small = h < 0.5
  return i0, jnp.where(small, i1_series, i1_direct), jnp.where(small, i2_series, i2_direct)


def _dpm_init_carry(x: Array, opts: dict):
  z = jnp.zeros((), jnp.float32)
  prev2 = jnp.zeros_like(x) if int(opts["order"]) >= 3 else ()
  return jnp.zeros_like(x), prev2, z, z, jnp.zeros((), jnp.int32)


def _dpm_step(ctx: StepContext, x, t, s, key, carry):
  """One multistep update t -> s from the data predictions at t and the previous points.

  With lambda = log(alpha / sigma) and h = lambda_s - lambda_t, the exact solution is
  x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^(u - h) x0(lambda_t + u) du; x0 is
  replaced by a polynomial in u through the last `order` data predictions (order 2 is
  the paper's 2M update with D = (1 + 1/2r) m0 - 1/2r m1). Lower orders are used at the
  first steps, where fewer predictions exist.
  """
  del key
  p, order = ctx.process, int(ctx.opts["order"])
  m1, m2, k1, k2, i = carry
  tt, ss = _one(t), _one(s)
  lam_t, lam_s = 0.5 * p.log_snr(tt)[0], 0.5 * p.log_snr(ss)[0]
  h = lam_s - lam_t
  a_s = p.alpha(ss)[0]
  ratio = (p.sigma(ss) / p.sigma(tt))[0]
  m0, _ = ctx.x0_eps(x, t)
  i0, i1, i2 = _phi_integrals(h)
  eff = jnp.minimum(i + 1, order)  # the order usable at this step

  # order 1 (DDIM): x0 constant.
  c0_1 = a_s * i0
  # order 2 (2M): r = k1 / h.
  k1s = jnp.where(k1 > 0, k1, 1.0)
  half_inv_r = 0.5 * h / k1s
  c0_2, c1_2 = a_s * i0 * (1.0 + half_inv_r), -a_s * i0 * half_inv_r
  coefs = [jnp.where(eff == 1, c0_1, c0_2), jnp.where(eff >= 2, c1_2, 0.0)]
  if order >= 3:
    # quadratic through (0, m0), (-k1, m1), (-k1-k2, m2): x0(u) = m0 + D1 u + D2 u^2 / 2.
    k2s = jnp.where(k2 > 0, k2, 1.0)
    # D1 = f01 + k1 f012 and D2 = 2 f012, f01 = (m0 - m1)/k1, f12 = (m1 - m2)/k2,
    # f012 = (f01 - f12)/(k1 + k2); the update adds alpha_s (I1 D1 + I2 D2).
    c_f01, c_f012 = a_s * i1, a_s * (i1 * k1s + 2.0 * i2)
    e = c_f012 / (k1s + k2s)
    c0_3 = a_s * i0 + (c_f01 + e) / k1s
    c1_3 = -(c_f01 + e) / k1s - e / k2s
    c2_3 = e / k2s
    coefs = [jnp.where(eff == 3, c0_3, coefs[0]), jnp.where(eff == 3, c1_3, coefs[1]),
             jnp.where(eff == 3, c2_3, 0.0)]
  x_new = ratio * x + coefs[0] * m0 + coefs[1] * m1
  if order >= 3:
    x_new = x_new + coefs[2] * m2
  new_carry = (m0, m1 if order >= 3 else (), h, k1, i + 1)
  return x_new, new_carry


def _check_dpm(process: Process, opts: dict) -> None:
  del process
  _check_choice("dpm_solver++", "order", opts["order"], (1, 2, 3))
  _check_choice("dpm_solver++", "grid", opts["grid"], ("logsnr", "time"))


register(Method(
    "dpm_solver++", _dpm_step, {"order": 2, "grid": "logsnr"},
    init_carry=_dpm_init_carry, check=_check_dpm, grid=_log_snr_grid,
    doc="DPM-Solver++ (Lu et al. 2022) multistep in data-prediction form: order 1 (= DDIM), "
        "2 (2M) or 3 (3M), lower orders at the first steps; default grid uniform in log-SNR "
        "(grid='logsnr'; 'time' = the process's default grid). All processes."))


# --------------------------------------------------------------------------------------
# Consistency models (Song et al. 2023), multistep
# --------------------------------------------------------------------------------------


def _consistency_grid(process: Process, num_steps: int, opts: dict) -> Array:
  """The first `num_steps` times of Karras' rho-grid of `num_steps + 1` (the last, t_min, is
  left out: noise added back there would be undone at once)."""
  return _rho_grid(process, num_steps + 1, opts)[:num_steps]


def _consistency_step(ctx: StepContext, x, t, s, key, carry):
  x0, _ = ctx.x0_eps(x, t)
  z = jax.random.normal(key, x.shape, x.dtype)
  ss = _one(s)
  return bcast(ctx.process.alpha(ss), x) * x0 + bcast(ctx.process.sigma(ss), x) * z, carry


def _check_consistency(process: Process, opts: dict) -> None:
  del process
  _check_number("consistency", "rho", opts["rho"], lo=0.0, strict=True)


register(Method(
    "consistency", _consistency_step, {"rho": 7.0}, check=_check_consistency, grid=_consistency_grid,
    doc="Consistency models' multistep sampler (Song et al. 2023, Algorithm 1): the denoised "
        "x0_hat(x, t), noised afresh to the next time; with the default denoise=True it ends "
        "with x0_hat, so num_steps is the NFE (1: one jump from noise). Default grid: Karras' "
        "rho-grid of num_steps + 1 times without t_min. For consistency models "
        "(parameterization.consistency_score_fn); all processes."))


# --------------------------------------------------------------------------------------
# Adaptive probability-flow ODE (diffrax)
# --------------------------------------------------------------------------------------

ODE_SOLVERS = ("tsit5", "dopri5")


def _ode_solve(ctx: StepContext, x, key):
  """Tsit5/Dopri5 with a PID controller from ts[0] to ts[-1], one on-device while loop.

  Both solvers are 7-stage FSAL: the first step evaluates all 7 stages and every later
  step (accepted or rejected) 6, so NFE = 6 * num_steps + 1 (checked against a runtime
  count in the tests). The first step is 1/64 of the interval (given, so no step-size
  heuristic spends evaluations); the controller adapts it from there.
  """
  import diffrax
  import equinox as eqx

  del key
  p, o = ctx.process, ctx.opts
  batch = x.shape[0]

  def vector_field(t, y, args):
    del args
    tt = jnp.full((batch,), t, jnp.float32)
    return p.probability_flow_drift(y, _one(t), ctx.score_fn(y, tt))

  solver = diffrax.Tsit5() if o["solver"] == "tsit5" else diffrax.Dopri5()
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver, t0=ctx.ts[0], t1=ctx.ts[-1],
      dt0=(ctx.ts[-1] - ctx.ts[0]) / 64.0, y0=x,
      stepsize_controller=diffrax.PIDController(rtol=o["rtol"], atol=o["atol"]),
      max_steps=int(o["max_steps"]), saveat=diffrax.SaveAt(t1=True), throw=False)
  failed = sol.result != diffrax.RESULTS.successful
  # The check rides on a scalar added to the samples: it cannot be dead-code eliminated while
  # the samples are used, and only a scalar (not the sharded batch) enters its conditional.
  zero = eqx.error_if(
      jnp.zeros((), x.dtype), failed,
      f"sample(method='ode') did not reach t_min within max_steps={int(o['max_steps'])} solver "
      f"steps at rtol={o['rtol']:g}, atol={o['atol']:g}; raise max_steps or loosen rtol/atol.")
  x = sol.ys[0] + zero
  num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
  return x, 6 * num_steps + 1, jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32)


def _check_ode(process: Process, opts: dict) -> None:
  del process
  _check_choice("ode", "solver", opts["solver"], ODE_SOLVERS)
  _check_number("ode", "rtol", opts["rtol"], lo=0.0, strict=True)
  _check_number("ode", "atol", opts["atol"], lo=0.0, strict=True)
  _check_number("ode", "max_steps", opts["max_steps"], lo=1, integer=True)


register(Method(
    "ode", None, {"rtol": 1e-5, "atol": 1e-5, "solver": "tsit5", "max_steps": 4096},
    check=_check_ode, solve=_ode_solve,
    doc="The probability-flow ODE solved adaptively on device (diffrax Tsit5 or Dopri5 with a "
        "PID controller, rtol/atol, max_steps) from T to t_min (num_steps is ignored; ts gives "
        "the endpoints); NFE = 6 x solver steps + 1, returned as an array. All processes."))


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


def default_grid(process: Process, method: str, num_steps: int, **options) -> Array:
  """The grid `sample(method=..., num_steps=...)` uses when no `ts` is given."""
  m = METHODS[method]
  opts = {**m.options, **options}
  return m.grid(process, num_steps, opts) if m.grid is not None else process.default_grid(num_steps)


def resample_path(num_points: int, resample: int, jump_length: int) -> np.ndarray:
  """RePaint's time-travel schedule (Lugmayr et al. 2022) over grid indices 0 (ts[0]) .. n-1.

  The path descends the grid one step at a time; each time it reaches an index that is a
  positive multiple of `jump_length`, it jumps back up `jump_length` indices (the forward
  process, noising) and descends again, `resample - 1` times per such index. `resample=1`:
  the plain descent 0, 1, ..., n-1.
  """
  n, r, j = int(num_points), int(resample), int(jump_length)
  left = {i: r - 1 for i in range(j, n, j)}
  path, i = [0], 0
  while i < n - 1:
    i += 1
    path.append(i)
    if left.get(i, 0) > 0:
      left[i] -= 1
      i -= j
      path.append(i)
  return np.asarray(path, np.int32)


def _check_resample(resample, jump_length) -> None:
  for name, value in (("resample", resample), ("jump_length", jump_length)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise InputError(f"{name}={value!r} must be an integer >= 1 (RePaint's resampling: resample=10, "
                       f"jump_length=10 in the paper; 1 = no resampling).")


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
    project: Callable[[Array, Array, Array], Array] | None = None,
    resample: int = 1,
    jump_length: int = 1,
    **options,
) -> tuple[Array, dict[str, Any]]:
  """Draws samples of `shape = (B, ...)` from the reverse of `process`.

  Args:
    key: PRNG key.
    process: the diffusion process the score belongs to.
    score_fn: `score_fn(x [B,...], t [B]) -> grad log p_t(x)`.
    shape: the output shape, batch first; any trailing shape (images, 2-D points).
    method: one of `METHODS` (see README for each).
    num_steps: number of evaluation times in the method's default grid (ignored by `ode`).
    ts: explicit decreasing evaluation times in [t_min, T]; overrides `num_steps` (for
      `ode`, its first and last entries are the interval to integrate over).
    denoise: finish with `x0_hat(x, ts[-1])` (one more network evaluation).
    x_init: start from this `x_T` instead of a prior draw (e.g. SDEdit).
    project: an optional `project(x, t, key) -> x` (t a scalar time, key a fresh PRNG key)
      applied to the state at the time it is at: to x_T at ts[0], after every step at the
      time it reached, after every inner Langevin step of `pc` and `ald`, and, with
      `denoise=False`, after a method's final stage at ts[-1] (the denoised output is
      data, not a state at a grid time: callers compose it themselves). `ode` integrates
      adaptively between consecutive grid times (`ts`, or `process.default_grid(num_steps)`
      if `num_steps` is given) and projects at each; NFE and steps add up over the
      segments. Inpainting and colorization (`jaxdiff.tasks`) replace the known part of x.
    resample, jump_length: RePaint's resampling (`resample_path`): at every `jump_length`-th
      grid point, `resample - 1` times, noise the state back up `jump_length` points with
      the forward process (`process.transition`; then `project`) and step down again. It
      lets the generated part harmonize with what `project` imposes; each repetition costs
      `jump_length` more steps. A multistep method's history restarts after each jump (its
      first step back down is first order); `ode` integrates adaptively between the grid
      times (`num_steps` or `ts`) and jumps along them. 1 (default): none.
    **options: the method's options (e.g. `eta` for ddim); unknown ones are an error.

  Returns:
    (samples [shape], info) with `info["nfe"]` the number of network evaluations (an int,
    or an int32 array for `ode`) and `info["num_steps"]` the number of steps taken.
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
  _check_resample(resample, jump_length)

  if ts is None:
    if m.solve is not None and resample > 1 and num_steps is None:
      raise InputError(f"sample(method={method!r}, resample={resample}) jumps back up a grid of times; pass "
                       f"num_steps=<int >= 2> (or ts) for it.")
    if m.solve is not None and ((project is None and resample == 1) or num_steps is None):
      ts = jnp.asarray([process.T, process.t_min], jnp.float32)
    elif m.solve is not None:
      if int(num_steps) < 2:
        raise InputError(f"sample(method={method!r}) with project= or resample= integrates between grid times; "
                         f"num_steps={num_steps} must be >= 2.")
      ts = process.default_grid(int(num_steps))
    else:
      if num_steps is None:
        raise InputError(f"sample(method={method!r}) needs num_steps=<int> or an explicit ts grid.")
      if int(num_steps) < 1:
        raise InputError(f"num_steps={num_steps} must be >= 1.")
      ts = default_grid(process, method, int(num_steps), **options)
    if m.check_grid is not None:
      m.check_grid(process, opts, process.t_min)
  else:
    _validate_grid(ts, process)
    if m.check_grid is not None:
      try:
        t_last = float(np.asarray(ts, np.float64).reshape(-1)[-1])
      except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        t_last = None
      if t_last is not None:
        m.check_grid(process, opts, t_last)
    if m.solve is not None and jnp.shape(ts)[0] < 2:
      raise InputError(f"method={method!r} integrates from ts[0] to ts[-1]; ts needs at least 2 "
                       f"times, got {jnp.shape(ts)[0]}.")
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
  ctx = StepContext(process, score_fn, opts, ts, project)
  x = ctx.projected(x, ts[0], k_init)

  adaptive = m.solve is not None
  if adaptive and (n < 2 or (project is None and resample == 1)):  # one solve from ts[0] to ts[-1]
    x, nfe, steps = m.solve(ctx, x, k_loop)
    if denoise:
      x = ctx.x0_eps(x, ts[-1])[0]
      nfe = nfe + 1
    return x, {"nfe": nfe, "num_steps": steps}

  def descend(carry, i, t, s):  # a step (adaptive: a solve) from t down to s, then the projection at s
    x, c = carry
    k = jax.random.fold_in(k_loop, i)
    if adaptive:
      x, nfe, steps = m.solve(dataclasses.replace(ctx, ts=jnp.stack([t, s])), x, k)
    else:
      (x, c), nfe, steps = m.step(ctx, x, t, s, k, c), m.step_nfe(opts), 1
    return (ctx.projected(x, s, k), c), (jnp.asarray(nfe, jnp.int32), jnp.asarray(steps, jnp.int32))

  def ascend(carry, i, t, s):  # RePaint: the forward process from t back up to s > t, then the projection
    x, _ = carry
    k = jax.random.fold_in(k_loop, i)
    coef, var = process.transition(_one(t), _one(s))
    x = ctx.projected(bcast(coef, x) * x + bcast(jnp.sqrt(var), x) * jax.random.normal(k, x.shape, x.dtype), s, k)
    return (x, m.init_carry(x, opts)), (jnp.int32(0), jnp.int32(0))  # a multistep history restarts

  carry, num_moves = (x, m.init_carry(x, opts)), n - 1
  if n > 1 and resample > 1:
    path = resample_path(n, resample, jump_length)
    down = path[1:] > path[:-1]
    num_moves = int(down.sum())

    def move(carry, inp):
      i, a, b, is_down = inp
      return jax.lax.cond(is_down, descend, ascend, carry, i, ts[a], ts[b])

    carry, (nfes, steps) = jax.lax.scan(move, carry, (jnp.arange(len(path) - 1), jnp.asarray(path[:-1]),
                                                      jnp.asarray(path[1:]), jnp.asarray(down)))
  elif n > 1:
    carry, (nfes, steps) = jax.lax.scan(lambda c, inp: descend(c, *inp), carry, (jnp.arange(n - 1), ts[:-1], ts[1:]))
  x = carry[0]
  if adaptive:  # the segments' evaluations and steps, counted as they ran
    nfe = jnp.sum(nfes) + int(denoise)
    if denoise:
      x = ctx.x0_eps(x, ts[-1])[0]
    return x, {"nfe": nfe, "num_steps": jnp.sum(steps)}
  if m.final is not None:
    k = jax.random.fold_in(k_loop, n - 1)
    x = m.final(ctx, x, k, denoise)
    x = x if denoise else ctx.projected(x, ts[-1], k)
  elif denoise:
    x, _ = ctx.x0_eps(x, ts[-1])
  return x, {"nfe": m.fixed_nfe(opts, num_moves + 1, denoise), "num_steps": num_moves + 1}


def describe_methods() -> str:
  """A one-line-per-method summary (used by the README and `--help`)."""
  lines = []
  for name in sorted(METHODS):
    m = METHODS[name]
    opts = ", ".join(f"{k}={v!r}" for k, v in m.options.items()) or "-"
    if m.solve is not None:
      per_step = "adaptive"
    elif callable(m.nfe_per_step):
      per_step = str(m.step_nfe(m.options)) + " (default options)"
    else:
      per_step = str(m.nfe_per_step)
    lines.append(f"{name}: {m.doc} [options: {opts}; NFE/step: {per_step}]")
  return "\n".join(lines)


__all__ = ["sample", "METHODS", "Method", "register", "x0_eps_from_score", "describe_methods",
           "default_grid"]
