"""Gaussian diffusion processes `x_t = alpha(t) x_0 + sigma(t) eps`.

Every process is a small immutable pytree behind one interface (`Process`), in the
spirit of score_sde's `sde_lib` and diffrax's solvers. A process only has to say what
`alpha(t)` and `sigma(t)` are on its time interval `[t_min, T]`; everything else is
derived here once, for all processes:

* the forward SDE `dx = f(t) x dt + g(t) dW` with `f = d log(alpha)/dt` and
  `g^2 = d sigma^2/dt - 2 f sigma^2` (`sde`, `f_g2`),
* the reverse-time SDE and the probability-flow ODE for a given score function
  (`reverse_drift`, `probability_flow_drift`),
* the exact Gaussian transition between two times and the posterior
  `q(x_s | x_t, x_0)` used by ancestral sampling (`transition`, `posterior`),
* the prior at `T` (`prior_sample`, `prior_logp`).

Subclasses override derived quantities with closed forms where that is more accurate
(VP's `f_g2`, for example). All methods take a batch of times `t: [B]` and broadcast
against `x: [B, ...]`; everything is jittable and differentiable.

Public processes: `DDPM` (discrete, Ho et al.), `VP`, `SubVP`, `VE`, `CosineVP`, `EDM`,
`RectifiedFlow` (flow matching).

Time conventions (`noise_cond(t)` maps a time to the network's conditioning input):

| process  | t range              | data at  | network input `noise_cond(t)` |
|----------|----------------------|----------|-------------------------------|
| DDPM     | [1, N] (step index)  | t = 0    | t - 1 (0-based step, 0..N-1)  |
| VP/SubVP/CosineVP | [t_min, 1]  | t = 0    | 999 t                         |
| VE       | [t_min, 1]           | t = 0 (sigma_min) | sigma(t)             |
| EDM      | [sigma_min, sigma_max], t = sigma | t = 0 | log(sigma) / 4       |
| RectifiedFlow | [t_min, t_max < 1] | t = 0        | 999 sigma(t)                  |
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.errors import ConfigError

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def bcast(v: Array, x: Array) -> Array:
  """Reshapes a per-example value `v: [B]` to broadcast against `x: [B, ...]`."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _as_time(t) -> Array:
  return jnp.asarray(t, dtype=jnp.float32)


