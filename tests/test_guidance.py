"""Classifier-free and classifier guidance (`jaxdiff.guidance`) against closed forms.

The "networks" are exact: a labelled Gaussian mixture whose class y is component y, so the
conditional score is the component's and the unconditional one the mixture's, at every
time of the process; the exact classifier is the mixture's posterior p(y | x_t).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from jaxdiff import guidance, parameterization, processes, samplers
from jaxdiff.data.synthetic import GaussianMixture
from jaxdiff.errors import InputError

K = 3
ANGLES = 2 * np.pi * np.arange(K) / K + 0.3
MEANS = 1.5 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], -1)
STD = 0.5  # overlapping classes: guidance has something to sharpen
MIX = GaussianMixture(MEANS, STD)
VP = processes.VP()
N = 2000


def mixture_net(process, prediction="eps", calls=None):
  """`net(x, c, y)` of the labelled mixture under a VP process (`c = 999 t`): exact outputs."""
  means = jnp.asarray(MEANS, jnp.float32)

  def net(x, c, y):
    if calls is not None:
      calls.append((x.shape[0], y))
    t = c / 999.0
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    cond = -(x - a * means[jnp.minimum(y, K - 1)]) / (a**2 * STD**2 + s**2)
    score = jnp.where((y == K)[:, None], MIX.score(x, a[:, 0], s[:, 0]), cond)
    eps = -s * score
    return parameterization.from_x0_eps((x - s * eps) / a, eps, a, s, prediction)

  return net


def exact_scores(x, t, y):
  """(conditional, unconditional) scores of the mixture at (x, t)."""
  a, s = VP.alpha(t)[:, None], VP.sigma(t)[:, None]
  cond = -(x - a * jnp.asarray(MEANS, jnp.float32)[y]) / (a**2 * STD**2 + s**2)
  return cond, MIX.score(x, a[:, 0], s[:, 0])


def bayes_classifier_net(x_in, c):
  """The exact noisy-data classifier as a network `(x_in, c) -> logits` (VP: x_in = x_t)."""
  t = c / 999.0
  return MIX._components(x_in, VP.alpha(t), VP.sigma(t))


def posterior_of(x, y):
  """p(y | x) under the clean mixture: how typical of class y each sample is."""
  return np.asarray(MIX.posterior_weights(jnp.asarray(x, jnp.float32)))[:, y]


def cond_score_fn(labels, process=VP):
  return parameterization.score_fn_from_network(
      lambda x, c: mixture_net(process)(x, c, labels), process, "eps")


def cfg(labels, w, **kw):
  return guidance.cfg_score_fn(mixture_net(VP), VP, "eps", labels, w, null_label=K, **kw)


def draw(*score_fns, method="ddim", num_steps=20, key=0, n=N, process=VP, **opts):
  """Samples of each score function, all with the same key, in one jitted program."""
  fn = jax.jit(lambda k: [samplers.sample(k, process, f, (n, 2), method=method, num_steps=num_steps,
                                          **opts)[0] for f in score_fns])
  out = [np.asarray(x) for x in fn(jax.random.key(key))]
  return out[0] if len(out) == 1 else out


def groups(values, n: int = N):
  """A per-example array holding each of `values` for n consecutive examples."""
  return jnp.repeat(jnp.asarray(values, jnp.float32), n)


def _inputs(b=6):
  kx, kt = jax.random.split(jax.random.key(3))
  x = 2.0 * jax.random.normal(kx, (b, 2))
  t = jax.random.uniform(kt, (b,), minval=0.05, maxval=0.9)
  y = jnp.arange(b, dtype=jnp.int32) % K
  return x, t, y


def test_cfg_score_is_the_closed_form_for_every_parameterization():
  x, t, y = _inputs()
  ws = jnp.array([0.0, 1.0, 3.0, 0.0, 2.5, 3.0])  # per-example scales; w = 0: the conditional score

  @jax.jit
  def guided(x, t, y, ws):
    return [guidance.cfg_score_fn(mixture_net(VP, p), VP, p, y, ws, null_label=K)(x, t) for p in ("eps", "x0", "v")]

  cond, uncond = jax.jit(exact_scores)(x, t, y)
  for got in guided(x, t, y, ws):
    np.testing.assert_allclose(got, (1 + ws[:, None]) * cond - ws[:, None] * uncond, rtol=2e-4, atol=2e-4)


def test_guidance_interval_and_rescale():
  x, t, y = _inputs()
  sig = np.asarray(VP.sigma(t) / VP.alpha(t))
  lo, hi = float(np.sort(sig)[2]), float(np.sort(sig)[4])

  @jax.jit
  def scores(x, t, y):
    return (exact_scores(x, t, y), cfg(y, 2.0, interval=(lo, hi))(x, t), cfg(y, 2.0)(x, t),
            cfg(y, 2.0, rescale=1.0)(x, t), cfg(y, 2.0, rescale=0.5)(x, t))

  (cond, uncond), got, plain, full, half = scores(x, t, y)
  inside = ((sig >= lo) & (sig <= hi))[:, None]
  assert 0 < inside.sum() < len(sig)
  np.testing.assert_allclose(got, np.where(inside, 3.0 * cond - 2.0 * uncond, cond), rtol=2e-4, atol=2e-4)
  # rescale phi=1: the guided x0_hat has the conditional x0_hat's per-example std (Lin et al.)
  a, s = VP.alpha(t)[:, None], VP.sigma(t)[:, None]
  x0 = lambda score: (x + s**2 * score) / a  # noqa: E731
  np.testing.assert_allclose(np.std(x0(full), axis=1), np.std(x0(cond), axis=1), rtol=1e-3, atol=1e-5)
  factor = 0.5 * np.std(x0(cond), axis=1) / np.std(x0(plain), axis=1) + 0.5
  np.testing.assert_allclose(x0(half), x0(plain) * factor[:, None], rtol=1e-3, atol=1e-4)


def test_cfg_is_one_network_call_on_a_batch_of_2b():
  calls, seen = [], []

  def net(x, c, y):  # records the batch size (traced) and the labels (at run time)
    calls.append(x.shape[0])
    jax.debug.callback(lambda v: seen.append(np.asarray(v)), y)
    return mixture_net(VP)(x, c, y)

  b = 5
  labels = jnp.array([0, 1, 2, 0, 1], jnp.int32)
  score_fn = guidance.cfg_score_fn(net, VP, "eps", labels, 3.0, null_label=K)
  jax.jit(score_fn)(jnp.ones((b, 2)), jnp.full((b,), 0.5))
  assert calls == [2 * b]
  np.testing.assert_array_equal(seen[0], [0, 1, 2, 0, 1] + [K] * b)
  calls.clear()
  jax.eval_shape(lambda k: samplers.sample(k, VP, score_fn, (b, 2), method="heun", num_steps=4)[0],
                 jax.random.key(0))
  assert calls and all(n == 2 * b for n in calls)  # every evaluation, traced in the scan


# (method, options, num_steps): a representative set of the samplers, stochastic ones included.
METHODS = [("ancestral", {}, 20), ("ddim", {}, 20), ("heun", {}, 10), ("dpm_solver++", {}, 15),
           ("ode", {"rtol": 1e-4, "atol": 1e-4}, None), ("pc", {}, 10)]


@pytest.mark.parametrize("method,opts,steps", METHODS)
def test_cfg_at_w0_is_conditional_sampling(method, opts, steps):
  labels = jnp.arange(64, dtype=jnp.int32) % K
  guided, plain = draw(cfg(labels, 0.0), cond_score_fn(labels), method=method, num_steps=steps, n=64, **opts)
  # The adaptive ODE solver's step control reacts to rounding (the guided score is computed on a
  # batch of 2B), so its paths agree to its own tolerance; the fixed-step methods to rounding.
  tol = 1e-3 if method == "ode" else 1e-5
  np.testing.assert_allclose(guided, plain, rtol=tol, atol=tol)
  assert np.std(plain) > 0.5  # real samples, not a degenerate run


def test_cfg_samples_become_more_typical_of_the_class_as_w_grows():
  """w = 0 samples the class exactly; w > 0 moves samples away from the other classes.

  The statistic is the posterior p(y | x) of the class under the mixture (1 for a sample
  no other class could have made). Conditional samples (w = 0) must match its expectation
  under exact draws of the class's Gaussian (within 4 standard errors) and the class's
  mean and std; it must rise with w, and the samples' mean must move out along the
  class's direction, monotonically in w.
  """
  y, ws = 0, (0.0, 1.0, 3.0)
  labels = jnp.full((3 * N,), y, jnp.int32)
  x = draw(cfg(labels, groups(ws)), method="dpm_solver++", num_steps=25, n=3 * N)
  out = dict(zip(ws, np.split(x, 3)))
  rng = np.random.default_rng(0)
  p_exact = posterior_of(MEANS[y] + STD * rng.standard_normal((200_000, 2)), y)
  post = {w: posterior_of(v, y) for w, v in out.items()}
  se = p_exact.std() / np.sqrt(N)
  assert abs(post[0.0].mean() - p_exact.mean()) < 4 * se, (post[0.0].mean(), p_exact.mean())
  np.testing.assert_allclose(out[0.0].mean(0), MEANS[y], atol=4 * STD / np.sqrt(N))
  np.testing.assert_allclose(out[0.0].std(0), STD, atol=4 * STD / np.sqrt(2 * N) + 0.01)
  assert post[0.0].mean() + 5 * se < post[1.0].mean() <= post[3.0].mean() + 1e-6
  direction = MEANS[y] / np.linalg.norm(MEANS[y])
  along = {w: float(v.mean(0) @ direction) for w, v in out.items()}
  assert along[0.0] + 0.05 < along[1.0] < along[3.0] - 0.05, along


def test_cfg_matches_the_linear_gaussian_closed_form():
  """Gaussian class N(mu, s1^2) and 'unconditional' N(0, s0^2) under VE (alpha=1, sigma=t-ish).

  The guided score is linear in x, so the probability-flow ODE dx/dsigma = -sigma score
  is solved in closed form: with Phi = v1^((1+w)/2) v0^(-w/2), v_i = s_i^2 + sigma^2,
    x(sigma_min) = Phi(sigma_min) [x_T / Phi(sigma_max) + (1 + w) mu J],
    J = int_{sigma_min}^{sigma_max} sigma / (v1 Phi) dsigma,
  so the samples are Gaussian with that mean and std Phi(sigma_min) sigma_max / Phi(sigma_max)
  (~ s1 (s1 / s0)^w: guidance shrinks the class towards its mode, faster than the tilted
  density p(x|y)^(1+w) / p(x)^w would). Every PF-ODE sampler must land on it, and DDIM
  must converge to it at first order.
  """
  ve = processes.VE(sigma_min=0.01, sigma_max=50.0)
  mu, s1, s0 = np.array([1.0, -0.5]), 0.5, 1.5

  def net(x, c, y):
    v1, v0 = (s1**2 + c**2)[:, None], (s0**2 + c**2)[:, None]
    return jnp.where((y == 1)[:, None], -x / v0, -(x - jnp.asarray(mu, jnp.float32)) / v1)

  smin, smax = float(ve.sigma(ve.t_min)), float(ve.sigma(ve.T))
  ws = (0.0, 1.0, 2.5)
  want = {}
  for w in ws:
    phi = lambda s, w=w: (s1**2 + s**2) ** ((1 + w) / 2) * (s0**2 + s**2) ** (-w / 2)  # noqa: E731
    j, _ = integrate.quad(lambda s: s / ((s1**2 + s**2) * phi(s)), smin, smax, limit=200, epsabs=1e-12)
    want[w] = (phi(smin) * (1 + w) * mu * j, phi(smin) * smax / phi(smax))
  n = 2 * N  # per w
  score_fn = guidance.cfg_score_fn(net, ve, "score", jnp.zeros((3 * n,), jnp.int32), groups(ws, n), null_label=1)

  def std_errors(method, steps, **opts):
    """Relative errors of each w group's std; asserts means and stds within 4 SE + `tol`."""
    x = draw(score_fn, method=method, num_steps=steps, process=ve, denoise=False, n=3 * n, **opts)
    return [np.abs(xw.std(0) / want[w][1] - 1).max() for w, xw in zip(ws, np.split(x, 3))], x

  # Converged PF-ODE solvers: within Monte Carlo error (4 SE) plus 1.5% discretization.
  for method, steps, opts in [("ode", None, {}), ("heun", 160, {}), ("dpm_solver++", 80, {"order": 3})]:
    _, x = std_errors(method, steps, **opts)
    for w, xw in zip(ws, np.split(x, 3)):
      mean, std = want[w]
      msg = f"{method} w={w}"
      np.testing.assert_allclose(xw.mean(0), mean, atol=(4 / np.sqrt(n) + 0.015) * std, err_msg=msg)
      np.testing.assert_allclose(xw.std(0), std, rtol=4 / np.sqrt(2 * n) + 0.015, err_msg=msg)
  # DDIM (first order) at w = 2.5: halving the step halves the error (measured 0.39 -> 0.19).
  e40, e80 = std_errors("ddim", 40)[0][2], std_errors("ddim", 80)[0][2]
  assert 1.7 < e40 / e80 < 2.3 and e80 > 0.1, (e40, e80)
  assert want[2.5][1] < 0.5 * s1 * (s1 / s0) ** 1.5  # w = 2.5 really concentrates


