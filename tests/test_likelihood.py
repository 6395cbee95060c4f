"""Likelihoods: the probability-flow ODE against closed forms, the DDPM bound, evaluation.

The oracle is a Gaussian (mixture) whose score and noised density are exact at every time
(`synthetic.GaussianMixture`), so the ODE's log p(x) can be compared with the closed form
of the marginal at t_min, and the DDPM bound with an independent float64 computation of
Ho et al.'s KL terms.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import jaxdiff
from conftest import ROOT
from jaxdiff import likelihood as lk
from jaxdiff import processes
from jaxdiff.data import synthetic
from jaxdiff.errors import InputError

VP = processes.VP()
# sigma(t_min)^2 ~ 1e-6, so p_{t_min} is the data density, and alpha(T) ~ 4e-5, so p_T is the
# N(0, I) prior to ~1e-5 nats for data of mean < 1: the ODE's log p is then the data's.
VP_LONG = processes.VP(beta_max=40.0, eps=1e-5)


def gmm_score_fn(gmm, process):
  return lambda x, t: gmm.score(x, process.alpha(t), process.sigma(t))


def marginal_logp(gmm, process, x, t=None):
  """Closed-form log p_t(x) of the mixture under `process` at t (default t_min), float32."""
  t = jnp.full((x.shape[0],), process.t_min if t is None else t)
  return gmm.log_prob(x, process.alpha(t), process.sigma(t))


def prior_mismatch(gmm, process, z):
  """prior_logp(z) - log p_T(z): what the ODE's density (prior at T) differs by from the data's."""
  return process.prior_logp(z) - marginal_logp(gmm, process, z, process.T)


def gaussian(mean: float, std: float, dim: int) -> synthetic.GaussianMixture:
  return synthetic.GaussianMixture(np.full((1, dim), mean), std)


class ImageGaussian:
  """An isotropic Gaussian on images `[B, H, W, C]`: exact score and log density under a process."""

  def __init__(self, mean: float, std: float, process):
    self.mean, self.std, self.process = mean, std, process

  def _var(self, t):
    a, s = self.process.alpha(t), self.process.sigma(t)
    return a, (a * self.std) ** 2 + s**2

  def score(self, x, t):
    a, var = self._var(t)
    return -(x - a[:, None, None, None] * self.mean) / var[:, None, None, None]

  def expected_bpd(self, pixels: np.ndarray, centered: bool) -> np.ndarray:
    """E_u[bits/dim] of the exact model at t_min under (k + u) / 256 dequantization, float64."""
    a_scale, b_shift = (2 / 256, -1.0) if centered else (1 / 256, 0.0)
    t = jnp.asarray([self.process.t_min])
    alpha, var = (float(v[0]) for v in self._var(t))
    mu = alpha * self.mean
    centre = a_scale * (pixels.astype(np.float64) + 0.5) + b_shift
    sq = (centre - mu) ** 2 + a_scale**2 / 12.0  # E_u[(x - mu)^2] with Var(u) = 1/12
    nll = 0.5 * np.log(2 * np.pi * var) + sq / (2 * var)
    d = np.prod(pixels.shape[1:])
    return (nll.reshape(len(pixels), -1).sum(-1) / d - np.log(a_scale)) / np.log(2)


# --------------------------------------------------------------------------------------
# Probability-flow ODE vs closed forms
# --------------------------------------------------------------------------------------

GMM2D = synthetic.gmm2d()
GMM2D_SCORE = gmm_score_fn(GMM2D, VP)


def test_exact_divergence_matches_closed_form_2d():
  x = jnp.asarray(GMM2D.sample(16, seed=3)[0])
  logp, info = jaxdiff.log_likelihood(jax.random.key(0), VP, GMM2D_SCORE, x, divergence="exact",
                                      rtol=1e-6, atol=1e-6)
  closed = np.asarray(marginal_logp(GMM2D, VP, x))
  err = np.abs(np.asarray(logp) - closed)
  # the same, with the (known) prior mismatch at T added to the closed form: the ODE's own error
  err_ode = np.abs(np.asarray(logp) - closed - np.asarray(prior_mismatch(GMM2D, VP, info["z"])))
  print(f"2-D GMM, exact divergence: max |logp - closed form| = {err.max():.2e} nats "
        f"({err_ode.max():.2e} with the prior mismatch), NFE {int(info['nfe'])}")
  assert err.max() < 1e-3 and err_ode.max() < 1e-4
  assert int(info["nfe"]) == 6 * int(info["num_steps"]) + 1 and bool(info["success"])
  # the prior term alone is far from the answer: the divergence integral carries it
  assert np.abs(np.asarray(info["prior_logp"]) - np.asarray(logp)).min() > 0.1


def test_rectified_flow_likelihood_matches_closed_form():
  """Flow matching's straight path (with SD3's shift): the ODE's log p against the closed form."""
  x = jnp.asarray(GMM2D.sample(16, seed=4)[0])
  for shift in (1.0, 3.0):
    rf = processes.RectifiedFlow(shift=shift)
    logp, info = jaxdiff.log_likelihood(jax.random.key(0), rf, gmm_score_fn(GMM2D, rf), x, divergence="exact",
                                        rtol=1e-6, atol=1e-6)
    closed = np.asarray(marginal_logp(GMM2D, rf, x))
    err_ode = np.abs(np.asarray(logp) - closed - np.asarray(prior_mismatch(GMM2D, rf, info["z"])))
    print(f"rectified flow (shift {shift}): max |logp - closed form| = {np.abs(np.asarray(logp) - closed).max():.2e} "
          f"nats ({err_ode.max():.2e} with the prior mismatch), NFE {int(info['nfe'])}")
    assert err_ode.max() < 5e-4 and bool(info["success"])


