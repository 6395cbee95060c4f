"""Inpainting, colorization, SDEdit and super-resolution (jaxdiff.tasks) against closed forms.

The oracle is a Gaussian, whose noised marginal and score are exact at every t of every
process, and whose conditional given some coordinates (or a linear map of them: the grey
level) is closed form. One jitted function per check keeps the file fast on a small CPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, load_config
from jaxdiff import processes as P
from jaxdiff import generate, sample, samplers, sharding, tasks, train
from jaxdiff.errors import ConfigError, InputError


class Gaussian:
  """N(mu, S) over vectors or images (flattened), with its exact score under any process."""

  def __init__(self, mu, cov, shape):
    self.mu, self.cov, self.shape = np.asarray(mu, np.float64), np.asarray(cov, np.float64), tuple(shape)
    self.evals, self.evecs = np.linalg.eigh(self.cov)

  def score_fn(self, process):
    evecs, evals = jnp.asarray(self.evecs, jnp.float32), jnp.asarray(self.evals, jnp.float32)
    mu = jnp.asarray(self.mu, jnp.float32)

    def score(x, t):
      a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
      z = (x.reshape(x.shape[0], -1) - a * mu) @ evecs
      return (-(z / (a * a * evals + s * s)) @ evecs.T).reshape(x.shape)

    return score

  def conditional(self, a_known: np.ndarray, value: np.ndarray, a_free: np.ndarray):
    """Mean and covariance of `a_free @ x` given `a_known @ x = value` (rows orthonormal)."""
    s_ff = a_free @ self.cov @ a_free.T
    s_fk = a_free @ self.cov @ a_known.T
    s_kk = a_known @ self.cov @ a_known.T
    mean = a_free @ self.mu + s_fk @ np.linalg.solve(s_kk, value - a_known @ self.mu)
    return mean, s_ff - s_fk @ np.linalg.solve(s_kk, s_fk.T)


def factor_gaussian(d=16, seed=0):
  """A 16-D Gaussian with two strong factors: every coordinate tells about every other."""
  loads = np.stack([np.ones(d), np.linspace(-1.0, 1.0, d)], axis=1)
  return Gaussian(np.linspace(-0.5, 0.5, d), 0.5 * loads @ loads.T + 0.05 * np.eye(d), (d,))


GAUSS = factor_gaussian()
KNOWN = np.zeros(16, bool)
KNOWN[np.random.default_rng(0).permutation(16)[:12]] = True
Y = np.random.default_rng(1).multivariate_normal(GAUSS.mu, GAUSS.cov)  # the observed vector
N = 4000


def conditional_of_free():
  eye = np.eye(16)
  return GAUSS.conditional(eye[KNOWN], Y[KNOWN], eye[~KNOWN])


def check_fill(x, name, mean, cov, *, cov_tol=0.1):
  """Sample mean within 4 standard errors (+0.01) and covariance within 10% (Frobenius)."""
  assert np.all(np.isfinite(x)), name
  se = np.sqrt(np.diag(cov) / len(x))
  err = np.abs(x.mean(0) - mean)
  assert np.all(err < 4 * se + 0.01), f"{name}: mean {x.mean(0)} vs {mean} (4 SE {4 * se})"
  rel = np.linalg.norm(np.cov(x.T) - cov) / np.linalg.norm(cov)
  assert rel < cov_tol, f"{name}: covariance off by {rel:.3f} (relative Frobenius)"


# --------------------------------------------------------------------------------------
# The sampler hook and inpainting
# --------------------------------------------------------------------------------------

ALL_METHODS = {  # every method, cheap settings (VE: ald needs alpha = 1)
    "ancestral": {}, "ddim": {"eta": 0.5}, "euler_maruyama": {}, "reverse_diffusion": {},
    "pc": {"n_corrector_steps": 1}, "ald": {"n_steps_each": 2}, "euler": {}, "heun": {"s_churn": 1.0},
    "dpm_solver++": {"order": 3}, "ode": {"rtol": 1e-3, "atol": 1e-3}, "consistency": {},
}


def test_project_hook_runs_after_every_update_of_every_method():
  """For all methods the hook is applied after the last update (at ts[-1]) and what it writes
  is in the output; an identity hook changes nothing (the methods' own random draws are
  untouched); inpainting keeps the known coordinates bit for bit."""
  proc, n = P.VE(), 16
  score = GAUSS.score_fn(proc)
  y = jnp.asarray(Y, jnp.float32)
  free = int(np.flatnonzero(~KNOWN)[0])
  ts = jnp.asarray([1.0, 0.5, 0.2, 0.05], jnp.float32)

  def hook(x, t, key):  # the known coordinates := y exactly, one free coordinate := t
    del key
    return jnp.where(jnp.asarray(KNOWN), y, x).at[:, free].set(t)

  @jax.jit
  def run(key):
    out = {}
    for m, o in ALL_METHODS.items():
      kw = dict(method=m, ts=ts, **o)
      out[m] = {"hooked": sample(key, proc, score, (n, 16), project=hook, denoise=False, **kw)[0]}
      if m in ("pc", "dpm_solver++"):  # inner Langevin loop, multistep carry
        out[m]["plain"] = sample(key, proc, score, (n, 16), **kw)[0]
        out[m]["ident"] = sample(key, proc, score, (n, 16), project=lambda x, t, k: x, **kw)[0]
      if m in ("ald", "ode"):
        image = jnp.where(jnp.asarray(KNOWN), y, 0.0)[None].repeat(n, 0)
        out[m]["filled"] = tasks.inpaint(key, proc, score, image, KNOWN.astype(np.float32), **kw)[0]
    return out

  for m, r in jax.device_get(run(jax.random.key(0))).items():
    np.testing.assert_array_equal(r["hooked"][:, KNOWN], np.broadcast_to(Y[KNOWN].astype(np.float32), (n, 12)),
                                  err_msg=m)
    np.testing.assert_allclose(r["hooked"][:, free], 0.05, rtol=1e-6, err_msg=m)
    if "plain" in r:
      np.testing.assert_array_equal(r["ident"], r["plain"], err_msg=m)
    if "filled" in r:
      np.testing.assert_array_equal(r["filled"][:, KNOWN], r["hooked"][:, KNOWN], err_msg=m)
      assert np.all(np.isfinite(r["filled"])) and np.std(r["filled"][:, ~KNOWN], axis=0).min() > 0.05, m


@pytest.mark.parametrize("process,method,steps", [
    ("vp", "heun", 30), ("ddpm", "dpm_solver++", 20)])
def test_tweedie_inpainting_matches_the_gaussian_conditional(process, method, steps):
  """conditioning='tweedie' samples the closed-form conditional of the free coordinates."""
  proc = {"vp": P.VP(), "ddpm": P.DDPM.linear(1000)}[process]
  image = jnp.asarray(np.where(KNOWN, Y, 0.0), jnp.float32)[None].repeat(N, 0)
  fn = jax.jit(lambda key: tasks.inpaint(key, proc, GAUSS.score_fn(proc), image, KNOWN.astype(np.float32),
                                         method=method, num_steps=steps, conditioning="tweedie")[0])
  x = np.asarray(fn(jax.random.key(2)))
  np.testing.assert_array_equal(x[:, KNOWN], np.asarray(image)[:, KNOWN])
  mean, cov = conditional_of_free()
  check_fill(x[:, ~KNOWN], f"{process}/{method}", mean, cov)


def test_tweedie_conditions_on_noisy_known_values():
  """obs_noise=s: the known values are measurements y = A x0 + s n, so every coordinate is drawn
  from the closed-form posterior N(mu + S A^T (A S A^T + s^2 I)^-1 (y - A mu), S - S A^T (...)^-1 A S),
  the known ones too (not pasted back): inpainting, and colorization of noisy grey levels."""
  def posterior(g, a, y, var):
    gain = g.cov @ a.T @ np.linalg.inv(a @ g.cov @ a.T + var * np.eye(len(a)))
    return g.mu + gain @ (y - a @ g.mu), g.cov - gain @ a @ g.cov

  proc, s = P.VP(), 0.3
  image = jnp.asarray(np.where(KNOWN, Y, 0.0), jnp.float32)[None].repeat(N, 0)
  fn = jax.jit(lambda key: tasks.inpaint(key, proc, GAUSS.score_fn(proc), image, KNOWN.astype(np.float32),
                                         method="heun", num_steps=30, conditioning="tweedie", obs_noise=s)[0])
  x = np.asarray(fn(jax.random.key(2)))
  mean, cov = posterior(GAUSS, np.eye(16)[KNOWN], Y[KNOWN], s**2)
  check_fill(x, "inpaint/obs_noise", mean, cov)
  assert np.all(x[:, KNOWN].std(0) > 0.05)  # measured, not pasted

  rng = np.random.default_rng(4)  # test_colorization_keeps_the_grey_level's Gaussian
  a = rng.standard_normal((12, 12))
  img = Gaussian(0.3 * rng.standard_normal(12), a @ a.T / 12 + 0.05 * np.eye(12), (2, 2, 3))
  gray = rng.multivariate_normal(img.mu, img.cov).reshape(2, 2, 3).mean(-1, keepdims=True) + 0.1
  fn = jax.jit(lambda key: tasks.colorize(key, proc, img.score_fn(proc), jnp.asarray(gray, jnp.float32)[None]
                                          .repeat(N, 0), method="heun", num_steps=30, conditioning="tweedie",
                                          obs_noise=s)[0])
  grey_rows = np.kron(np.eye(4), tasks.COLOR_MATRIX.astype(np.float64))[0::3]  # sqrt(3) x the grey level
  mean, cov = posterior(img, grey_rows, np.sqrt(3.0) * gray.reshape(-1), 3.0 * s**2)
  check_fill(np.asarray(fn(jax.random.key(5))).reshape(N, -1), "colorize/obs_noise", mean, cov)
  for kw, match in ((dict(obs_noise=0.1), "conditioning='replace' imposes exactly"),
                    (dict(obs_noise=-1.0, conditioning="tweedie"), "obs_noise=-1.0 must be a number >= 0")):
    with pytest.raises(InputError, match=re.escape(match)):
      tasks.inpaint(jax.random.key(0), proc, GAUSS.score_fn(proc), image[:2], KNOWN.astype(np.float32),
                    method="ddim", num_steps=2, **kw)


def test_tweedie_clips_after_conditioning():
  """clip_range clips the conditional score's denoised estimate, so the Tweedie term keeps the
  network's own Jacobian. Known values near the data range's edge (MNIST's background at -1)
  saturate a clipped x0_hat there; a score clipped before the conditioning then has a
  near-singular covariance (measured: |x| ~ 2e5 on this Gaussian, fills of 1e3-1e4 on MNIST)."""
  proc = P.VP()
  g = Gaussian(0.3 * GAUSS.mu - 0.6, 0.1 * GAUSS.cov, (16,))
  y = np.clip(np.random.default_rng(1).multivariate_normal(g.mu, g.cov), -1.0, 1.0)  # known: -0.97..-0.42
  eye = np.eye(16)
  mean, _ = g.conditional(eye[KNOWN], y[KNOWN], eye[~KNOWN])
  image = jnp.asarray(np.where(KNOWN, y, 0.0), jnp.float32)[None].repeat(N, 0)
  fn = jax.jit(lambda key: tasks.inpaint(key, proc, g.score_fn(proc), image, KNOWN.astype(np.float32),
                                         method="heun", num_steps=30, conditioning="tweedie",
                                         clip_range=(-1.0, 1.0))[0])
  x = np.asarray(fn(jax.random.key(2)))
  assert np.all(np.abs(x) <= 1.0)
  np.testing.assert_array_equal(x[:, KNOWN], np.asarray(image)[:, KNOWN])
  np.testing.assert_allclose(x[:, ~KNOWN].mean(0), mean, atol=0.05)  # measured: 0.014 off (clipped tails)


def test_replacement_conditions_on_the_known_pixels_but_approximately():
  """conditioning='replace' (score_sde) pulls the fill from the prior towards the conditional.

  It is not the exact conditional: on this Gaussian its means miss by ~20 standard errors
  (measured; the README gives the numbers). The test pins what it does guarantee: the fill
  is far closer to the conditional than the unconditional distribution is.
  """
  proc = P.VP()
  image = jnp.asarray(np.where(KNOWN, Y, 0.0), jnp.float32)[None].repeat(N, 0)
  fn = jax.jit(lambda key: tasks.inpaint(key, proc, GAUSS.score_fn(proc), image, KNOWN.astype(np.float32),
                                         method="euler_maruyama", num_steps=200)[0])
  x = np.asarray(fn(jax.random.key(3)))[:, ~KNOWN]
  mean, cov = conditional_of_free()
  prior_mean, prior_sd = GAUSS.mu[~KNOWN], np.sqrt(np.diag(GAUSS.cov)[~KNOWN])
  assert np.linalg.norm(x.mean(0) - mean) < 0.3 * np.linalg.norm(prior_mean - mean)
  assert np.all(x.std(0) < 0.6 * prior_sd)  # much narrower than the prior, as the conditional


def test_repaint_resampling_reaches_the_conditional_mean():
  """RePaint's resampling (noise back up, step down again) lets the fill harmonize with the known
  part: on the Gaussian where plain replacement misses the conditional means by ~23 standard
  errors, 4 extra passes per step bring them within 4 (measured: 2.5); the same for a multistep
  and an adaptive sampler."""
  np.testing.assert_array_equal(samplers.resample_path(7, 3, 2),
                                [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6])
  np.testing.assert_array_equal(samplers.resample_path(5, 1, 3), np.arange(5))
  proc = P.VP()
  image = jnp.asarray(np.where(KNOWN, Y, 0.0), jnp.float32)[None].repeat(N, 0)
  fill = lambda key, r: tasks.inpaint(key, proc, GAUSS.score_fn(proc), image, KNOWN.astype(np.float32),  # noqa: E731
                                      method="ancestral", num_steps=50, resample=r)
  (plain, info1), (resampled, info5) = jax.jit(lambda key: (fill(key, 1), fill(key, 5)))(jax.random.key(3))
  assert (info1["nfe"], info5["nfe"]) == (50, 50 + 4 * 49)
  mean, cov = conditional_of_free()
  se = np.sqrt(np.diag(cov) / N)
  err = lambda x: np.max(np.abs(np.asarray(x)[:, ~KNOWN].mean(0) - mean) / se)  # noqa: E731
  assert err(plain) > 10.0 and err(resampled) < 4.0, (err(plain), err(resampled))
  np.testing.assert_array_equal(np.asarray(resampled)[:, KNOWN], np.asarray(image)[:, KNOWN])
  # a multistep method restarts its history after each jump; `ode` integrates adaptively between grid times
  # (measured: dpm_solver++ 43 -> 5.6 standard errors, ode 56 -> 12)
  for method, steps in (("dpm_solver++", 20), ("ode", 10)):
    fill = lambda key, r: tasks.inpaint(key, proc, GAUSS.score_fn(proc), image, KNOWN.astype(np.float32),  # noqa: E731
                                        method=method, num_steps=steps, resample=r)
    (plain, info1), (resampled, info5) = jax.jit(lambda key: (fill(key, 1), fill(key, 5)))(jax.random.key(3))
    assert err(plain) > 30.0 and err(resampled) < 0.3 * err(plain), (method, err(plain), err(resampled))
    np.testing.assert_array_equal(np.asarray(resampled)[:, KNOWN], np.asarray(image)[:, KNOWN])
    if method == "ode":
      assert int(info5["nfe"]) > 4 * int(info1["nfe"]) and int(info5["num_steps"]) > 4 * int(info1["num_steps"])
    else:
      assert (info1["nfe"], info5["nfe"]) == (20, 20 + 4 * 19)
  with pytest.raises(InputError, match=re.escape("sample(method='ode', resample=2) jumps back up a grid of times; "
                                                 "pass num_steps=<int >= 2>")):
    sample(jax.random.key(0), proc, GAUSS.score_fn(proc), (2, 16), method="ode", resample=2)
  with pytest.raises(InputError, match=r"jump_length=0 must be an integer >= 1"):
    sample(jax.random.key(0), proc, GAUSS.score_fn(proc), (2, 16), method="ddim", num_steps=4, jump_length=0)


def mixture_score_fn(process, weights, means, stds):
  """The exact score of a mixture of diagonal Gaussians N(means[k], diag(stds[k]^2)) at time t."""
  w, mu, sd = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

  def score(x, t):
    a, s = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
    var = a * a * sd[None] ** 2 + s * s                        # [B, K, d]
    diff = x[:, None, :] - a * mu[None]
    logp = jnp.log(w)[None] - 0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
    resp = jax.nn.softmax(logp, axis=-1)                       # [B, K]
    return jnp.sum(resp[..., None] * (-diff / var), axis=1)

  return score


@pytest.mark.parametrize("conditioning", ["replace", "tweedie"])
def test_inpainting_a_mixture_fills_from_its_bimodal_conditional(conditioning):
  """Two modes in the free coordinate: the fill must reproduce both, with the right weights.

  The mixture 0.3 N((0, -1.5), diag(1, 0.3^2)) + 0.7 N((0, 1.5), diag(1, 0.3^2)) has its
  known coordinate x1 distributed alike in both components, so the closed-form conditional
  of x2 given x1 = 0.8 is the mixture's x2 marginal: modes at -1.5 and 1.5 weighted 0.3 and
  0.7. A sampler that collapsed onto one mode or lost the weights fails here.
  """
  proc, n = P.VP(), 4000
  score = mixture_score_fn(proc, [0.3, 0.7], [[0.0, -1.5], [0.0, 1.5]], [[1.0, 0.3], [1.0, 0.3]])
  image = jnp.zeros((n, 2)).at[:, 0].set(0.8)
  mask = jnp.asarray([1.0, 0.0])
  x = np.asarray(jax.jit(lambda key: tasks.inpaint(key, proc, score, image, mask, method="dpm_solver++",
                                                   num_steps=25, conditioning=conditioning)[0])(jax.random.key(4)))
  np.testing.assert_array_equal(x[:, 0], np.float32(0.8))
  upper = x[:, 1] > 0
  frac_se = math.sqrt(0.7 * 0.3 / n)
  assert abs(upper.mean() - 0.7) < 4 * frac_se, upper.mean()
  for sel, mode in ((upper, 1.5), (~upper, -1.5)):
    assert abs(x[sel, 1].mean() - mode) < 4 * 0.3 / math.sqrt(sel.sum()) + 0.02, (mode, x[sel, 1].mean())
    assert abs(x[sel, 1].std() / 0.3 - 1.0) < 0.1, (mode, x[sel, 1].std())


def test_masks_and_outpainting_canvas():
  image = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(InputError, match=r"mask has shape \(2, 7, 8, 1\).*\(2, 8, 8, 3\)"):
    tasks.inpaint(jax.random.key(0), P.VP(), lambda x, t: -x, image, jnp.ones((2, 7, 8, 1)), method="ddim",
                  num_steps=2)
  with pytest.raises(InputError, match="conditioning='exact' is not known"):
    tasks.inpaint(jax.random.key(0), P.VP(), lambda x, t: -x, image, jnp.ones((8, 8, 1)), method="ddim",
                  num_steps=2, conditioning="exact")
  canvas, mask = tasks.place_on_canvas(jnp.ones((1, 4, 6, 1)), (8, 8))
  assert canvas.shape == (1, 8, 8, 1) and float(mask.sum()) == 24.0
  np.testing.assert_array_equal(np.asarray(mask[0, 2:6, 1:7, 0]), 1.0)
  np.testing.assert_array_equal(np.asarray(canvas * (1 - mask)), 0.0)
  with pytest.raises(InputError, match="does not fit a 8x8 canvas"):
    tasks.place_on_canvas(jnp.ones((1, 4, 4, 1)), (8, 8), offset=(6, 0))


def test_latent_mask_and_fill_read_only_known_pixels():
  """A latent cell is known only if every pixel of its f x f block is (min-pool); the hole's
  stand-in is each image's mean known value per channel."""
  m = np.ones((1, 4, 6, 2), np.float32)
  m[0, 1, 3, 1] = 0.0  # one channel of one pixel in block (0, 1)
  m[0, 3, 0, :] = 0.5  # soft, in block (1, 0)
  np.testing.assert_array_equal(np.asarray(tasks.latent_mask(m, 2))[0, ..., 0], [[1, 0, 1], [0.5, 1, 1]])
  with pytest.raises(InputError, match=r"a 4x6 mask does not tile into the autoencoder's 4x4 blocks"):
    tasks.latent_mask(m, 4)
  x = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1)
  mask = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])[None, :, :, None]  # left column known
  filled = np.asarray(tasks.fill_unknown(x, mask))
  np.testing.assert_array_equal(filled[:, :, 0], np.asarray(x)[:, :, 0])
  np.testing.assert_array_equal(filled[:, :, 1, 0], [[1.0, 1.0], [5.0, 5.0]])  # means of (0, 2) and (4, 6)
  np.testing.assert_array_equal(np.asarray(tasks.fill_unknown(x, mask, fill=-1.0))[:, :, 1], -1.0)


