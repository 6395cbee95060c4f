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


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "flow"])
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


@pytest.mark.parametrize("t_sampling", ["process", "logit_normal"])
def test_flow_matching_loss_reaches_bayes_minimum(t_sampling):
  """Rectified flow: the optimal velocity E[eps - x0 | x_t] has loss E_t[Var(eps - x0 | x_t)].

  For N(0, S^2) data and x_t = (1 - t) x0 + t eps, per dimension Var(u | x_t) =
  1 + S^2 - (t - (1 - t) S^2)^2 / ((1 - t)^2 S^2 + t^2), averaged over the training times
  (uniform, or SD3's logit-normal) by quadrature.
  """
  from scipy import integrate, special, stats

  p = P.RectifiedFlow()

  def optimal(x, c):
    t = c / 999.0  # shift 1: noise_cond = 999 t
    a, s = P.bcast(p.alpha(t), x), P.bcast(p.sigma(t), x)
    return (s - a * S**2) / (a**2 * S**2 + s**2) * x

  loss_fn = losses.make_denoising_loss(p, prediction="flow", t_sampling=t_sampling)
  x0 = S * jax.random.normal(jax.random.key(0), (4096, 8))
  runs = [loss_fn(optimal, x0, jax.random.key(i)) for i in range(8)]
  got = np.mean([float(loss) for loss, _ in runs])

  def var_u(t):
    return 1 + S**2 - (t - (1 - t) * S**2) ** 2 / ((1 - t) ** 2 * S**2 + t**2)

  lo, hi = p.t_min, p.T
  if t_sampling == "process":
    want = integrate.quad(var_u, lo, hi)[0] / (hi - lo)
  else:  # t = lo + (hi - lo) sigmoid(n), n ~ N(0, 1)
    want = integrate.quad(lambda n: var_u(lo + (hi - lo) * special.expit(n)) * stats.norm.pdf(n), -9, 9)[0]
    n = np.asarray([float(v) for _, aux in runs for v in (aux["t"] - lo) / (hi - lo)])
    logits = np.log(n) - np.log1p(-n)
    assert abs(logits.mean()) < 0.1 and abs(logits.std() - 1.0) < 0.05  # 32 draws: SE 0.18, 0.13
  assert got == pytest.approx(want, rel=0.02)
  # a worse network has a larger loss
  assert float(loss_fn(lambda x, c: 0.9 * optimal(x, c), x0, jax.random.key(0))[0]) > runs[0][0]


def test_weightings_and_samplings_run():
  x0 = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  net = lambda x, c: 0.1 * x
  for proc, kw in [
      (P.VP(), dict(weighting="likelihood")),
      (P.VP(), dict(weighting="min_snr", prediction="v")),
      (P.EDM(), dict(prediction="edm", weighting="edm", t_sampling="lognormal")),
      (P.VE(), dict(t_sampling="discrete", num_scales=10, prediction="score")),
      (P.DDPM.cosine(100), dict(prediction="v", reduce="sum")),
      (P.RectifiedFlow(shift=3.0), dict(prediction="flow", t_sampling="logit_normal", weighting="min_snr")),
      (P.VP(), dict(prediction="flow", t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)),
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
  with pytest.raises(ConfigError, match="integer steps"):
    losses.make_denoising_loss(P.DDPM.linear(), t_sampling="logit_normal")
  with pytest.raises(ConfigError, match="logit_std=0.0"):
    losses.make_denoising_loss(P.RectifiedFlow(), t_sampling="logit_normal", logit_std=0.0)