@pytest.mark.parametrize("divergence", ["exact", "hutchinson_rademacher"])
def test_forward_and_reverse_mode_agree(divergence):
  x = jnp.asarray(GMM2D.sample(8, seed=5)[0])
  kw = dict(divergence=divergence, rtol=1e-6, atol=1e-6)
  fwd, _ = jaxdiff.log_likelihood(jax.random.key(0), VP, GMM2D_SCORE, x, **kw)
  rev, _ = jaxdiff.log_likelihood(jax.random.key(0), VP, GMM2D_SCORE, x, autodiff="reverse", **kw)
  np.testing.assert_allclose(fwd, rev, atol=1e-4)


def test_unet_with_custom_vjp_layers_needs_reverse_mode_or_plain_layers():
  from jaxdiff import parameterization
  from jaxdiff.models import UNet
  kw = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.0)
  x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1.0, maxval=1.0)
  ddpm = processes.DDPM.linear(100)
  params = jax.jit(lambda k: UNet(**kw).init(k, x, jnp.zeros(2), train=False)["params"])(jax.random.key(1))

  def score_fn(custom_vjp):
    net = lambda y, c: UNet(**kw, custom_vjp=custom_vjp).apply({"params": params}, y, c, train=False)  # noqa: E731
    return parameterization.score_fn_from_network(net, ddpm, "eps")

  opts = dict(rtol=1e-3, atol=1e-3)
  with pytest.raises(InputError, match="custom_vjp=False"):
    jaxdiff.log_likelihood(jax.random.key(2), ddpm, score_fn(True), x, **opts)
  plain, _ = jaxdiff.log_likelihood(jax.random.key(2), ddpm, score_fn(False), x, **opts)
  rev, _ = jaxdiff.log_likelihood(jax.random.key(2), ddpm, score_fn(True), x, autodiff="reverse", **opts)
  np.testing.assert_allclose(plain, rev, rtol=1e-4)


def test_nfe_counts_every_network_evaluation():
  calls = []
  gmm = gaussian(0.3, 0.5, 2)

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return gmm.score(x, VP.alpha(t), VP.sigma(t))

  x = jnp.asarray(gmm.sample(4, seed=0)[0])
  seen = set()
  for tol in (1e-4, 1e-8):  # traced: one compile for both
    calls.clear()
    logp, info = lk.log_likelihood(jax.random.key(1), VP, counted, x, rtol=tol, atol=tol, dt0=0.05)
    jax.block_until_ready(logp)
    nfe, steps = int(info["nfe"]), int(info["num_steps"])
    rejected = steps - int(info["num_accepted_steps"])
    print(f"tol {tol:g}: {len(calls)} evaluations counted, nfe {nfe}, {steps} steps ({rejected} rejected)")
    assert nfe == 6 * steps + 1
    # rejected steps cost 6 evaluations like accepted ones (num_steps counts them); only a
    # rejected attempt at the very first step evaluates the first stage once more
    assert nfe <= len(calls) <= nfe + rejected
    seen.add((rejected > 0, len(calls) == nfe))
  assert seen == {(False, True), (True, False)}  # an exact count, and a first step rejected