def test_classifier_guidance_with_the_exact_classifier():
  """grad log p_t(x) + s grad log p_t(y|x): s = 1 is the conditional score, s = 1 + w is CFG(w)."""
  x, t, y = _inputs()
  uncond_fn = parameterization.score_fn_from_network(
      lambda xx, c: mixture_net(VP)(xx, c, jnp.full((xx.shape[0],), K)), VP, "eps")
  logp = guidance.classifier_logp_fn(bayes_classifier_net, VP)
  w = 2.0

  @jax.jit
  def scores(x, t, y):
    cg = lambda s: guidance.classifier_guidance_score_fn(uncond_fn, logp, y, s)(x, t)  # noqa: E731
    return exact_scores(x, t, y)[0], cg(1.0), cg(1 + w), cfg(y, w)(x, t)

  cond, cg1, cg_w, cfg_w = scores(x, t, y)
  np.testing.assert_allclose(cg1, cond, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(cg_w, cfg_w, rtol=1e-3, atol=1e-3)

  scales = (0.0, 1.0, 3.0)
  labels = jnp.zeros((3 * N,), jnp.int32)
  x, x_cond = draw(guidance.classifier_guidance_score_fn(uncond_fn, logp, labels, groups(scales)),
                   cond_score_fn(labels), n=3 * N)
  samples = dict(zip(scales, np.split(x, 3)))
  np.testing.assert_allclose(samples[1.0], np.split(x_cond, 3)[1], atol=2e-3)
  frac = {s: float(np.mean(np.argmax(MIX.posterior_weights(jnp.asarray(v)), -1) == 0))
          for s, v in samples.items()}
  se = np.sqrt(0.25 / N)
  assert abs(frac[0.0] - 1 / K) < 4 * se  # scale 0: the mixture, every class equally often
  exact = MEANS[0] + STD * np.random.default_rng(0).standard_normal((200_000, 2))
  p = float(np.mean(np.argmax(MIX.posterior_weights(jnp.asarray(exact, jnp.float32)), -1) == 0))
  assert abs(frac[1.0] - p) < 4 * np.sqrt(p * (1 - p) / N) + 1e-3  # scale 1: the class itself
  direction = MEANS[0] / np.linalg.norm(MEANS[0])
  along = {s: float(v.mean(0) @ direction) for s, v in samples.items()}
  assert along[0.0] + 0.5 < along[1.0] < along[3.0] - 0.05, along  # and further out with s = 3


def test_bad_guidance_arguments():
  net = mixture_net(VP)
  with pytest.raises(InputError, match=r"guidance_scale=nan must be a finite number"):
    guidance.cfg_score_fn(net, VP, "eps", 0, float("nan"), null_label=K)
  with pytest.raises(InputError, match=r"guidance_interval=\(2.0, 1.0\) must be \(lo, hi\)"):
    guidance.cfg_score_fn(net, VP, "eps", 0, 1.0, null_label=K, interval=(2.0, 1.0))
  with pytest.raises(InputError, match=r"guidance_rescale=1.5 must be in \[0, 1\]"):
    guidance.cfg_score_fn(net, VP, "eps", 0, 1.0, null_label=K, rescale=1.5)