class Process(struct.PyTreeNode, abc.ABC):
  """A Gaussian diffusion process on `[t_min, T]`.

  Subclasses must define `alpha`, `sigma`, `t_min`, `T` and `noise_cond`.
  """

  # ----- what a process must say -----
  @property
  @abc.abstractmethod
  def t_min(self) -> float:
    """The smallest time samplers integrate down to (the last network evaluation)."""

  @property
  @abc.abstractmethod
  def T(self) -> float:
    """The terminal time, where `x_T` is drawn from the prior."""

  @abc.abstractmethod
  def alpha(self, t: Array) -> Array:
    """Signal scale alpha(t), `[B] -> [B]`."""

  @abc.abstractmethod
  def sigma(self, t: Array) -> Array:
    """Noise scale sigma(t), `[B] -> [B]`."""

  @abc.abstractmethod
  def noise_cond(self, t: Array) -> Array:
    """The network's conditioning input for time t, `[B] -> [B]`."""

  # ----- derived quantities -----
  @property
  def prior_std(self) -> float:
    """Standard deviation of the prior N(0, prior_std^2 I) at T."""
    t = jnp.asarray([self.T], jnp.float32)
    return float(jnp.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)[0])

  def marginal(self, x0: Array, t: Array, eps: Array) -> Array:
    """Draws `x_t = alpha(t) x0 + sigma(t) eps`."""
    return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

  def log_snr(self, t: Array) -> Array:
    """lambda(t) = log(alpha^2 / sigma^2)."""
    return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

  def t_from_log_snr(self, lam: Array) -> Array:
    """Inverse of `log_snr` (bisection; subclasses give closed forms)."""
    lam = jnp.asarray(lam, jnp.float32)
    lo = jnp.full_like(lam, self.t_min)
    hi = jnp.full_like(lam, self.T)

    def body(_, lohi):
      lo, hi = lohi
      mid = 0.5 * (lo + hi)
      # log_snr decreases with t
      go_right = self.log_snr(mid) > lam
      return jnp.where(go_right, mid, lo), jnp.where(go_right, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
    return 0.5 * (lo + hi)

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    """Drift coefficient f(t) and squared diffusion g(t)^2 of the forward SDE.

    Derived by forward-mode autodiff from alpha and sigma:
    f = d log alpha / dt, g^2 = d sigma^2 / dt - 2 f sigma^2.
    """
    t = _as_time(t)
    ones = jnp.ones_like(t)
    log_a, dlog_a = jax.jvp(lambda s: jnp.log(self.alpha(s)), (t,), (ones,))
    var, dvar = jax.jvp(lambda s: self.sigma(s) ** 2, (t,), (ones,))
    del log_a
    return dlog_a, dvar - 2.0 * dlog_a * var

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Forward SDE `dx = drift dt + diffusion dW`: returns (drift [B,...], diffusion [B])."""
    f, g2 = self.f_g2(t)
    return bcast(f, x) * x, jnp.sqrt(jnp.maximum(g2, 0.0))

  def reverse_drift(self, x: Array, t: Array, score: Array) -> Array:
    """Drift of the reverse-time SDE, f x - g^2 score (time runs backwards)."""
    f, g2 = self.f_g2(t)
    return bcast(f, x) * x - bcast(g2, x) * score

  def probability_flow_drift(self, x: Array, t: Array, score: Array) -> Array:
    """Velocity dx/dt of the probability-flow ODE, f x - g^2 score / 2."""
    f, g2 = self.f_g2(t)
    return bcast(f, x) * x - 0.5 * bcast(g2, x) * score

  def transition(self, s: Array, t: Array) -> tuple[Array, Array]:
    """Coefficients of `q(x_t | x_s) = N(a x_s, v I)` for s < t: returns (a, v)."""
    a = self.alpha(t) / self.alpha(s)
    v = self.sigma(t) ** 2 - a**2 * self.sigma(s) ** 2
    return a, jnp.maximum(v, 0.0)

  def posterior(self, x_t: Array, x0: Array, s: Array, t: Array) -> tuple[Array, Array]:
    """Mean and variance `[B]` of `q(x_s | x_t, x_0)` for s < t (VDM eq. 32).

    With `s = t - 1` on the DDPM grid this is Ho et al.'s posterior; with alpha(s)=1,
    sigma(s)=0 (data) the mean is x0 and the variance 0.
    """
    a_ts, v_ts = self.transition(s, t)
    var_s, var_t = self.sigma(s) ** 2, self.sigma(t) ** 2
    coef_xt = a_ts * var_s / var_t
    coef_x0 = self.alpha(s) * v_ts / var_t
    mean = bcast(coef_xt, x_t) * x_t + bcast(coef_x0, x0) * x0
    return mean, v_ts * var_s / var_t

  def sample_t(self, key: Array, batch: int) -> Array:
    """Training times: uniform on [t_min, T]."""
    return jax.random.uniform(key, (batch,), minval=self.t_min, maxval=self.T)

  def prior_sample(self, key: Array, shape) -> Array:
    """x_T ~ N(0, prior_std^2 I)."""
    return self.prior_std * jax.random.normal(key, shape)

  def prior_logp(self, z: Array) -> Array:
    """log N(z; 0, prior_std^2 I), summed over all but the batch axis: `[B]`."""
    d = math.prod(z.shape[1:])
    s2 = self.prior_std**2
    sq = jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=-1)
    return -0.5 * d * jnp.log(2 * jnp.pi * s2) - 0.5 * sq / s2

  def default_grid(self, num_steps: int) -> Array:
    """`num_steps` decreasing evaluation times from T to t_min (uniform in t): `default_grid_at`
    of the fractions 0, 1/(n-1), ..., 1 (up to rounding)."""
    return jnp.linspace(self.T, self.t_min, num_steps)

  def default_grid_at(self, u: Array) -> Array:
    """The default grid's time at fraction `u` in [0, 1] of the way from T to t_min. A process
    whose grid is a fixed function of u has nested grids: n + 1 points are every other one of
    2n + 1, which progressive distillation's halving needs (`distill.check_process`)."""
    return self.T + jnp.asarray(u, jnp.float32) * (self.t_min - self.T)


# --------------------------------------------------------------------------------------
# Discrete DDPM (Ho et al. 2020; Nichol & Dhariwal 2021)
# --------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Ho et al.'s linear schedule, computed in float64."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule (betas clipped at `max_beta`), float64."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  betas = 1.0 - f[1:] / f[:-1]
  return np.clip(betas, 0.0, max_beta)


class DDPM(Process):
  """Discrete-time DDPM with `N` steps, expressed as a process on `t in [0, N]`.

  At integer `t = i` (1..N), `alpha(t)^2 = alphas_cumprod[i-1]` (Ho et al.'s
  \\bar{alpha}_i); `t = 0` is the data. Between integers, log(alphas_cumprod) is
  interpolated linearly, so continuous-time samplers also run on a DDPM model.
  The network sees the 0-based step `t - 1` (0..N-1), as in Ho et al. and diffusers.

  Build with `DDPM.linear(...)`, `DDPM.cosine(...)` or `DDPM(alphas_cumprod=...)`.
  """

  alphas_cumprod: Array  # [N] float32, \bar{alpha}_1 .. \bar{alpha}_N

  @classmethod
  def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DDPM":
    return cls.from_betas(linear_betas(num_timesteps, beta_start, beta_end))

  @classmethod
  def cosine(cls, num_timesteps: int = 1000, s: float = 0.008) -> "DDPM":
    return cls.from_betas(cosine_betas(num_timesteps, s))

  @classmethod
  def from_betas(cls, betas) -> "DDPM":
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
      raise ConfigError(f"DDPM betas must be a 1-D array in (0, 1); got shape {betas.shape}, "
                        f"range [{betas.min():.3g}, {betas.max():.3g}].")
    return cls(alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))

  @property
  def num_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]

  @property
  def betas(self) -> Array:
    """[N] betas, recovered from alphas_cumprod."""
    prev = jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])
    return 1.0 - self.alphas_cumprod / prev

  @property
  def t_min(self) -> float:
    return 1.0

  @property
  def T(self) -> float:
    return float(self.num_timesteps)

  @property
  def prior_std(self) -> float:
    return 1.0

  def _table(self) -> Array:
    """log(alphas_cumprod) with the data (t = 0, log 1 = 0) prepended: `[N + 1]`."""
    return jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.log(self.alphas_cumprod)])

  def _segment(self, t: Array) -> tuple[Array, Array]:
    """Index i of the segment [i, i+1] holding t, and the offset t - i.

    An integer t = i belongs to the segment on its left, [i-1, i], so derivatives at grid
    points are those of the step a sampler takes from i down to i-1.
    """
    t = _as_time(t)
    i = jnp.clip(jnp.ceil(t) - 1, 0, self.num_timesteps - 1).astype(jnp.int32)
    return i, t - i

  def _log_abar(self, t: Array) -> Array:
    table = self._table()
    i, w = self._segment(t)
    return (1.0 - w) * table[i] + w * table[i + 1]

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    # log abar is linear on each segment with slope L' = log(1 - beta_{i+1}):
    # f = L'/2 and g^2 = d(1 - abar)/dt - 2 f (1 - abar) = -L'.
    table = self._table()
    i, _ = self._segment(t)
    slope = table[i + 1] - table[i]
    return 0.5 * slope, -slope

  def alpha(self, t: Array) -> Array:
    return jnp.exp(0.5 * self._log_abar(t))

  def sigma(self, t: Array) -> Array:
    return jnp.sqrt(-jnp.expm1(self._log_abar(t)))

  def log_snr(self, t: Array) -> Array:
    la = self._log_abar(t)
    return la - jnp.log(-jnp.expm1(la))

  def noise_cond(self, t: Array) -> Array:
    return _as_time(t) - 1.0

  def sample_t(self, key: Array, batch: int) -> Array:
    """Training times: uniform over the integer steps 1..N."""
    return jax.random.randint(key, (batch,), 1, self.num_timesteps + 1).astype(jnp.float32)

  def default_grid(self, num_steps: int) -> Array:
    """`num_steps` integer steps from N down to 1, evenly spaced (N, N-1, ..., 1 for num_steps=N)."""
    return jnp.round(jnp.linspace(self.T, 1.0, num_steps))

  def default_grid_at(self, u: Array) -> Array:
    """The integer step nearest the fraction `u` of the way from N down to 1."""
    return jnp.round(self.T + jnp.asarray(u, jnp.float32) * (1.0 - self.T))