@pytest.fixture(scope="module")
def hutchinson16():
  """log p of 2 points of a 16-D mixture, 128 copies each (every row draws its own probes)."""
  rng = np.random.default_rng(0)
  gmm = synthetic.GaussianMixture(rng.normal(0, 1.0, (3, 16)), [0.4, 0.6, 0.8])
  points = gmm.sample(2, seed=5)[0]
  copies = 128
  x = jnp.asarray(np.repeat(points, copies, axis=0))
  score = gmm_score_fn(gmm, VP)
  out = {"exact": np.asarray(marginal_logp(gmm, VP, jnp.asarray(points)))}
  for name, divergence, n_probes in (("rademacher", "hutchinson_rademacher", 1),
                                     ("gaussian", "hutchinson_gaussian", 1),
                                     ("gaussian4", "hutchinson_gaussian", 4)):
    logp, info = lk.log_likelihood(jax.random.key(2), VP, score, x, divergence=divergence, n_probes=n_probes,
                                   rtol=1e-5, atol=1e-5)
    # remove the prior mismatch at T (a deterministic function of z, ~1e-2 nats here)
    logp = np.asarray(logp - prior_mismatch(gmm, VP, info["z"])).reshape(-1, copies)
    out[name] = (logp.mean(1), logp.std(1, ddof=1) / math.sqrt(copies))
  return out


@pytest.mark.parametrize("name", ["rademacher", "gaussian", "gaussian4"])
def test_hutchinson_is_unbiased_16d(hutchinson16, name):
  mean, se = hutchinson16[name]
  z = (mean - hutchinson16["exact"]) / se
  print(f"16-D GMM, {name}: bias {mean - hutchinson16['exact']} nats, s.e. {se}, z {z}")
  assert np.all(se > 1e-3)  # the estimator is noisy, so the check below has teeth
  assert np.all(np.abs(z) < 4.0)


def test_hutchinson_variances(hutchinson16):
  """Var(Rademacher) = 2 sum_{i!=j} A_ij^2 < Var(Gaussian) = 2 |A|_F^2; 4 probes halve the s.e."""
  se_r, se_g, se_g4 = (hutchinson16[k][1] for k in ("rademacher", "gaussian", "gaussian4"))
  print(f"s.e. Rademacher {se_r}, Gaussian {se_g}, Gaussian x4 {se_g4}")
  assert np.all(se_r < se_g)
  assert np.all((se_g4 / se_g > 0.35) & (se_g4 / se_g < 0.7))


# --------------------------------------------------------------------------------------
# Bits/dim: dequantization, the data-scale offset, Gaussian closed forms
# --------------------------------------------------------------------------------------

PIXELS = np.random.default_rng(1).integers(0, 256, (6, 2, 2, 4)).astype(np.uint8)  # D = 16


