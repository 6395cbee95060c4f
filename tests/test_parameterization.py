"""Round trips between eps / x0 / v / score for variance-preserving and exploding scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterization as par
from jaxdiff import processes as P
from jaxdiff.errors import ConfigError

KINDS = ["eps", "x0", "v", "score", "flow"]


@pytest.mark.parametrize("alpha,sigma", [(0.8, 0.6), (1.0, 7.5), (0.3, 0.2)])
@pytest.mark.parametrize("source", KINDS)
@pytest.mark.parametrize("target", KINDS)
def test_round_trip(alpha, sigma, source, target):
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (4, 3))
  eps = jax.random.normal(k2, (4, 3))
  x = alpha * x0 + sigma * eps
  out = par.from_x0_eps(x0, eps, alpha, sigma, source)
  got = par.convert(out, x, alpha, sigma, source, target)
  want = par.from_x0_eps(x0, eps, alpha, sigma, target)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  back = par.convert(got, x, alpha, sigma, target, source)
  np.testing.assert_allclose(back, out, rtol=1e-4, atol=1e-4)


def test_v_definition_and_score():
  x0, eps = jnp.array([[1.0]]), jnp.array([[2.0]])
  assert float(par.from_x0_eps(x0, eps, 0.6, 0.8, "v")[0, 0]) == pytest.approx(0.6 * 2 - 0.8 * 1)
  assert float(par.from_x0_eps(x0, eps, 0.6, 0.8, "score")[0, 0]) == pytest.approx(-2 / 0.8)


def test_flow_is_the_straight_path_velocity_and_finite_at_pure_noise():
  """flow = eps - x0 = dx/dt of x = (1 - t) x0 + t eps; at alpha = 0 it still gives x0 and eps."""
  k1, k2 = jax.random.split(jax.random.key(1))
  x0, eps = jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (4, 3))
  path = lambda t: (1 - t) * x0 + t * eps
  _, velocity = jax.jvp(path, (0.3,), (1.0,))
  np.testing.assert_allclose(par.from_x0_eps(x0, eps, 0.7, 0.3, "flow"), velocity, rtol=1e-6)
  got_x0, got_eps = par.to_x0_eps(eps - x0, eps, 0.0, 1.0, "flow")  # x = eps at alpha = 0
  np.testing.assert_allclose(got_x0, x0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_eps, eps, rtol=1e-6, atol=1e-6)


def test_predict_edm_preconditioning():
  """With F = (x0 - c_skip x)/c_out the EDM denoiser returns x0 exactly."""
  p = P.EDM()
  t = jnp.array([0.1, 3.0, 40.0])
  x0 = jnp.ones((3, 2)) * 0.3
  x = x0 + P.bcast(t, x0) * jax.random.normal(jax.random.key(1), (3, 2))
  c_skip, c_out, c_in, c_noise = p.precond(t)

  def net(z, c):
    np.testing.assert_allclose(c, c_noise)
    xx = z / P.bcast(c_in, z)
    return (x0 - P.bcast(c_skip, z) * xx) / P.bcast(c_out, z)

  x0_hat, eps_hat, _ = par.predict(net, p, "edm", x, t)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(x0_hat + P.bcast(t, x) * eps_hat, x, rtol=1e-5, atol=1e-4)


def test_edm_prediction_needs_edm_process():
  with pytest.raises(ConfigError, match="EDM process"):
    par.predict(lambda x, c: x, P.VP(), "edm", jnp.ones((1, 2)), jnp.ones((1,)) * 0.5)
  with pytest.raises(ConfigError, match="valid values"):
    par.check_prediction("noise")