# --------------------------------------------------------------------------------------
# Continuous-time processes (Song et al. 2021; Nichol & Dhariwal 2021; Karras et al. 2022)
# --------------------------------------------------------------------------------------


class VP(Process):
  """Variance-preserving SDE: beta(t) = beta_min + t (beta_max - beta_min), t in [t_min, 1]."""

  beta_min: float = struct.field(pytree_node=False, default=0.1)
  beta_max: float = struct.field(pytree_node=False, default=20.0)
  eps: float = struct.field(pytree_node=False, default=1e-3)  # t_min

  @property
  def t_min(self) -> float:
    return self.eps

  @property
  def T(self) -> float:
    return 1.0

  @property
  def prior_std(self) -> float:
    return 1.0

  def _log_mean_coeff(self, t: Array) -> Array:
    t = _as_time(t)
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def beta(self, t: Array) -> Array:
    return self.beta_min + _as_time(t) * (self.beta_max - self.beta_min)

  def alpha(self, t: Array) -> Array:
    return jnp.exp(self._log_mean_coeff(t))

  def sigma(self, t: Array) -> Array:
    return jnp.sqrt(-jnp.expm1(2.0 * self._log_mean_coeff(t)))

  def log_snr(self, t: Array) -> Array:
    lmc2 = 2.0 * self._log_mean_coeff(t)
    return lmc2 - jnp.log(-jnp.expm1(lmc2))

  def t_from_log_snr(self, lam: Array) -> Array:
    # 2 lmc = -log(1 + e^-lam) =: c;  0.5 (bmax - bmin) t^2 + bmin t + c = 0
    c = -jnp.logaddexp(0.0, -jnp.asarray(lam, jnp.float32))
    a = 0.5 * (self.beta_max - self.beta_min)
    return (-self.beta_min + jnp.sqrt(self.beta_min**2 - 4 * a * c)) / (2 * a)

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    b = self.beta(t)
    return -0.5 * b, b

  def noise_cond(self, t: Array) -> Array:
    return 999.0 * _as_time(t)