# One density of [0, 1] data, N(0.55, 0.3^2), and its image under x = 2 y - 1, N(0.1, 0.6^2).
MODEL01 = ImageGaussian(0.55, 0.3, VP_LONG)
MODEL_PM1 = ImageGaussian(0.1, 0.6, VP_LONG)
BPD_OPTIONS = dict(n_repeats=32, divergence="exact", rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def centered_bpd():
  return jaxdiff.bits_per_dim(jax.random.key(4), VP_LONG, MODEL_PM1.score, PIXELS, centered=True,
                              **BPD_OPTIONS)


def test_bits_per_dim_matches_analytic_gaussian(centered_bpd):
  mean, se, info = centered_bpd
  expected = MODEL_PM1.expected_bpd(PIXELS, centered=True)
  z = (np.asarray(mean) - expected) / np.asarray(se)
  print(f"Gaussian bits/dim: {np.asarray(mean)} vs analytic {expected}; z = {z}")
  assert info["bpd"].shape == (32, 6) and info["nfe"].shape == (32,)
  assert np.all(np.asarray(se) > 0) and np.all(np.abs(z) < 5.0)
  assert np.all(np.abs(np.asarray(mean) - expected) < 3e-3)


def test_dequantization_offset_same_density_in_both_scales(centered_bpd):
  """The [0, 1] model and its [-1, 1] image give the same bits/dim, draw by draw.

  Same key, so the same dequantization noise: the two log-densities of each draw differ by
  exactly D log 2 (the Jacobian of x = 2 y - 1), which the offsets (+8 vs +7 bits) undo; a
  missing or wrong offset shows up as 1 bit/dim.
  """
  b01, _, info01 = lk.bits_per_dim(jax.random.key(4), VP_LONG, MODEL01.score, PIXELS, centered=False,
                                   **BPD_OPTIONS)
  draws01, draws_pm1 = np.asarray(info01["bpd"]), np.asarray(centered_bpd[2]["bpd"])
  d = 16
  logp01 = -(draws01 * math.log(2) + math.log(1 / 256)) * d  # log p of the data in each scale
  logp_pm1 = -(draws_pm1 * math.log(2) + math.log(2 / 256)) * d
  shift = logp01 - logp_pm1
  print(f"[0,1] vs [-1,1]: max |bpd difference| {np.abs(draws01 - draws_pm1).max():.2e} bits/dim; "
        f"log p difference {shift.min():.5f}..{shift.max():.5f} (D log 2 = {d * math.log(2):.5f})")
  np.testing.assert_allclose(shift, d * math.log(2), atol=2e-3)
  assert np.abs(np.asarray(b01) - np.asarray(centered_bpd[0])).max() < 2e-4
  assert np.all(np.abs(np.asarray(b01) - MODEL01.expected_bpd(PIXELS, centered=False)) < 3e-3)


# --------------------------------------------------------------------------------------
# The DDPM variational bound
# --------------------------------------------------------------------------------------

SCHEDULE20 = (20, 0.01, 0.3)  # N, beta_1, beta_N: every KL term of moderate size
DDPM20 = processes.DDPM.linear(*SCHEDULE20)


def ho_vlb_terms(x0: np.ndarray, m: float, s: float, betas: np.ndarray, variance: str):
  """Ho et al.'s bound for data N(m, s^2) and its exact x0-predictor, from their formulas, float64.

  Returns (prior, [KL_{t-1} for t = 2..N], decoder), each per example, with the expectation
  over x_t taken in closed form (x0_hat is linear in x_t). The decoder is the Gaussian density.
  """
  n = len(betas)
  abar = np.cumprod(1 - betas)
  sq = lambda v: np.sum(v, axis=-1)  # noqa: E731

  def err2(i):  # E[(x0 - x0_hat(x_i))^2] per dimension at 1-based step i
    ab = abar[i - 1]
    k = np.sqrt(ab) * s**2 / (ab * s**2 + 1 - ab)
    return (x0 - m) ** 2 * (1 - k * np.sqrt(ab)) ** 2 + k**2 * (1 - ab)

  prior = sq(0.5 * (abar[-1] * x0**2 + (1 - abar[-1]) - 1 - np.log(1 - abar[-1])))
  kls = []
  for t in range(2, n + 1):
    beta, ab, ab_prev = betas[t - 1], abar[t - 1], abar[t - 2]
    c_x0 = np.sqrt(ab_prev) * beta / (1 - ab)
    var_q = beta * (1 - ab_prev) / (1 - ab)
    var_p = var_q if variance == "fixed_small" else beta
    per_dim = 0.5 * (np.log(var_p / var_q) + var_q / var_p - 1) + 0.5 * c_x0**2 * err2(t) / var_p
    kls.append(sq(per_dim))
  var_dec = betas[1] * (1 - abar[0]) / (1 - abar[1])
  decoder = sq(0.5 * np.log(2 * np.pi * var_dec) + err2(1) / (2 * var_dec))
  return prior, np.stack(kls), decoder


# Gaussian data N(0.3, 0.5^2) in 16-D, 4 data points, each repeated 256 times: the mean over
# the copies of the one-draw-per-term bound estimates its expectation over x_t.
VLB_M, VLB_S, VLB_COPIES = 0.3, 0.5, 256
VLB_MODEL = gaussian(VLB_M, VLB_S, 16)
VLB_POINTS = VLB_MODEL.sample(4, seed=7)[0].astype(np.float64)
VLB_X = np.repeat(VLB_POINTS, VLB_COPIES, axis=0).astype(np.float32)
VLB_SCORE = gmm_score_fn(VLB_MODEL, DDPM20)


def copies_mean_se(values) -> tuple[np.ndarray, np.ndarray]:
  v = np.asarray(values).reshape(-1, VLB_COPIES)
  return v.mean(1), v.std(1, ddof=1) / math.sqrt(VLB_COPIES)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vlb_matches_closed_form_gaussian(variance):
  nats, stderr, info = lk.ddpm_vlb(jax.random.key(8), DDPM20, VLB_SCORE, VLB_X, variance=variance,
                                   decoder="gaussian")
  prior, kls, dec = ho_vlb_terms(VLB_POINTS, VLB_M, VLB_S, np.asarray(processes.linear_betas(*SCHEDULE20)),
                                 variance)
  expected = prior + kls.sum(0) + dec
  mean, se = copies_mean_se(nats)
  print(f"VLB ({variance}): {mean} vs closed form {expected} nats (s.e. {se})")
  np.testing.assert_allclose(copies_mean_se(info["prior"])[0], prior, rtol=1e-4)
  assert np.all(np.asarray(stderr) == 0) and info["terms"].shape == (19, 4 * VLB_COPIES)
  assert np.all(np.abs(mean - expected) < 4 * se + 1e-3 * np.abs(expected))
  # each of the 19 x 4 KL terms against its closed form
  terms = np.asarray(info["terms"]).reshape(19, -1, VLB_COPIES)
  t_se = terms.std(2, ddof=1) / math.sqrt(VLB_COPIES)
  assert np.all(np.abs(terms.mean(2) - kls) < 5 * t_se + 1e-4)


def test_vlb_sampled_timesteps_unbiased_with_stderr():
  """K = 5 of the 19 KL terms per example: unbiased, and its s.e. matches its spread."""
  prior, kls, dec = ho_vlb_terms(VLB_POINTS, VLB_M, VLB_S, np.asarray(processes.linear_betas(*SCHEDULE20)),
                                 "fixed_small")
  expected = prior + kls.sum(0) + dec
  est, est_se, info = lk.ddpm_vlb(jax.random.key(9), DDPM20, VLB_SCORE, VLB_X, decoder="gaussian",
                                  num_sampled_steps=5)
  mean, se = copies_mean_se(est)
  print(f"VLB from 5 sampled timesteps: {mean} +- {se} vs closed form {expected}")
  assert info["terms"].shape == (5, 4 * VLB_COPIES) and int(info["nfe"]) == 6
  assert np.all(np.abs(mean - expected) < 4 * se)
  rms_se = np.sqrt(np.mean(np.asarray(est_se).reshape(-1, VLB_COPIES) ** 2, axis=1))
  spread = se * math.sqrt(VLB_COPIES)
  assert np.all((rms_se > 0.7 * spread) & (rms_se < 1.4 * spread))


def _log_bin_mass(lo: float, hi: float, mu: float, sd: float) -> tuple[float, bool]:
  """float64 log of N(mu, sd^2)'s mass on [lo, hi]: quadrature, or log-CDFs in the deep tail."""
  z_lo, z_hi = (lo - mu) / sd, (hi - mu) / sd
  if z_lo > 0:  # upper tail: mirror, so the CDFs involved are small
    z_lo, z_hi = -z_hi, -z_lo
  log_hi, log_lo = special.log_ndtr(z_hi), special.log_ndtr(z_lo)
  log_cdf = log_hi + np.log1p(-np.exp(log_lo - log_hi))
  if log_cdf < -30:  # quadrature cannot resolve such a mass relative to itself
    return float(log_cdf), False
  # an infinite edge is cut 40 sigma beyond the mean or the other edge (the rest is < e^-800)
  a = min(mu, hi) - 40 * sd if np.isinf(lo) else lo
  b = max(mu, lo) + 40 * sd if np.isinf(hi) else hi
  pdf = lambda v: math.exp(-0.5 * ((v - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))  # noqa: E731
  mass, _ = integrate.quad(pdf, a, b, epsabs=0, epsrel=1e-10, limit=200, points=[mu] if a < mu < b else None)
  return float(np.log(mass)), True


def test_discretized_decoder_matches_numerical_integration():
  half = 1.0 / 255.0
  cases = [(k, mu, sd) for k in (0, 1, 100, 254, 255) for mu in (-1.0, -0.2, 0.5, 0.99)
           for sd in (0.003, 0.05, 0.7)]
  k, mu, sd = (np.asarray(v, np.float64) for v in zip(*cases))
  x = k / 127.5 - 1.0
  got = np.asarray(lk.discretized_gaussian_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32),
                                                     jnp.asarray(sd, jnp.float32)))
  by_quadrature = 0
  for xi, mi, si, gi, ki in zip(x, mu, sd, got, k):
    lo = -np.inf if ki == 0 else xi - half
    hi = np.inf if ki == 255 else xi + half
    ref, quad = _log_bin_mass(lo, hi, mi, si)
    by_quadrature += quad
    assert abs(gi - ref) <= 2e-4 * max(1.0, abs(ref)), (ki, mi, si, gi, ref)
  assert by_quadrature >= 20
  # the 256 bins hold all the mass
  levels = jnp.arange(256) / 127.5 - 1.0
  for mi, si in ((0.1, 0.3), (0.97, 0.004)):
    total = jnp.sum(jnp.exp(lk.discretized_gaussian_log_prob(levels, mi, si)))
    assert abs(float(total) - 1.0) < 1e-4


