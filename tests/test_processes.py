"""Forward processes against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff.errors import ConfigError

ALL = [P.DDPM.linear(), P.DDPM.cosine(), P.VP(), P.SubVP(), P.CosineVP(), P.VE(), P.EDM(),
       P.RectifiedFlow(), P.RectifiedFlow(shift=3.0)]


def test_ddpm_linear_schedule_matches_ho_et_al():
  p = P.DDPM.linear(1000, 1e-4, 0.02)
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  np.testing.assert_allclose(p.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
  np.testing.assert_allclose(p.betas, betas, rtol=2e-3, atol=1e-7)
  t = jnp.arange(1, 1001, dtype=jnp.float32)
  np.testing.assert_allclose(p.alpha(t) ** 2, np.cumprod(1 - betas), rtol=1e-5)
  np.testing.assert_allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, 1.0, atol=1e-6)
  assert float(p.alpha(jnp.zeros(1))[0]) == 1.0 and float(p.sigma(jnp.zeros(1))[0]) == 0.0
  np.testing.assert_allclose(p.noise_cond(t), np.arange(1000))


def test_ddpm_cosine_schedule_matches_nichol_dhariwal():
  p = P.DDPM.cosine(1000, s=0.008)
  steps = np.arange(1001) / 1000
  f = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
  abar = f[1:] / f[0]
  # betas are clipped at 0.999 near T, which only changes the last few alphas_cumprod
  np.testing.assert_allclose(p.alphas_cumprod[:990], abar[:990], rtol=1e-5)


def test_vp_closed_form():
  p = P.VP(0.1, 20.0)
  t = np.linspace(1e-3, 1, 7)  # float64 reference
  lmc = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
  np.testing.assert_allclose(p.alpha(t), np.exp(lmc), rtol=1e-6)
  np.testing.assert_allclose(p.sigma(t) ** 2, 1 - np.exp(2 * lmc), rtol=1e-5)
  np.testing.assert_allclose(P.SubVP().sigma(t), 1 - np.exp(2 * lmc), rtol=1e-5)
  np.testing.assert_allclose(P.VE(0.01, 50).sigma(t), 0.01 * 5000.0**t, rtol=1e-5)


@pytest.mark.parametrize("p", ALL, ids=lambda p: type(p).__name__)
def test_sde_coefficients_match_marginals(p):
  """f, g^2 (closed forms where given) agree with d log alpha/dt and d sigma^2/dt - 2 f sigma^2."""
  t = jnp.linspace(p.t_min, p.T, 9)[1:-1] + 0.37 * (p.T - p.t_min) / 9  # off-grid times
  f, g2 = p.f_g2(t)
  f_gen, g2_gen = P.Process.f_g2(p, t)
  np.testing.assert_allclose(f, f_gen, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(g2, g2_gen, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("p", ALL, ids=lambda p: type(p).__name__)
def test_marginal_statistics(p):
  """x_t = alpha x0 + sigma eps has mean alpha x0 and std sigma (Monte Carlo)."""
  n = 20000
  t = jnp.full((n,), 0.5 * (p.t_min + p.T))
  x0 = jnp.full((n, 1), 0.7)
  xt = p.marginal(x0, t, jax.random.normal(jax.random.key(0), (n, 1)))
  a, s = float(p.alpha(t[:1])[0]), float(p.sigma(t[:1])[0])
  assert abs(float(xt.mean()) - 0.7 * a) < 4 * s / np.sqrt(n)
  assert abs(float(xt.std()) / s - 1) < 0.03


@pytest.mark.parametrize("p", ALL, ids=lambda p: type(p).__name__)
def test_log_snr_inverse(p):
  t = jnp.linspace(p.t_min, p.T, 11)
  np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(t)), t, rtol=1e-3, atol=1e-4 * p.T)


def test_rectified_flow_closed_form():
  """The straight path (1 - s) x0 + s eps, SD3's shift, and a prior that is N(0, I) to 1e-3."""
  t = np.linspace(1e-3, 0.999, 7).astype(np.float32).astype(np.float64)  # the times jax sees
  p = P.RectifiedFlow()
  np.testing.assert_allclose(p.sigma(t), t, rtol=1e-6)
  np.testing.assert_allclose(p.alpha(t), 1 - t, rtol=1e-6)  # full precision at t -> 1 too
  np.testing.assert_allclose(p.noise_cond(t), 999 * t, rtol=1e-6)
  p3 = P.RectifiedFlow(shift=3.0)
  s3 = 3 * t / (1 + 2 * t)  # Esser et al. (2024), eq. 23 with shift 3
  np.testing.assert_allclose(p3.sigma(t), s3, rtol=1e-6)
  np.testing.assert_allclose(p3.alpha(t) + p3.sigma(t), 1.0, rtol=1e-6)
  np.testing.assert_allclose(p3.noise_cond(t), 999 * s3, rtol=1e-5)
  # the probability-flow velocity of a straight path is d sigma/dt (eps - x0), whatever x0, eps
  x0, eps = np.array([[0.7, -1.2]]), np.array([[-0.3, 0.9]])
  for proc, ds in ((p, 1.0), (p3, 3 / (1 + 2 * 0.4) ** 2)):
    tt = jnp.asarray([0.4])
    x = proc.marginal(jnp.asarray(x0), tt, jnp.asarray(eps))
    score = -jnp.asarray(eps) / proc.sigma(tt)[:, None]  # exact for this (x0, eps) pair
    np.testing.assert_allclose(proc.probability_flow_drift(x, tt, score), ds * (eps - x0), rtol=1e-5)
  for proc in (p, p3):
    assert proc.t_min == 1e-3 and proc.T == 0.999 and abs(proc.prior_std - 1.0) < 1e-3
    np.testing.assert_allclose(proc.prior_std, np.hypot(proc.alpha(jnp.asarray([0.999]))[0],
                                                        proc.sigma(jnp.asarray([0.999]))[0]), rtol=1e-6)
  assert isinstance(P.get_process("rectified_flow", shift=2.0), P.RectifiedFlow)
  with pytest.raises(ConfigError, match="t_max=1.0"):
    P.RectifiedFlow(t_max=1.0)
  with pytest.raises(ConfigError, match="shift=0.0"):
    P.get_process("rectified_flow", shift=0.0)