# --------------------------------------------------------------------------------------
# Colorization
# --------------------------------------------------------------------------------------


def test_color_matrix_is_orthogonal_with_the_grey_axis_first():
  m = tasks.COLOR_MATRIX.astype(np.float64)
  np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-7)
  np.testing.assert_allclose(m[0], np.full(3, 1 / math.sqrt(3)), atol=1e-7)
  rgb = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  np.testing.assert_allclose(tasks.couple(tasks.decouple(rgb)), rgb, atol=1e-6)
  np.testing.assert_allclose(tasks.decouple(rgb)[..., 0], math.sqrt(3) * rgb.mean(-1), atol=1e-6)


@pytest.mark.parametrize("conditioning", ["replace", "tweedie"])
def test_colorization_keeps_the_grey_level(conditioning):
  """The output's grey coordinate equals the input's; with 'tweedie' the colours follow the
  closed-form conditional of a Gaussian over 2x2 RGB images given the grey levels."""
  rng = np.random.default_rng(4)
  a = rng.standard_normal((12, 12))
  img = Gaussian(0.3 * rng.standard_normal(12), a @ a.T / 12 + 0.05 * np.eye(12), (2, 2, 3))
  proc, n = P.VP(), N
  truth = rng.multivariate_normal(img.mu, img.cov).reshape(2, 2, 3)
  gray = jnp.asarray(truth.mean(-1, keepdims=True), jnp.float32)[None].repeat(n, 0)
  fn = jax.jit(lambda key: tasks.colorize(key, proc, img.score_fn(proc), gray, method="heun", num_steps=30,
                                          conditioning=conditioning)[0])
  x = np.asarray(fn(jax.random.key(5)))
  assert x.shape == (n, 2, 2, 3)
  np.testing.assert_allclose(x.mean(-1), np.asarray(gray)[..., 0], atol=2e-6)
  if conditioning == "tweedie":  # the free (colour) coordinates: closed-form conditional
    q = np.kron(np.eye(4), tasks.COLOR_MATRIX.astype(np.float64))  # per-pixel decoupling, [12, 12]
    grey_rows, colour_rows = q[0::3], np.concatenate([q[1::3], q[2::3]])
    mean, cov = img.conditional(grey_rows, grey_rows @ truth.reshape(-1), colour_rows)
    check_fill(x.reshape(n, -1) @ colour_rows.T, "colorize/tweedie", mean, cov)
  else:
    assert np.std(x.reshape(n, -1), axis=0).min() > 0.01  # colours are drawn, not fixed