def test_vlb_bits_per_dim_discretized_matches_quadrature():
  """Integer pixels, discretized decoder: the bound in bits/dim against float64 quadrature."""
  m, s = 0.1, 0.6
  model = ImageGaussian(m, s, DDPM20)
  pixels = np.repeat(PIXELS[:2], 64, axis=0)
  bpd, _, _ = lk.vlb_bits_per_dim(jax.random.key(10), DDPM20, model.score, pixels, centered=True)
  x0 = (pixels.astype(np.float64) / 127.5 - 1.0).reshape(len(pixels), -1)[::64]
  betas = np.asarray(processes.linear_betas(*SCHEDULE20))
  prior, kls, _ = ho_vlb_terms(x0, m, s, betas, "fixed_small")
  abar = np.cumprod(1 - betas)
  k1 = np.sqrt(abar[0]) * s**2 / (abar[0] * s**2 + 1 - abar[0])
  std_dec = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # E over eps ~ N(0, 1)
  weights = weights / weights.sum()
  dec = []
  for row in x0:
    x1 = np.sqrt(abar[0]) * row[:, None] + np.sqrt(1 - abar[0]) * nodes[None]  # x_1 at each node
    mean = m + k1 * (x1 - np.sqrt(abar[0]) * m)  # the exact model's x0_hat(x_1)
    lo = np.where(row[:, None] < -1 + 1 / 255, -np.inf, (row[:, None] - 1 / 255 - mean) / std_dec)
    hi = np.where(row[:, None] > 1 - 1 / 255, np.inf, (row[:, None] + 1 / 255 - mean) / std_dec)
    logmass = np.log(np.maximum(special.ndtr(hi) - special.ndtr(lo), 1e-300))
    dec.append(-np.sum(logmass @ weights))
  expected = (prior + kls.sum(0) + np.asarray(dec)) / (x0.shape[1] * math.log(2))
  got = np.asarray(bpd).reshape(2, 64)
  mean, se = got.mean(1), got.std(1, ddof=1) / 8
  print(f"discretized VLB: {mean} vs quadrature {expected} bits/dim (s.e. {se})")
  assert np.all(np.abs(mean - expected) < 4 * se + 1e-3)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_input_one_line_errors():
  x = jnp.asarray(GMM2D.sample(4, seed=0)[0])
  key = jax.random.key(0)
  cases = [
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, np.array([[3, 4]], np.int32)),
       "dtype int32.*bits_per_dim"),
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, x.at[1, 0].set(jnp.nan)), "1 NaN/inf"),
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, x[0]), r"shape \(2,\).*x\[None\]"),
      (lambda: lk.log_likelihood(key, VP, lambda y, t: y[:, :1], x), r"score_fn returned shape \(4, 1\)"),
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, x, divergence="hutch"), "divergence='hutch'.*valid"),
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, jnp.zeros((1, 4097)), divergence="exact"),
       "4097 > 4096.*hutchinson_rademacher"),
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, x, rtol=0.0), "rtol=0.0 must be a positive"),
      (lambda: lk.log_likelihood(key, VP, GMM2D_SCORE, x, autodiff="jvp"), "autodiff='jvp'.*forward"),
      (lambda: lk.bits_per_dim(key, VP, GMM2D_SCORE, PIXELS / 127.5 - 1),
       r"dtype float64 \(values in \[-0.9"),
      (lambda: lk.bits_per_dim(key, VP, GMM2D_SCORE, np.full((2, 2, 2, 1), 300)),
       r"\[300, 300\].*\[0, 255\]"),
      (lambda: lk.ddpm_vlb(key, VP, GMM2D_SCORE, x), "needs a discrete-time DDPM process, not VP"),
      (lambda: lk.vlb_bits_per_dim(key, DDPM20, GMM2D_SCORE, PIXELS, variance="learned"),
       "variance='learned'"),
  ]
  for fn, pattern in cases:
    with pytest.raises(InputError, match=pattern) as e:
      fn()
    assert "\n" not in str(e.value)


