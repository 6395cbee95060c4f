"""The spine's samplers (ancestral, DDIM, Euler) with exact scores of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import sample
from jaxdiff.errors import InputError

MU = np.array([1.0, -0.5])
SIGMA = np.array([[0.5, 0.3], [0.3, 0.4]])  # data covariance


def gaussian_score(process):
  """Exact score of x_t for data N(MU, SIGMA): -(a^2 SIGMA + s^2 I)^-1 (x - a MU)."""
  mu, cov = jnp.asarray(MU, jnp.float32), jnp.asarray(SIGMA, jnp.float32)

  def score_fn(x, t):
    a, s = process.alpha(t), process.sigma(t)
    cov_t = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * jnp.eye(2)
    return -jnp.linalg.solve(cov_t, (x - a[:, None] * mu)[..., None])[..., 0]

  return score_fn


def draw(process, method, n=20000, seed=0, **kw):
  fn = jax.jit(lambda k: sample(k, process, gaussian_score(process), (n, 2), method=method, **kw)[0])
  return np.asarray(fn(jax.random.key(seed)), np.float64)


@pytest.mark.parametrize("method,kw", [("ancestral", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}),
                                       ("ddim", {"eta": 0.5})])
def test_ddpm_samplers_reproduce_mean_and_covariance(method, kw):
  p = P.DDPM.linear(1000)
  x = draw(p, method, num_steps=200, **kw)
  n = len(x)
  se = np.sqrt(np.diag(SIGMA) / n)
  assert np.all(np.abs(x.mean(0) - MU) < 5 * se + 0.01), x.mean(0)
  np.testing.assert_allclose(np.cov(x.T), SIGMA, atol=0.03)


def test_ancestral_1000_steps_is_ho_et_al():
  """With ts = 1000..1 the general posterior step is Ho et al.'s update, to float precision."""
  p = P.DDPM.linear(1000)
  score = gaussian_score(p)
  key = jax.random.key(4)
  x_ours, info = sample(key, p, score, (8, 2), method="ancestral", num_steps=1000)
  assert int(info["nfe"]) == 1000
  # Ho et al. Algorithm 2, driven by the same noise draws as the sampler
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  k_init, k_loop = jax.random.split(key)
  x = np.asarray(p.prior_sample(k_init, (8, 2)), np.float64)
  for j, i in enumerate(range(999, -1, -1)):  # 0-based index i <-> t = i + 1
    t = jnp.full((8,), i + 1.0)
    eps = -np.sqrt(1 - abar[i]) * np.asarray(score(jnp.asarray(x, jnp.float32), t), np.float64)
    mean = (x - betas[i] / np.sqrt(1 - abar[i]) * eps) / np.sqrt(1 - betas[i])
    if i > 0:
      z = np.asarray(jax.random.normal(jax.random.fold_in(k_loop, j), (8, 2)), np.float64)
      x = mean + np.sqrt(betas[i] * (1 - abar[i - 1]) / (1 - abar[i])) * z
    else:
      x = mean
  np.testing.assert_allclose(x_ours, x, atol=2e-3)


def test_ddim_eta0_is_deterministic_and_eta1_equals_ancestral():
  p = P.DDPM.linear(1000)
  score = gaussian_score(p)
  a = sample(jax.random.key(0), p, score, (64, 2), method="ddim", num_steps=50, x_init=jnp.ones((64, 2)))[0]
  b = sample(jax.random.key(1), p, score, (64, 2), method="ddim", num_steps=50, x_init=jnp.ones((64, 2)))[0]
  np.testing.assert_array_equal(a, b)
  c = sample(jax.random.key(2), p, score, (64, 2), method="ddim", num_steps=50, eta=1.0)[0]
  d = sample(jax.random.key(2), p, score, (64, 2), method="ancestral", num_steps=50)[0]
  np.testing.assert_allclose(c, d, atol=1e-4)


def test_ddim_eta0_is_euler_of_the_ode_in_scaled_variables():
  """One DDIM step equals one Euler step of d(x/alpha)/d(sigma/alpha) = eps_hat."""
  p = P.VP()
  score = gaussian_score(p)
  x = jax.random.normal(jax.random.key(0), (16, 2))
  t, s = 0.8, 0.5
  got = sample(jax.random.key(0), p, score, (16, 2), method="ddim", ts=jnp.array([t, s]), denoise=False,
               x_init=x)[0]
  tt, ss = jnp.full((16,), t), jnp.full((16,), s)
  eps = -P.bcast(p.sigma(tt), x) * score(x, tt)
  y = x / P.bcast(p.alpha(tt), x)
  lam_t, lam_s = p.sigma(tt) / p.alpha(tt), p.sigma(ss) / p.alpha(ss)
  want = (y + P.bcast(lam_s - lam_t, x) * eps) * P.bcast(p.alpha(ss), x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_points_and_images_shapes_and_no_recompile():
  p = P.DDPM.linear(100)
  traces = []

  def score(x, t):
    traces.append(1)
    return -x

  f = jax.jit(lambda k: sample(k, p, score, (4, 3, 3, 2), method="ddim", num_steps=5)[0])
  assert f(jax.random.key(0)).shape == (4, 3, 3, 2)
  n = len(traces)
  f(jax.random.key(1))
  assert len(traces) == n  # second call with the same shapes does not retrace


def test_bad_input_errors():
  p = P.DDPM.linear(100)
  score = lambda x, t: -x
  with pytest.raises(InputError, match="valid methods"):
    sample(jax.random.key(0), p, score, (2, 2), method="dpm++", num_steps=3)
  with pytest.raises(InputError, match="eta"):
    sample(jax.random.key(0), p, score, (2, 2), method="ancestral", num_steps=3, eta=1.0)
  with pytest.raises(InputError, match="strictly decreasing"):
    sample(jax.random.key(0), p, score, (2, 2), method="ddim", ts=jnp.array([10.0, 20.0]))
  with pytest.raises(InputError, match=r"\[t_min, T\]"):
    sample(jax.random.key(0), p, score, (2, 2), method="ddim", ts=jnp.array([200.0, 20.0]))
  with pytest.raises(InputError, match="shape and dtype"):
    sample(jax.random.key(0), p, lambda x, t: x[:, :1], (2, 2), method="ddim", num_steps=3)
  with pytest.raises(InputError, match="num_steps"):
    sample(jax.random.key(0), p, score, (2, 2), method="ddim")