# --------------------------------------------------------------------------------------
# SDEdit
# --------------------------------------------------------------------------------------


def test_sdedit_strength_to_start_time_and_grid():
  assert tasks.sdedit_start_time(P.VP(), 0.3) == pytest.approx(0.3)
  assert tasks.sdedit_start_time(P.DDPM.linear(1000), 0.5) == pytest.approx(500.0)
  assert tasks.sdedit_start_time(P.EDM(), 0.5) == pytest.approx(40.0)
  assert tasks.sdedit_start_time(P.VP(), 1e-6) == pytest.approx(P.VP().t_min)  # clamped at t_min
  full = np.asarray(samplers.default_grid(P.VP(), "ddim", 10))
  np.testing.assert_array_equal(np.asarray(tasks.sdedit_grid(P.VP(), 1.0, method="ddim", num_steps=10)), full)
  ts = np.asarray(tasks.sdedit_grid(P.VP(), 0.5, method="ddim", num_steps=10))
  assert ts[0] == pytest.approx(0.5) and np.all(np.diff(ts) < 0)
  np.testing.assert_array_equal(ts[1:], full[full < 0.5].astype(np.float32))  # the method's own grid below t0
  np.testing.assert_allclose(np.asarray(tasks.sdedit_grid(P.VP(), 0.5, method="ode")), [0.5, 1e-3], rtol=1e-6)
  for bad in (0.0, 1.5, -0.1, "0.5", True):
    with pytest.raises(InputError, match="strength=.* must be a number in \\(0, 1\\]"):
      tasks.check_strength(bad)