def test_ode_that_does_not_converge_names_the_tolerances():
  x = jnp.asarray(GMM2D.sample(4, seed=0)[0])
  with pytest.raises(InputError, match=r"max_steps=3 .*rtol=1e-05, atol=1e-05; loosen"):
    lk.log_likelihood(jax.random.key(0), VP, GMM2D_SCORE, x, max_steps=3)
  # inside jit the failure is a NaN and success=False, not a silent number
  solve = jax.jit(lambda k, y: lk.log_likelihood(k, VP, GMM2D_SCORE, y, max_steps=3))
  logp, info = solve(jax.random.key(0), x)
  assert not bool(info["success"]) and np.all(np.isnan(np.asarray(logp)))


# --------------------------------------------------------------------------------------
# End to end: train the tiny config, evaluate, and run_sample.py --mode=likelihood
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_run):
  return tiny_run


def test_evaluate_likelihood_end_to_end(trained):
  from jaxdiff import evaluate

  config, workdir = trained
  ode = evaluate.evaluate_likelihood(config, workdir, method="ode", num_examples=8, rtol=1e-3, atol=1e-3)
  vlb = evaluate.evaluate_likelihood(config, workdir, method="vlb", num_examples=8, vlb_timesteps=3)
  for r in (ode, vlb):
    with open(r["path"]) as f:
      saved = json.load(f)
    assert saved["n"] == 8 and saved["checkpoint_step"] == 2 and math.isfinite(saved["bpd"])
    assert math.isfinite(saved["stderr"]) and saved["stderr"] > 0 and saved["wall_s"] > 0
    assert 1.0 < saved["bpd"] < 30.0  # an untrained model: far from good, but a sane number
  assert os.path.basename(ode["path"]) == "likelihood_ode_step2.json" and ode["nfe_mean"] > 6
  assert os.path.basename(vlb["path"]) == "likelihood_vlb_step2.json" and vlb["nfe_mean"] == 4


def test_run_sample_likelihood_mode(trained, tmp_path):
  _, workdir = trained
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run_sample.py"), "--workdir", workdir, "--mode", "likelihood",
       "--num_examples", "5", "--rtol", "1e-3", "--atol", "1e-3", "--out_dir", str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "5/5 examples" in proc.stderr and "bits/dim" in proc.stderr
  with open(tmp_path / "likelihood_ode_step2.json") as f:
    saved = json.load(f)
  assert saved["n"] == 5 and saved["batch_size"] == 8 and math.isfinite(saved["bpd"])
