"""The denoising loss against its closed-form minimum on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses
from jaxdiff import processes as P
from jaxdiff.errors import ConfigError

S = 0.5  # data ~ N(0, S^2 I)


def oracle(process):
  """The Bayes-optimal eps-prediction network for N(0, S^2 I) data."""
  def net(x, c):
    # recover t from the conditioning input (DDPM: c = t - 1)
    t = c + 1.0
    a, s = P.bcast(process.alpha(t), x), P.bcast(process.sigma(t), x)
    return s / (a**2 * S**2 + s**2) * x  # E[eps | x_t]
  return net


def test_eps_loss_reaches_bayes_minimum():
  """E[loss] of the optimal network = E_t[Var(eps | x_t)] = E_t[a^2 S^2 / (a^2 S^2 + s^2)]."""
  p = P.DDPM.linear(1000)
  loss_fn = losses.make_denoising_loss(p, prediction="eps")
  x0 = S * jax.random.normal(jax.random.key(0), (4096, 8))
  vals = [float(loss_fn(oracle(p), x0, jax.random.key(i))[0]) for i in range(8)]
  t = jnp.arange(1, 1001, dtype=jnp.float32)
  a2, s2 = p.alpha(t) ** 2, p.sigma(t) ** 2
  want = float(jnp.mean(a2 * S**2 / (a2 * S**2 + s2)))
  assert np.mean(vals) == pytest.approx(want, rel=0.03)
  # and a worse network has a larger loss
  worse = lambda x, c: 0.9 * oracle(p)(x, c)
  assert float(loss_fn(worse, x0, jax.random.key(0))[0]) > vals[0]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_parameterizations_give_the_same_eps_loss(prediction):
  """The optimal network written in any parameterization has the same eps-space loss."""
  from jaxdiff import parameterization as par

  p = P.VP()
  eps_net = lambda x, c: (lambda t: P.bcast(p.sigma(t), x) / (P.bcast(p.alpha(t), x) ** 2 * S**2
                                                              + P.bcast(p.sigma(t), x) ** 2) * x)(c / 999.0)

  def net(x, c):
    t = c / 999.0
    return par.convert(eps_net(x, c), x, P.bcast(p.alpha(t), x), P.bcast(p.sigma(t), x), "eps", prediction)

  x0 = S * jax.random.normal(jax.random.key(0), (512, 4))
  ref = losses.make_denoising_loss(p, prediction="eps")(eps_net, x0, jax.random.key(5))[0]
  got = losses.make_denoising_loss(p, prediction=prediction, target="eps")(net, x0, jax.random.key(5))[0]
  np.testing.assert_allclose(got, ref, rtol=2e-3)
  # in its own space the loss differs by the known weight: x0-space = (sigma/alpha)^2 eps-space
  own = losses.make_denoising_loss(p, prediction=prediction)(net, x0, jax.random.key(5))[0]
  assert np.isfinite(float(own)) and float(own) > 0


def test_weightings_and_samplings_run():
  x0 = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  net = lambda x, c: 0.1 * x
  for proc, kw in [
      (P.VP(), dict(weighting="likelihood")),
      (P.VP(), dict(weighting="min_snr", prediction="v")),
      (P.EDM(), dict(prediction="edm", weighting="edm", t_sampling="lognormal")),
      (P.VE(), dict(t_sampling="discrete", num_scales=10, prediction="score")),
      (P.DDPM.cosine(100), dict(prediction="v", reduce="sum")),
  ]:
    loss, aux = losses.make_denoising_loss(proc, **kw)(net, x0, jax.random.key(1))
    assert np.isfinite(float(loss)) and aux["loss_per_example"].shape == (8,)


def test_loss_config_errors():
  with pytest.raises(ConfigError, match="weighting"):
    losses.make_denoising_loss(P.VP(), weighting="snr2")
  with pytest.raises(ConfigError, match="EDM"):
    losses.make_denoising_loss(P.VP(), t_sampling="lognormal")
  with pytest.raises(ConfigError, match="VE"):
    losses.make_denoising_loss(P.VP(), t_sampling="discrete")