def test_sdedit_small_strength_keeps_the_input_and_full_strength_is_sampling():
  proc, n = P.VP(), 256
  score = GAUSS.score_fn(proc)
  image = jnp.asarray(Y, jnp.float32)[None].repeat(n, 0)

  @jax.jit
  def run(key):
    out = {}
    for m, steps in (("ddim", 20), ("euler_maruyama", 20), ("ode", None)):
      small = tasks.sdedit(key, proc, score, image, 0.005, method=m, num_steps=steps)[0]
      mid = tasks.sdedit(key, proc, score, image, 0.6, method=m, num_steps=steps)[0]
      full = tasks.sdedit(key, proc, score, image, 1.0, method=m, num_steps=steps)[0]
      plain = sample(key, proc, score, (n, 16), method=m, num_steps=steps)[0]
      out[m] = (small, mid, full, plain)
    return out

  for m, (small, mid, full, plain) in jax.device_get(run(jax.random.key(6))).items():
    d_small, d_mid = np.abs(small - Y).mean(), np.abs(mid - Y).mean()
    assert d_small < 0.05 and d_mid > 5 * d_small, (m, d_small, d_mid)
    # same key: unconditional sampling (same draws and grid; equal up to float32 rounding)
    np.testing.assert_allclose(full, plain, rtol=1e-5, atol=1e-6, err_msg=m)