class SubVP(VP):
  """The sub-VP SDE of Song et al.: VP's mean, with sigma(t) = 1 - exp(-int beta)."""

  @property
  def prior_std(self) -> float:
    return 1.0

  def sigma(self, t: Array) -> Array:
    return -jnp.expm1(2.0 * self._log_mean_coeff(t))

  def log_snr(self, t: Array) -> Array:
    lmc = self._log_mean_coeff(t)
    return 2.0 * (lmc - jnp.log(-jnp.expm1(2.0 * lmc)))

  def t_from_log_snr(self, lam: Array) -> Array:
    return Process.t_from_log_snr(self, lam)

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    b = self.beta(t)
    return -0.5 * b, b * -jnp.expm1(4.0 * self._log_mean_coeff(t))


class CosineVP(Process):
  """Continuous cosine schedule (Nichol & Dhariwal): alpha(t) = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)).

  T defaults to 0.9946, where log-SNR is about -14.5, as in DPM-Solver, so it stays finite.
  """

  s: float = struct.field(pytree_node=False, default=0.008)
  eps: float = struct.field(pytree_node=False, default=1e-3)
  t_max: float = struct.field(pytree_node=False, default=0.9946)

  @property
  def t_min(self) -> float:
    return self.eps

  @property
  def T(self) -> float:
    return self.t_max

  @property
  def prior_std(self) -> float:
    return 1.0

  def _log_alpha(self, t: Array) -> Array:
    t = _as_time(t)
    f = jnp.cos((t + self.s) / (1.0 + self.s) * jnp.pi / 2)
    return jnp.log(f) - math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2))

  def alpha(self, t: Array) -> Array:
    return jnp.exp(self._log_alpha(t))

  def sigma(self, t: Array) -> Array:
    return jnp.sqrt(-jnp.expm1(2.0 * self._log_alpha(t)))

  def log_snr(self, t: Array) -> Array:
    la2 = 2.0 * self._log_alpha(t)
    return la2 - jnp.log(-jnp.expm1(la2))

  def t_from_log_snr(self, lam: Array) -> Array:
    log_alpha = -0.5 * jnp.logaddexp(0.0, -jnp.asarray(lam, jnp.float32))
    c0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2))
    return 2.0 * (1.0 + self.s) / jnp.pi * jnp.arccos(jnp.exp(log_alpha + c0)) - self.s

  def noise_cond(self, t: Array) -> Array:
    return 999.0 * _as_time(t)