def test_ddpm_posterior_is_ho_et_al():
  p = P.DDPM.linear()
  b, abar = np.linspace(1e-4, 0.02, 1000), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  i = np.array([1, 10, 500, 999])  # 0-based index of x_t, paper t = i + 1
  t, s = jnp.asarray(i + 1.0), jnp.asarray(i + 0.0)
  xt, x0 = jnp.ones((4, 1)), 2 * jnp.ones((4, 1))
  mean, var = p.posterior(xt, x0, s, t)
  beta_tilde = (1 - abar[i - 1]) / (1 - abar[i]) * b[i]
  c0 = np.sqrt(abar[i - 1]) * b[i] / (1 - abar[i])
  ct = np.sqrt(1 - b[i]) * (1 - abar[i - 1]) / (1 - abar[i])
  np.testing.assert_allclose(var, beta_tilde, rtol=2e-3)
  np.testing.assert_allclose(mean[:, 0], 2 * c0 + ct, rtol=1e-4)
  # to the data (t = 0) the posterior is x0 itself
  mean, var = p.posterior(xt, x0, jnp.zeros(4), t)
  np.testing.assert_allclose(mean, x0, rtol=1e-5)
  np.testing.assert_allclose(var, 0, atol=1e-7)


def test_prior_logp_is_standard_normal_density():
  z = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  for p in (P.VP(), P.VE(sigma_max=50.0)):
    s = p.prior_std
    want = (-0.5 * 32 * np.log(2 * np.pi * s**2) - 0.5 * np.sum(np.asarray(z).reshape(3, -1) ** 2, 1) / s**2)
    np.testing.assert_allclose(p.prior_logp(z), want, rtol=1e-5)


def test_processes_are_pytrees_and_jit():
  p = P.DDPM.linear(50)
  leaves = jax.tree.leaves(p)
  assert len(leaves) == 1 and leaves[0].shape == (50,)
  f = jax.jit(lambda p, t: p.alpha(t))
  np.testing.assert_allclose(f(p, jnp.array([3.0])), p.alpha(jnp.array([3.0])))


def test_get_process_errors():
  with pytest.raises(ConfigError, match="valid names"):
    P.get_process("vpp")
  with pytest.raises(ConfigError, match="schedule"):
    P.get_process("ddpm", schedule="quadratic")
  with pytest.raises(ConfigError, match="beta_mn"):
    P.get_process("vp", beta_mn=0.1)
  assert isinstance(P.get_process("ve", sigma_max=10.0), P.VE)