# --------------------------------------------------------------------------------------
# Super-resolution
# --------------------------------------------------------------------------------------


def test_downsample_upsample_and_network_input():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  low = tasks.area_downsample(x, 2)
  np.testing.assert_allclose(low[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  assert tasks.upsample(low, 4).shape == (2, 4, 4, 1)
  assert tasks.network_input(x, low).shape == (2, 4, 4, 2)
  with pytest.raises(InputError, match="not a multiple of size=3"):
    tasks.area_downsample(x, 3)


def test_superres_model_sees_its_low_res_input(runs):
  """The tiny super-resolution run (trained in `runs`): 2C input channels, C outputs, and the
  low-resolution image changes the samples (same key)."""
  from jaxdiff import evaluate

  c = load_config("mnist_superres", "tiny")
  exp = train.build_experiment(c)
  mesh = sharding.create_mesh(c.mesh.to_dict())
  _, params = evaluate.restore_ema_params(c, runs["sr"], exp, mesh)
  assert exp.cond_resolution == 4
  assert params["conv_in"]["kernel"].shape[-2] == 6 and params["conv_out"]["kernel"].shape[-1] == 3
  fn = generate.make_sampler(exp, c, batch_size=8, mesh=mesh)
  key = jax.random.key(7)
  low = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3), minval=-1, maxval=1)
  out_a, nfe = fn(params, key, None, None, low)
  out_b, _ = fn(params, key, None, None, -low)
  assert out_a.shape == (8, 8, 8, 3) and int(nfe) == 4 and np.all(np.isfinite(out_a))
  assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-6  # the conditioning reaches the output
  with pytest.raises(InputError, match="conditioned on 4x4 low-resolution images"):
    fn(params, key)