class VE(Process):
  """Variance-exploding SDE (SMLD/NCSN): alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t."""

  sigma_min: float = struct.field(pytree_node=False, default=0.01)
  sigma_max: float = struct.field(pytree_node=False, default=50.0)
  eps: float = struct.field(pytree_node=False, default=1e-5)

  @property
  def t_min(self) -> float:
    return self.eps

  @property
  def T(self) -> float:
    return 1.0

  @property
  def prior_std(self) -> float:
    return float(self.sigma_max)

  def alpha(self, t: Array) -> Array:
    return jnp.ones_like(_as_time(t))

  def sigma(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_time(t)

  def log_snr(self, t: Array) -> Array:
    return -2.0 * jnp.log(self.sigma(t))

  def t_from_log_snr(self, lam: Array) -> Array:
    log_sigma = -0.5 * jnp.asarray(lam, jnp.float32)
    return (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    s = self.sigma(t)
    return jnp.zeros_like(s), s**2 * 2.0 * math.log(self.sigma_max / self.sigma_min)

  def noise_cond(self, t: Array) -> Array:
    return self.sigma(t)

  def discrete_sigmas(self, num_scales: int) -> Array:
    """NCSN's geometric noise levels sigma_max .. sigma_min (`num_scales` of them)."""
    return jnp.exp(jnp.linspace(math.log(self.sigma_max), math.log(self.sigma_min), num_scales))


class EDM(Process):
  """Karras et al. (2022): alpha = 1, sigma(t) = t on [sigma_min, sigma_max].

  `precond(sigma)` gives the network preconditioning (c_skip, c_out, c_in, c_noise) with
  `D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`.
  """

  sigma_min: float = struct.field(pytree_node=False, default=0.002)
  sigma_max: float = struct.field(pytree_node=False, default=80.0)
  sigma_data: float = struct.field(pytree_node=False, default=0.5)
  rho: float = struct.field(pytree_node=False, default=7.0)

  @property
  def t_min(self) -> float:
    return self.sigma_min

  @property
  def T(self) -> float:
    return self.sigma_max

  @property
  def prior_std(self) -> float:
    return float(self.sigma_max)

  def alpha(self, t: Array) -> Array:
    return jnp.ones_like(_as_time(t))

  def sigma(self, t: Array) -> Array:
    return _as_time(t)

  def log_snr(self, t: Array) -> Array:
    return -2.0 * jnp.log(_as_time(t))

  def t_from_log_snr(self, lam: Array) -> Array:
    return jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32))

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    t = _as_time(t)
    return jnp.zeros_like(t), 2.0 * t

  def noise_cond(self, t: Array) -> Array:
    return 0.25 * jnp.log(_as_time(t))

  def precond(self, sigma: Array) -> tuple[Array, Array, Array, Array]:
    """(c_skip, c_out, c_in, c_noise), each `[B]`."""
    sigma = _as_time(sigma)
    sd2 = self.sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in, self.noise_cond(sigma)

  def default_grid(self, num_steps: int) -> Array:
    """Karras' rho-spaced grid of `num_steps` sigmas from sigma_max to sigma_min."""
    return self.default_grid_at(jnp.arange(num_steps) / max(num_steps - 1, 1))

  def default_grid_at(self, u: Array) -> Array:
    """Karras' grid at fraction `u`: uniform in sigma^(1/rho) from sigma_max to sigma_min."""
    inv = 1.0 / self.rho
    return (self.sigma_max**inv + jnp.asarray(u, jnp.float32) * (self.sigma_min**inv - self.sigma_max**inv)) ** self.rho


