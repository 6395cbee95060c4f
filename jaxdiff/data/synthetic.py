"""Embedded datasets the package draws itself: nothing to download.

* `shapes`: coloured discs, squares and triangles on a dark background, anti-aliased, at
  any resolution (the quickstart uses 16x16x3). Labels are the shape (0 disc, 1 square,
  2 triangle). Easy for a small U-Net to learn in a few CPU minutes, and easy to judge by
  eye: a good sample is one clean, single-coloured shape.
* `gmm2d`: a 2-D mixture of 8 Gaussians on a circle (points, not images) for the MLP
  score network, with its exact density (`GaussianMixture`) for likelihood checks.

Everything is a deterministic function of `seed`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHAPE_NAMES = ("disc", "square", "triangle")
# Saturated colours, well separated in RGB.
PALETTE = np.array([
    [230, 60, 60], [60, 200, 80], [70, 110, 240], [240, 200, 50], [200, 80, 220], [60, 210, 220],
], dtype=np.float32) / 255.0
BACKGROUND = np.array([0.08, 0.08, 0.10], np.float32)


def shapes(num_examples: int, resolution: int = 16, num_channels: int = 3, seed: int = 0,
           supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Draws `num_examples` images `uint8 [N, R, R, C]` and labels `int32 [N]`.

  Each image holds one shape of random kind, colour, size (30-60% of the side) and
  position (fully inside the frame), rendered at `supersample`x and box-filtered.
  With `num_channels=1` the image is the shape's luminance.
  """
  if num_channels not in (1, 3):
    raise ValueError(f"num_channels={num_channels} must be 1 or 3 for the shapes dataset.")
  rng = np.random.default_rng(seed)
  n, r, ss = num_examples, resolution, supersample
  kind = rng.integers(0, len(SHAPE_NAMES), n)
  colour = PALETTE[rng.integers(0, len(PALETTE), n)]
  size = rng.uniform(0.30, 0.60, n)  # half-extent is size/2 of the frame
  half = size / 2
  cx = rng.uniform(half + 0.04, 1 - half - 0.04)
  cy = rng.uniform(half + 0.04, 1 - half - 0.04)
  angle = rng.uniform(0, 2 * np.pi, n)

  g = (np.arange(r * ss, dtype=np.float32) + 0.5) / (r * ss)
  yy, xx = np.meshgrid(g, g, indexing="ij")
  out = np.empty((n, r, r, num_channels), np.uint8)
  chunk = 512
  for lo in range(0, n, chunk):
    sl = slice(lo, min(lo + chunk, n))
    dx = xx[None] - cx[sl, None, None]
    dy = yy[None] - cy[sl, None, None]
    h = half[sl, None, None]
    k = kind[sl, None, None]
    disc = dx**2 + dy**2 <= h**2
    square = (np.abs(dx) <= 0.85 * h) & (np.abs(dy) <= 0.85 * h)
    # Triangle: intersection of three half-planes, rotated by `angle`.
    tri = np.ones_like(disc)
    for j in range(3):
      a = angle[sl, None, None] + 2 * np.pi * j / 3
      tri &= (dx * np.cos(a) + dy * np.sin(a)) <= 0.5 * h
    mask = np.where(k == 0, disc, np.where(k == 1, square, tri)).astype(np.float32)
    cov = mask.reshape(-1, r, ss, r, ss).mean(axis=(2, 4))[..., None]  # coverage [b, r, r, 1]
    img = (1 - cov) * BACKGROUND + cov * colour[sl, None, None, :]
    if num_channels == 1:
      img = img @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    out[sl] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
  return out, kind.astype(np.int32)


class GaussianMixture:
  """An isotropic Gaussian mixture in d dimensions with exact density and scores.

  Under any Gaussian process `x_t = alpha x_0 + sigma eps` the marginal stays a mixture with
  means `alpha mu_k` and variances `alpha^2 s_k^2 + sigma^2`, so `score(x, alpha, sigma)` and
  `log_prob` are exact at every time; the tests use this as an oracle.
  """

  def __init__(self, means, stds, weights=None):
    self.means = np.asarray(means, np.float64)  # [K, d]
    k = self.means.shape[0]
    self.stds = np.broadcast_to(np.asarray(stds, np.float64), (k,)).copy()  # [K]
    w = np.ones(k) / k if weights is None else np.asarray(weights, np.float64)
    self.weights = w / w.sum()

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(self.weights), size=n, p=self.weights)
    x = self.means[comp] + self.stds[comp, None] * rng.standard_normal((n, self.dim))
    return x.astype(np.float32), comp.astype(np.int32)

  def _components(self, x, alpha, sigma):
    """Per-component log N(x; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) + log w_k, `[B, K]`."""
    mu = jnp.asarray(self.means, jnp.float32)
    s = jnp.asarray(self.stds, jnp.float32)
    logw = jnp.asarray(np.log(self.weights), jnp.float32)
    alpha = jnp.reshape(jnp.asarray(alpha, jnp.float32), (-1, 1))
    sigma = jnp.reshape(jnp.asarray(sigma, jnp.float32), (-1, 1))
    var = alpha**2 * s[None, :] ** 2 + sigma**2  # [B or 1, K]
    diff = x[:, None, :] - alpha[:, :, None] * mu[None]  # [B, K, d]
    d = x.shape[-1]
    return -0.5 * jnp.sum(diff**2, -1) / var - 0.5 * d * jnp.log(2 * jnp.pi * var) + logw[None]

  def log_prob(self, x, alpha=1.0, sigma=0.0):
    """log p_t(x) of the noised mixture, `x: [B, d]`, alpha/sigma scalars or `[B]`."""
    return jax.scipy.special.logsumexp(self._components(x, alpha, sigma), axis=-1)

  def score(self, x, alpha=1.0, sigma=0.0):
    """grad_x log p_t(x), exact, `[B, d]`."""
    return jax.grad(lambda y: jnp.sum(self.log_prob(y, alpha, sigma)))(x)

  def posterior_weights(self, x, alpha=1.0, sigma=0.0):
    """p(component k | x_t), `[B, K]`."""
    return jax.nn.softmax(self._components(x, alpha, sigma), axis=-1)


def gmm2d(num_components: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
  """The classic 2-D toy: `num_components` Gaussians evenly spaced on a circle."""
  ang = 2 * np.pi * np.arange(num_components) / num_components
  means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
  return GaussianMixture(means, std)