def test_superres_config_errors():
  c = load_config("mnist_superres", "tiny")
  c.data.cond_resolution = 3
  with pytest.raises(ConfigError, match=r"cond_resolution=3 must be .* divides it.*\[1, 2, 4\]"):
    train.build_experiment(c)


# --------------------------------------------------------------------------------------
# run_sample.py --task on tiny trained runs, and the bad-input errors
# --------------------------------------------------------------------------------------


def rgb_config():
  """configs/tiny.py with a one-level U-Net (fast to compile)."""
  c = load_config("tiny")
  c.model.update(ch_mult=(1,), attn_resolutions=())
  return c


def checkpoint_random(config, workdir: str) -> None:
  """A run directory (config.json + a checkpoint at step 1) of a model with random weights,
  written without compiling anything: the tasks' plumbing does not need a trained model."""
  from jaxdiff import checkpoint as ckpt_lib

  exp = train.build_experiment(config)
  opt = train.make_optimizer(**config.optimizer.to_dict(), num_steps=config.training.num_steps)
  _, abstract, _ = train.abstract_train_state(config, exp, opt, sharding.create_mesh(config.mesh.to_dict()))
  rng = np.random.default_rng(0)

  def leaf(a):
    value = (0.1 * rng.standard_normal(a.shape) if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape))
    return jax.device_put(value.astype(a.dtype), a.sharding)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, jax.tree.map(leaf, abstract))
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny super-resolution model trained by `train_and_evaluate` (4 steps, its final
  super-resolved samples included), a tiny RGB model (random weights), and input files."""
  out = {"sr": str(tmp_path_factory.mktemp("sr")), "rgb": str(tmp_path_factory.mktemp("rgb"))}
  config = load_config("mnist_superres", "tiny")
  config.training.update(num_steps=4, checkpoint_every=4)
  train.train_and_evaluate(config, out["sr"])
  assert os.path.exists(os.path.join(out["sr"], "samples_000004.png"))  # super-resolved last batch
  checkpoint_random(rgb_config(), out["rgb"])
  d = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(d / "rgb8.png")
  Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(d / "gray8.png")
  Image.fromarray(rng.integers(0, 256, (4, 6, 3), np.uint8)).save(d / "rgb4x6.png")
  mask = np.full((8, 8), 255, np.uint8)
  mask[2:6, 2:6] = 0
  Image.fromarray(mask).save(d / "mask8.png")
  Image.fromarray(mask[:7]).save(d / "mask7.png")
  np.savez(d / "many.npz", images=rng.integers(0, 256, (3, 8, 8, 3), np.uint8))
  out["inputs"] = d
  return out


def test_run_sample_task_writes_side_by_side_png(runs, tmp_path):
  d = runs["inputs"]
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run_sample.py"), "--workdir", runs["rgb"], "--task", "inpaint",
       "--input", str(d / "rgb8.png"), "--mask", str(d / "mask8.png"), "--sampler", "ddim", "--steps", "3",
       "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = sorted(os.listdir(tmp_path))
  assert files == ["inpaint_ddim_step1_seed0.npz", "inpaint_ddim_step1_seed0.png"]
  arrays = np.load(tmp_path / files[0])
  assert sorted(arrays.files) == ["input", "mask", "output"]
  src = np.asarray(Image.open(d / "rgb8.png"))
  keep = np.asarray(Image.open(d / "mask8.png")) > 127
  np.testing.assert_array_equal(arrays["output"][0][keep], src[keep])  # known pixels kept exactly
  png = Image.open(tmp_path / files[1])
  assert png.width > 2 * png.height  # three 8x8 panels in one row (plus a title strip)


@pytest.mark.parametrize("task,kw,columns", [
    ("outpaint", dict(input_path="rgb4x6.png", resample=2, conditioning="tweedie", cg_steps=1, obs_noise=0.1),
     ["input", "mask", "output"]),
    ("colorize", dict(input_path="rgb8.png", convert_channels=True, conditioning="tweedie", cg_steps=2),
     ["input", "original", "output"]),
    ("sdedit", dict(input_path="many.npz", strength=0.5), ["input", "output"]),
])
def test_run_task_other_tasks(runs, tmp_path, task, kw, columns):
  kw["input_path"] = str(runs["inputs"] / kw["input_path"])
  r = tasks.run_task(rgb_config(), runs["rgb"], task=task, method="ddim", num_steps=3, out_dir=str(tmp_path),
                     **kw)
  arrays = np.load(r["paths"]["npz"])
  assert sorted(arrays.files) == sorted(columns) and os.path.exists(r["paths"]["png"])
  assert arrays["output"].shape == (r["num_images"], 8, 8, 3)
  if task == "outpaint":  # RePaint: 2 steps down, each redone once (2 more), and the denoising step
    assert r["nfe"] == 5 and r["paths"]["npz"].endswith("_tweedie_n0.1_r2j1.npz")
  if task == "colorize":  # the grey level is kept (up to uint8 rounding, where no channel saturates)
    out, grey_in = arrays["output"].astype(np.float64), arrays["input"][..., 0].astype(np.float64)
    inside = np.all((out > 0) & (out < 255), axis=-1)
    assert inside.sum() >= 8
    np.testing.assert_allclose(out.mean(-1)[inside], grey_in[inside], atol=1.0)


def test_run_task_superres_scores_against_ground_truth(runs, tmp_path):
  c = load_config("mnist_superres", "tiny")
  r = tasks.run_task(c, runs["sr"], task="superres", input_path=str(runs["inputs"] / "many.npz"),
                     method="heun", num_steps=3, out_dir=str(tmp_path))
  arrays = np.load(r["paths"]["npz"])
  assert sorted(arrays.files) == ["bicubic", "input", "output", "truth"]
  assert arrays["input"].shape == (3, 4, 4, 3) and arrays["output"].shape == (3, 8, 8, 3)
  assert np.isfinite(r["psnr"]) and np.isfinite(r["psnr_bicubic"])


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
  d, rgb, sr = runs["inputs"], runs["rgb"], runs["sr"]
  tiny, tiny_sr = rgb_config(), load_config("mnist_superres", "tiny")
  cases = [
      (tiny, rgb, dict(task="inpaint", input_path=d / "rgb8.png", mask_path=d / "mask7.png"),
       r"--mask=.*mask7.png' is 7x8 but the input images are 8x8"),
      (tiny, rgb, dict(task="inpaint", input_path=d / "rgb8.png"), "--task=inpaint needs --mask=PATH"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "gray8.png"),
       r"is grayscale \(1 channel\) but this model takes RGB images.*--convert_channels"),
      (tiny, rgb, dict(task="colorize", input_path=d / "rgb8.png"),
       "is a colour RGB image but --task=colorize takes a grayscale one; pass --convert_channels"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "rgb8.png", strength=1.5),
       r"strength=1.5 must be a number in \(0, 1\]"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "rgb8.png", strength=0.0),
       r"strength=0.0 must be a number in \(0, 1\]"),
      (tiny, rgb, dict(task="superres", input_path=d / "rgb8.png"),
       r"--task=superres needs a model trained with low-resolution conditioning \(config.data.cond_resolution"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "rgb4x6.png"),
       "is 4x6 but the model makes 8x8 images; resize or crop the input to 8x8"),
      (tiny_sr, sr, dict(task="superres", input_path=d / "rgb4x6.png"),
       r"is 4x6; --task=superres takes the model's low-resolution 4x4 images \(or 8x8 ground truth"),
      (tiny_sr, sr, dict(task="inpaint", input_path=d / "rgb8.png", mask_path=d / "mask8.png"),
       "holds a super-resolution model .* it takes --task=superres"),
      (tiny, rgb, dict(task="colorize", input_path=tmp_path / "missing.png"), "missing.png' is not a file"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "rgb8.png", labels=["1"]),
       r"--labels=1 needs a class-conditional model, but .* is unconditional"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "rgb8.png", guidance_scale=2.0),
       r"--guidance_scale=2 needs a class-conditional model"),
      (tiny, rgb, dict(task="sdedit", input_path=d / "rgb8.png", resample=3),
       r"--resample=3 --jump_length=1 \(RePaint's resampling\) applies to inpaint, outpaint and colorize"),
      (tiny, rgb, dict(task="outpaint", input_path=d / "rgb4x6.png", obs_noise=0.1),
       r"--obs_noise=0.1 \(noisy known values\) needs --conditioning=tweedie, not --conditioning=replace"),
  ]
  for config, workdir, kw, pattern in cases:
    kw = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in kw.items()}
    with pytest.raises(InputError, match=pattern):
      tasks.run_task(config, workdir, out_dir=str(tmp_path), **kw)
  with pytest.raises(InputError) as e:  # one line, as the scripts print it
    tasks.run_task(tiny, rgb, task="inpaint", input_path=str(d / "rgb8.png"), mask_path=str(d / "mask7.png"))
  assert "\n" not in str(e.value)