class RectifiedFlow(Process):
  """Rectified flow / flow matching: the straight path `x_t = (1 - s) x0 + s eps`, s = sigma(t).

  Liu et al. (2023), Lipman et al. (2023), Esser et al. (2024, SD3). With `shift=1`,
  sigma(t) = t and the probability-flow ODE is `dx/dt = eps - x0`, the velocity a network
  with `prediction='flow'` outputs; on this process `ddim` (eta=0) is exactly the Euler
  sampler of flow matching and `ode` its adaptive solve. `shift` is SD3's timestep shift
  (Esser et al., eq. 23), `sigma(t) = shift t / (1 + (shift - 1) t)`: above 1 it spends more
  of a uniform time grid (and of uniform training times) at high noise, as larger images need.

  alpha = 1 - sigma reaches 0 at t = 1, where the SDE's drift f = d log(alpha)/dt is
  infinite, so T = `t_max` (default 0.999, log-SNR -13.8, about CosineVP's -14.5) and the
  prior is N(0, alpha(T)^2 + sigma(T)^2) ~ N(0, 0.999^2); `eps` is t_min. The network input
  is 999 sigma(t) (SD3 conditions on the shifted time, so a model can be sampled with
  another shift than it was trained with).
  """

  eps: float = struct.field(pytree_node=False, default=1e-3)    # t_min
  t_max: float = struct.field(pytree_node=False, default=0.999)
  shift: float = struct.field(pytree_node=False, default=1.0)

  def __post_init__(self):
    if not 0.0 < self.eps < self.t_max < 1.0:
      raise ConfigError(f"RectifiedFlow needs 0 < eps < t_max < 1 (alpha = 1 - sigma vanishes at t = 1); "
                        f"got eps={self.eps}, t_max={self.t_max}. The defaults are 1e-3 and 0.999.")
    if not self.shift > 0.0:
      raise ConfigError(f"RectifiedFlow shift={self.shift} must be > 0 (1 = no shift; SD3 uses 3 at 1024 px).")

  @property
  def t_min(self) -> float:
    return self.eps

  @property
  def T(self) -> float:
    return self.t_max

  @property
  def prior_std(self) -> float:
    s = self.shift * self.t_max / (1.0 + (self.shift - 1.0) * self.t_max)  # (Python floats: no trace)
    return math.sqrt((1.0 - s) ** 2 + s**2)

  # With k = shift and d = 1 + (k - 1) t: sigma = k t / d and alpha = (1 - t) / d, written so
  # that alpha keeps full float32 precision near t = 1 (1 - t is exact there; 1 - sigma is not).
  def alpha(self, t: Array) -> Array:
    t = _as_time(t)
    return (1.0 - t) / (1.0 + (self.shift - 1.0) * t)

  def sigma(self, t: Array) -> Array:
    t = _as_time(t)
    return self.shift * t / (1.0 + (self.shift - 1.0) * t)

  def log_snr(self, t: Array) -> Array:
    t = _as_time(t)
    return 2.0 * (jnp.log1p(-t) - jnp.log(self.shift * t))

  def t_from_log_snr(self, lam: Array) -> Array:
    # (1 - t) / (k t) = exp(lam / 2)
    return 1.0 / (1.0 + self.shift * jnp.exp(0.5 * jnp.asarray(lam, jnp.float32)))

  def f_g2(self, t: Array) -> tuple[Array, Array]:
    # f = d log alpha / dt = -k / ((1 - t) d), g^2 = 2 sigma sigma' / alpha = 2 k^2 t / ((1 - t) d^2)
    t = _as_time(t)
    k, d = self.shift, 1.0 + (self.shift - 1.0) * t
    return -k / ((1.0 - t) * d), 2.0 * k**2 * t / ((1.0 - t) * d**2)

  def noise_cond(self, t: Array) -> Array:
    return 999.0 * self.sigma(t)


# --------------------------------------------------------------------------------------
# Construction from a config
# --------------------------------------------------------------------------------------

PROCESSES = ("ddpm", "vp", "subvp", "cosine_vp", "ve", "edm", "rectified_flow")


def get_process(name: str, **kwargs) -> Process:
  """Builds a process from a config dict, e.g. `get_process(**config.process)`.

  `ddpm` takes `schedule` ('linear' | 'cosine'), `num_timesteps`, `beta_start`, `beta_end`,
  `cosine_s`; the others take their dataclass fields (e.g. `vp`: beta_min, beta_max, eps).
  """
  try:
    if name == "ddpm":
      schedule = kwargs.pop("schedule", "linear")
      n = kwargs.pop("num_timesteps", 1000)
      if schedule == "linear":
        p = DDPM.linear(n, kwargs.pop("beta_start", 1e-4), kwargs.pop("beta_end", 0.02))
      elif schedule == "cosine":
        p = DDPM.cosine(n, kwargs.pop("cosine_s", 0.008))
      else:
        raise ConfigError(f"config.process.schedule={schedule!r} is not known; use 'linear' or 'cosine'.")
      for k in ("beta_start", "beta_end", "cosine_s"):  # unused by the other schedule
        kwargs.pop(k, None)
      if kwargs:
        raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
      return p
    cls = {"vp": VP, "subvp": SubVP, "cosine_vp": CosineVP, "ve": VE, "edm": EDM,
           "rectified_flow": RectifiedFlow}.get(name)
    if cls is None:
      raise ConfigError(f"config.process.name={name!r} is not known; valid names: {', '.join(PROCESSES)}.")
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f"config.process for {name!r}: {e}. Remove or rename the offending key.") from None
