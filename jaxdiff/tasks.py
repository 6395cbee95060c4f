"""Controlled generation with every sampler: inpainting, outpainting, colorization, SDEdit, super-resolution.

Pure, jittable functions on top of `jaxdiff.sample` (any method, any process):

* `inpaint(key, process, score_fn, image, mask, method=...)`: the known pixels (mask = 1)
  are replaced, after every update of the sampler, by the known image noised to the
  current time, `alpha(t) y + sigma(t) z` (score_sde's `get_pc_inpainter`, RePaint's
  replacement), through `sample(..., project=...)`; the output keeps the known pixels
  exactly. `outpaint` places an image on a larger canvas and inpaints the rest.
* `colorize(key, process, score_fn, gray, method=...)`: the same replacement in score_sde's
  decoupled colour space `z = x @ COLOR_MATRIX.T`, an orthogonal basis whose first vector
  is the normalised average (1, 1, 1) / sqrt(3): the grey level is one coordinate, known,
  and the two others are free.
* `sdedit(key, process, score_fn, image, strength, method=...)`: SDEdit (Meng et al. 2022):
  the image noised to `t0 = strength * T` and the sampler run from t0 on the method's own
  grid (the points below t0).
* Latent diffusion models: `sdedit_images` and `inpaint_images` take the model's
  `train.Experiment` and run SDEdit (Stable Diffusion's img2img) and inpainting in its
  autoencoder's latents: the known part is the encoded image on the latent cells whose
  pixels are all known (`latent_mask`); the decoded result gets the known pixels back.
* `superres(key, process, cond_score_fn, low_res, ...)`: SR3-style super-resolution with a
  network that sees the low-resolution image, upsampled and concatenated to x as extra
  channels (`network_input`); training derives the low-resolution image from the clean
  batch on the device (`area_downsample`, `train.train_step(cond_resolution=...)`).

Two ways to condition on known values (`conditioning=`), both for every sampler:

* `"replace"` (default; one network evaluation per score, as unconditional sampling): the
  unknown values evolve with the joint score at a freshly noised copy of the known ones,
  score_sde's approximation `p_t(x_u | y) ~ p_t(x_u | x_k(t))`. Cheap and standard, but
  not exact: it is exact only for unknown values independent of the known ones, and on a
  correlated Gaussian the fill drifts towards the unconditional distribution (measured in
  `tests/test_tasks.py` and the README: the conditional means are missed by 20-60 standard
  errors on a 16-dimensional Gaussian).
* `"tweedie"`: the score of the conditional, `score + grad_x log p(x0_k = y | x_t)`, with
  `p(x0 | x_t)` replaced by the Gaussian of its first two moments (Tweedie:
  mean `x0_hat`, covariance `sigma^2 / alpha * d x0_hat / d x_t`; Boys et al. 2023, TMPD),
  solved by `cg_steps` conjugate-gradient iterations on the known coordinates. Exact for
  Gaussian data (the test recovers the closed-form conditional with every sampler), an
  approximation for multimodal data; each score costs one forward pass and `cg_steps + 1`
  backward passes (vector-Jacobian products) of the network.

`run_task(config, workdir, task=...)` is the library side of
`run_sample.py --task inpaint|outpaint|colorize|sdedit|superres`: it restores a trained
run, reads the input (PNG, .npy or .npz) and writes input / mask / output side by side.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parameterization, samplers
from jaxdiff.errors import InputError
from jaxdiff.processes import Process, bcast

log = logging.getLogger(__name__)
Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
Project = Callable[[Array, Array, Array], Array]

TASKS = ("inpaint", "outpaint", "colorize", "sdedit", "superres")
LATENT_TASKS = ("inpaint", "outpaint", "sdedit")  # the tasks a latent diffusion model runs (in its latents)
CONDITIONED_TASKS = ("inpaint", "outpaint", "colorize")  # known values to condition on: conditioning=, resample=


# --------------------------------------------------------------------------------------
# Replacement of a known part (inpainting, outpainting, colorization)
# --------------------------------------------------------------------------------------


def _as_mask(mask, image: Array, name: str = "mask") -> Array:
  """`mask` as float32 broadcast to `image`'s shape; an InputError if it cannot be."""
  mask = jnp.asarray(mask)
  try:
    shape = jnp.broadcast_shapes(mask.shape, image.shape)
  except ValueError:
    shape = None
  if shape != tuple(image.shape):
    raise InputError(f"{name} has shape {tuple(mask.shape)}, which does not broadcast to the image's "
                     f"{tuple(image.shape)}; give a mask of the image's height and width, e.g. "
                     f"{tuple(image.shape[1:-1]) + (1,)} (1 = known, 0 = to generate).")
  return jnp.broadcast_to(mask.astype(jnp.float32), image.shape)


def _blend(mask: Array, known: Array, x: Array) -> Array:
  """`mask * known + (1 - mask) * x`, exactly `known` where mask == 1 and `x` where 0."""
  return jnp.where(mask >= 1.0, known, jnp.where(mask <= 0.0, x, mask * known + (1.0 - mask) * x))


def replacement(process: Process, known: Array, mask: Array, *,
                to_space: Callable[[Array], Array] | None = None,
                from_space: Callable[[Array], Array] | None = None) -> Project:
  """The `project(x, t, key)` hook that replaces the known part of x by `known` noised to t.

  Args:
    process: the diffusion process (`alpha`, `sigma`).
    known: the clean known values `[B, ...]`, in the space `to_space` maps to.
    mask: 1 where known, 0 where free (floats in between blend), broadcastable to `known`.
    to_space, from_space: an orthogonal change of basis and its inverse (colorization's
      decoupled colour space); identity by default. Orthogonality keeps the forward noise
      isotropic, so `alpha(t) known + sigma(t) z` is the noised known part in that basis.
  """
  mask = _as_mask(mask, known)
  to_space = to_space or (lambda v: v)
  from_space = from_space or (lambda v: v)

  def project(x: Array, t: Array, key: Array) -> Array:
    tt = jnp.reshape(t, (1,)).astype(jnp.float32)
    a, s = process.alpha(tt)[0], process.sigma(tt)[0]
    noisy = a * known + s * jax.random.normal(key, known.shape, known.dtype)
    return from_space(_blend(mask, noisy, to_space(x)))

  return project


def _bdot(u: Array, v: Array) -> Array:
  return jnp.sum(u * v, axis=tuple(range(1, u.ndim)))


def conjugate_gradient(op: Callable[[Array], Array], b: Array, num_steps: int) -> Array:
  """`num_steps` CG iterations for `op(v) = b`, one independent system per example `[B, ...]`.

  `op` must act on each example separately and be symmetric positive semi-definite; a
  direction with no curvature stops that example's iteration.
  """
  def body(_, state):
    v, r, p, rs = state
    ap = op(p)
    pap = _bdot(p, ap)
    ok = pap > 0
    step = jnp.where(ok, rs / jnp.where(ok, pap, 1.0), 0.0)
    v = v + bcast(step, v) * p
    r = r - bcast(step, r) * ap
    rs_new = _bdot(r, r)
    beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
    return v, r, r + bcast(beta, p) * p, rs_new

  v, *_ = jax.lax.fori_loop(0, int(num_steps), body, (jnp.zeros_like(b), b, b, _bdot(b, b)))
  return v


def tweedie_score_fn(process: Process, score_fn: ScoreFn, known: Array, mask: Array, *, cg_steps: int = 5,
                     obs_noise: float = 0.0, to_space: Callable[[Array], Array] | None = None,
                     from_space: Callable[[Array], Array] | None = None) -> ScoreFn:
  """The score of `p_t(x | y)`, `y = x0_k + obs_noise * n` (n ~ N(0, I); 0: the known values
  exactly), under Tweedie's Gaussian moment projection.

  `grad_x log p_t(x | y) = score(x) + grad_x log p(y | x_t)`; with `p(x0 | x_t)` taken as
  the Gaussian of mean `x0_hat(x)` and covariance `C = sigma^2 / alpha * J`,
  `J = d x0_hat / d x` (Tweedie's second moment; J is symmetric for an exact score), the
  second term is `J^T P^T (C_kk + obs_noise^2 I)^-1 (y - P x0_hat)` with P the restriction
  to the known coordinates (in the basis `to_space`). Exact for Gaussian data. The inverse
  is applied by `cg_steps` conjugate-gradient iterations; every product with J is a
  vector-Jacobian product of one `jax.vjp` of the network (reverse mode only, so custom-VJP
  layers work).
  """
  mask = _as_mask(mask, known)
  to_space = to_space or (lambda v: v)
  from_space = from_space or (lambda v: v)

  def cond_score_fn(x: Array, t: Array) -> Array:
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)

    def x0_hat(x):
      score = score_fn(x, t)
      return (x + s**2 * score) / a, score

    x0, vjp, score = jax.vjp(x0_hat, x, has_aux=True)
    jt = lambda v: vjp(v)[0]  # noqa: E731  J^T v
    residual = mask * (known - to_space(x0))
    cov = lambda v: mask * ((s**2 / a) * to_space(jt(from_space(mask * v))) + obs_noise**2 * v)  # noqa: E731
    w = conjugate_gradient(cov, residual, cg_steps)
    return score + jt(from_space(mask * w))

  return cond_score_fn


CONDITIONINGS = ("replace", "tweedie")


def check_obs_noise(obs_noise) -> float:
  ok = isinstance(obs_noise, (int, float, np.integer, np.floating)) and not isinstance(obs_noise, bool)
  if not ok or not 0.0 <= float(obs_noise) < math.inf:
    raise InputError(f"obs_noise={obs_noise!r} must be a number >= 0 (the standard deviation of the noise on the "
                     f"known values, in model units; 0: they are exact).")
  return float(obs_noise)


def _conditioned(process: Process, score_fn: ScoreFn, known: Array, mask: Array, conditioning: str,
                 cg_steps: int, clip_range: tuple[float, float] | None = None, obs_noise: float = 0.0,
                 to_space=None, from_space=None) -> tuple[ScoreFn, Project | None]:
  """(score_fn, project) for `sample` under the chosen conditioning.

  `clip_range` clips the denoised estimate of the *conditional* score (`clip_denoised` after
  the conditioning): the Tweedie term needs the network's own Jacobian, which clipping inside
  would zero at every saturated pixel, leaving its covariance near-singular (measured on
  MNIST: fills of magnitude 1e3-1e4 instead of pixels in [-1, 1]).
  """
  obs_noise = check_obs_noise(obs_noise)
  if conditioning == "replace" and obs_noise > 0:
    raise InputError(f"obs_noise={obs_noise:g} models noisy known values, which conditioning='replace' imposes "
                     f"exactly; use conditioning='tweedie' (or obs_noise=0).")
  if conditioning == "replace":
    project = replacement(process, known, mask, to_space=to_space, from_space=from_space)
  elif conditioning == "tweedie":
    if not isinstance(cg_steps, (int, np.integer)) or cg_steps < 1:
      raise InputError(f"cg_steps={cg_steps!r} must be an integer >= 1 (conjugate-gradient iterations of "
                       f"conditioning='tweedie'; e.g. 5).")
    score_fn = tweedie_score_fn(process, score_fn, known, mask, cg_steps=int(cg_steps), obs_noise=obs_noise,
                                to_space=to_space, from_space=from_space)
    project = None
  else:
    raise InputError(f"conditioning={conditioning!r} is not known; valid values are: "
                     f"{', '.join(repr(c) for c in CONDITIONINGS)}.")
  if clip_range is not None:
    score_fn = parameterization.clip_denoised(score_fn, process, *clip_range)
  return score_fn, project


def inpaint(key: Array, process: Process, score_fn: ScoreFn, image: Array, mask, *, method: str,
            num_steps: int | None = None, ts: Array | None = None, denoise: bool = True,
            conditioning: str = "replace", cg_steps: int = 5, clip_range: tuple[float, float] | None = None,
            obs_noise: float = 0.0, **options) -> tuple[Array, dict[str, Any]]:
  """Fills the unknown pixels of `image` (mask = 0) with any sampler; keeps the known ones.

  Args:
    key: PRNG key.
    process, score_fn: the model, as for `jaxdiff.sample`.
    image: `[B, ...]` images in model space; only the known pixels are read.
    mask: 1 = known, 0 = generate; any shape broadcastable to `image` (e.g. `[B, H, W, 1]`
      or `[H, W, 1]`); soft values in (0, 1) blend.
    method, num_steps, ts, denoise, **options: as for `jaxdiff.sample`.
    conditioning: "replace" (score_sde / RePaint replacement) or "tweedie" (moment-projected
      conditional score, exact for Gaussian data); see the module docstring.
    cg_steps: conjugate-gradient iterations per score evaluation ("tweedie").
    clip_range: (lo, hi) to clip the conditional model's denoised estimate to (Ho et al.'s
      `clip_denoised`; e.g. (-1, 1) for centred pixels), applied after the conditioning.
      Pass the network's unclipped score: a score clipped before "tweedie" breaks it.
    obs_noise: "tweedie" only: the known pixels are noisy measurements, `image = x0 +
      obs_noise * n` (noisy inpainting / denoising); they are then generated too, as a draw
      from `p(x0 | image)`, and not pasted back.

  Returns:
    (x [image.shape], info): x equals `image` exactly where mask == 1 (if obs_noise is 0).
  """
  image = jnp.asarray(image, jnp.float32)
  mask = _as_mask(mask, image)
  score_fn, project = _conditioned(process, score_fn, image, mask, conditioning, cg_steps, clip_range, obs_noise)
  x, info = samplers.sample(key, process, score_fn, image.shape, method=method, num_steps=num_steps, ts=ts,
                            denoise=denoise, project=project, **options)
  return (_blend(mask, image, x) if obs_noise == 0 else x), info


# Latent diffusion models: the known part in the latents (Blended Latent Diffusion)


def latent_mask(mask: Array, factor: int) -> Array:
  """A pixel mask `[B, H, W, C]` (1 = known) -> the latent grid's `[B, H/f, W/f, 1]`.

  The minimum over each f x f block and the channels: a latent cell is kept only where every
  pixel it codes is known, so every unknown pixel is generated (the hole grows to whole cells).
  """
  mask = jnp.asarray(mask, jnp.float32)
  b, h, w, c = mask.shape
  f = int(factor)
  if h % f or w % f:
    raise InputError(f"a {h}x{w} mask does not tile into the autoencoder's {f}x{f} blocks; use images whose "
                     f"height and width are multiples of {f}.")
  return jnp.min(mask.reshape(b, h // f, f, w // f, f, c), axis=(2, 4, 5))[..., None]


def fill_unknown(image: Array, mask: Array, fill: float | None = None) -> Array:
  """`image` with its unknown pixels (mask 0; soft values blend) set to `fill`, by default each image's
  mean known value per channel: what the encoder of a latent model sees in place of the hole."""
  mask = _as_mask(mask, image)
  if fill is None:
    axes = tuple(range(1, image.ndim - 1))
    fill = jnp.sum(mask * image, axes, keepdims=True) / jnp.maximum(jnp.sum(mask, axes, keepdims=True), 1e-6)
  return _blend(mask, image, jnp.broadcast_to(jnp.asarray(fill, image.dtype), image.shape))


def inpaint_images(key: Array, exp, score_fn: ScoreFn, image: Array, mask, *, vae_params: Any = None,
                   fill: float | None = None, **kw) -> tuple[Array, dict[str, Any]]:
  """`inpaint` with the model of `exp` (a `train.Experiment`; `score_fn` is the model's).

  In pixel space it is `inpaint`. A latent diffusion model (`exp.latent`, its autoencoder's
  `vae_params`) inpaints in its latents, as Blended Latent Diffusion (Avrahami et al. 2023)
  does: the image, its unknown pixels set to `fill` (`fill_unknown`: only known pixels are
  read), is encoded to its posterior mean; the latent cells whose pixels are all known
  (`latent_mask`) are the known part (`conditioning` as for `inpaint`) and the others are
  generated; the result is decoded and the known pixels pasted back, so they are kept
  exactly (the seam lies where the decoder meets them). `info["latents"]` holds the latents.
  There, `obs_noise` ("tweedie") is the noise on the known latents, in latent units: the
  encoding is an estimate of the latents the model would give those pixels; the pixels are
  still pasted back.
  """
  if exp.latent is None:
    return inpaint(key, exp.process, score_fn, image, mask, **kw)
  image = jnp.asarray(image, jnp.float32)
  mask = _as_mask(mask, image)
  known = exp.latent.encode(vae_params, fill_unknown(image, mask, fill))
  z, info = inpaint(key, exp.process, score_fn, known, latent_mask(mask, exp.latent.autoencoder.downsampling_factor),
                    **kw)
  return _blend(mask, image, exp.latent.decode(vae_params, z)), {**info, "latents": z}


def place_on_canvas(image: Array, size: tuple[int, int], offset: tuple[int, int] | None = None,
                    fill: float = 0.0) -> tuple[Array, Array]:
  """`image [B, h, w, C]` placed on a `[B, *size, C]` canvas: returns (canvas, mask [B, H, W, 1]).

  `offset` is the (top, left) corner (default: centred); the mask is 1 on the image.
  """
  image = jnp.asarray(image, jnp.float32)
  b, h, w, c = image.shape
  hh, ww = int(size[0]), int(size[1])
  top, left = offset if offset is not None else ((hh - h) // 2, (ww - w) // 2)
  if not (0 <= top and 0 <= left and top + h <= hh and left + w <= ww):
    raise InputError(f"an image of {h}x{w} at offset (top, left)=({top}, {left}) does not fit a {hh}x{ww} "
                     f"canvas; give a smaller image or an offset with top <= {hh - h}, left <= {ww - w}.")
  canvas = jnp.full((b, hh, ww, c), fill, jnp.float32).at[:, top:top + h, left:left + w].set(image)
  mask = jnp.zeros((b, hh, ww, 1), jnp.float32).at[:, top:top + h, left:left + w].set(1.0)
  return canvas, mask


def outpaint(key: Array, process: Process, score_fn: ScoreFn, image: Array, size: tuple[int, int], *,
             method: str, offset: tuple[int, int] | None = None, **kwargs) -> tuple[Array, dict[str, Any]]:
  """Extends `image [B, h, w, C]` to a `size` canvas: `inpaint` with the image as the known part."""
  canvas, mask = place_on_canvas(image, size, offset)
  return inpaint(key, process, score_fn, canvas, mask, method=method, **kwargs)


# --------------------------------------------------------------------------------------
# Colorization (score_sde's decoupled colour space)
# --------------------------------------------------------------------------------------

# Rows: an orthonormal basis of RGB whose first vector is the normalised average (the grey
# axis); score_sde's `get_pc_colorizer` matrix M is its transpose.
COLOR_MATRIX = np.array([
    [1.0 / math.sqrt(3.0), 1.0 / math.sqrt(3.0), 1.0 / math.sqrt(3.0)],
    [-2.0 / math.sqrt(6.0), 1.0 / math.sqrt(6.0), 1.0 / math.sqrt(6.0)],
    [0.0, 1.0 / math.sqrt(2.0), -1.0 / math.sqrt(2.0)],
], np.float32)


def decouple(x: Array) -> Array:
  """RGB `[..., 3]` -> decoupled coordinates `[..., 3]` (the first is sqrt(3) x the grey level)."""
  return x @ jnp.asarray(COLOR_MATRIX).T


def couple(z: Array) -> Array:
  """The inverse of `decouple` (COLOR_MATRIX is orthogonal)."""
  return z @ jnp.asarray(COLOR_MATRIX)


def to_grayscale(x: Array) -> Array:
  """`[..., C]` -> `[..., 1]`: the channel mean (the grey coordinate / sqrt(3) for RGB)."""
  return jnp.mean(x, axis=-1, keepdims=True)


def colorize(key: Array, process: Process, score_fn: ScoreFn, gray: Array, *, method: str,
             num_steps: int | None = None, ts: Array | None = None, denoise: bool = True,
             conditioning: str = "replace", cg_steps: int = 5, clip_range: tuple[float, float] | None = None,
             obs_noise: float = 0.0, **options) -> tuple[Array, dict[str, Any]]:
  """Colours grey images with an RGB model and any sampler.

  Args:
    gray: `[B, H, W, 1]` grey levels in model space (the channel mean of the RGB image).
    the rest: as for `inpaint`; the known coordinate is the first of the decoupled colour
      space (`decouple`), sqrt(3) x the grey level; `obs_noise` is the noise on `gray`.

  Returns:
    (x [B, H, W, 3], info): RGB images whose channel mean equals `gray` (up to float32
    rounding of the orthogonal change of basis; if obs_noise is 0).
  """
  gray = jnp.asarray(gray, jnp.float32)
  if gray.ndim < 2 or gray.shape[-1] != 1:
    raise InputError(f"colorize: gray has shape {tuple(gray.shape)}; it must be [B, H, W, 1] grey levels "
                     f"(use tasks.to_grayscale(rgb) for an RGB image).")
  known = jnp.concatenate([math.sqrt(3.0) * gray, jnp.zeros_like(gray), jnp.zeros_like(gray)], axis=-1)
  mask = _as_mask(jnp.asarray([1.0, 0.0, 0.0], jnp.float32), known)
  score_fn, project = _conditioned(process, score_fn, known, mask, conditioning, cg_steps, clip_range,
                                   math.sqrt(3.0) * check_obs_noise(obs_noise), to_space=decouple, from_space=couple)
  x, info = samplers.sample(key, process, score_fn, known.shape, method=method, num_steps=num_steps, ts=ts,
                            denoise=denoise, project=project, **options)
  return (couple(_blend(mask, known, decouple(x))) if obs_noise == 0 else x), info


# --------------------------------------------------------------------------------------
# SDEdit
# --------------------------------------------------------------------------------------


def check_strength(strength) -> float:
  ok = isinstance(strength, (int, float, np.integer, np.floating)) and not isinstance(strength, bool)
  if not ok or not 0.0 < float(strength) <= 1.0:
    raise InputError(f"SDEdit strength={strength!r} must be a number in (0, 1] (the fraction of the "
                     f"diffusion to redo; e.g. --strength=0.5; 1 = sample from scratch).")
  return float(strength)


def sdedit_start_time(process: Process, strength: float) -> float:
  """t0 = strength * T, at least t_min."""
  return max(check_strength(strength) * float(process.T), float(process.t_min))


def sdedit_grid(process: Process, strength: float, *, method: str, num_steps: int | None = None,
                **options) -> Array:
  """The time grid SDEdit runs on: t0, then the method's default grid points below t0.

  With strength 1 this is exactly the method's own grid (`samplers.default_grid`), so SDEdit
  takes about `strength * num_steps` steps. `ode` integrates from t0 to t_min.
  """
  t0 = sdedit_start_time(process, strength)
  if method in samplers.METHODS and samplers.METHODS[method].solve is not None:
    return jnp.asarray([t0, process.t_min] if t0 > float(process.t_min) else [t0], jnp.float32)
  if num_steps is None or int(num_steps) < 1:
    raise InputError(f"sdedit(method={method!r}) needs num_steps >= 1 (got {num_steps!r}): the grid is the "
                     f"method's own num_steps grid cut at t0 = strength * T.")
  with jax.ensure_compile_time_eval():  # a concrete grid, also when called under jit
    full = np.asarray(samplers.default_grid(process, method, int(num_steps), **options), np.float64)
  if strength == 1.0:
    return jnp.asarray(full, jnp.float32)
  below = full[full < t0 - 1e-6 * max(1.0, abs(t0))]
  return jnp.asarray(np.concatenate([[t0], below]), jnp.float32)


def sdedit(key: Array, process: Process, score_fn: ScoreFn, image: Array, strength: float, *, method: str,
           num_steps: int | None = None, denoise: bool = True, **options) -> tuple[Array, dict[str, Any]]:
  """SDEdit: `image` noised to t0 = strength * T, then denoised by any sampler from t0.

  `strength` (a Python number in (0, 1]) sets how much is redrawn: near 0 returns about the
  input, 1 starts from the prior and equals `jaxdiff.sample` with the same key (SDEdit's
  x(T) is a prior draw). The noise of the start is drawn from the key `sample` draws its
  prior from, so results vary continuously with strength for a fixed key.
  """
  strength = check_strength(strength)
  image = jnp.asarray(image, jnp.float32)
  ts = sdedit_grid(process, strength, method=method, num_steps=num_steps, **options)
  k_init, _ = jax.random.split(key)  # the key `sample` would draw x_T from
  if strength == 1.0:
    x_init = process.prior_sample(k_init, image.shape)
  else:
    t0 = ts[:1]
    z = jax.random.normal(k_init, image.shape, image.dtype)
    x_init = process.alpha(t0)[0] * image + process.sigma(t0)[0] * z
  if ts.shape[0] == 1:  # t0 is the grid's last time: nothing to integrate, only the denoising
    x0 = samplers.StepContext(process, score_fn, {}, ts).x0_eps(x_init, ts[0])[0]
    return (x0 if denoise else x_init), {"nfe": int(denoise), "num_steps": 1}
  return samplers.sample(key, process, score_fn, image.shape, method=method, ts=ts, denoise=denoise,
                         x_init=x_init, **options)


def sdedit_images(key: Array, exp, score_fn: ScoreFn, image: Array, strength: float, *, vae_params: Any = None,
                  **kw) -> tuple[Array, dict[str, Any]]:
  """`sdedit` of images with the model of `exp` (a `train.Experiment`): in pixel space, or for a
  latent diffusion model (`exp.latent`, its autoencoder's `vae_params`) on the latents of the
  posterior mean, decoded after: Stable Diffusion's img2img. `score_fn` is the model's."""
  if exp.latent is None:
    return sdedit(key, exp.process, score_fn, image, strength, **kw)
  z, info = sdedit(key, exp.process, score_fn, exp.latent.encode(vae_params, image), strength, **kw)
  return exp.latent.decode(vae_params, z), info


# --------------------------------------------------------------------------------------
# Super-resolution (SR3-style: the low-resolution image as extra input channels)
# --------------------------------------------------------------------------------------


def area_downsample(x: Array, size: int) -> Array:
  """`[B, H, W, C]` -> `[B, size, size, C]`: the mean of each (H/size) x (W/size) block."""
  b, h, w, c = x.shape
  if h % size or w % size:
    raise InputError(f"area_downsample: image size {h}x{w} is not a multiple of size={size}; use a size "
                     f"that divides the image (e.g. {h // 2}).")
  return jnp.mean(x.reshape(b, size, h // size, size, w // size, c), axis=(2, 4))


def upsample(x: Array, size: int) -> Array:
  """`[B, h, w, C]` -> `[B, size, size, C]`, bicubic (SR3's conditioning input)."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, size, size, c), method="bicubic")


def network_input(x: Array, low_res: Array) -> Array:
  """The super-resolution network's input: x with the upsampled low-res image concatenated."""
  if low_res.ndim != 4 or low_res.shape[0] != x.shape[0] or low_res.shape[-1] != x.shape[-1]:
    raise InputError(f"low_res has shape {tuple(low_res.shape)}; for x of shape {tuple(x.shape)} it must be "
                     f"[{x.shape[0]}, h, w, {x.shape[-1]}].")
  return jnp.concatenate([x, upsample(low_res, x.shape[1]).astype(x.dtype)], axis=-1)


def superres(key: Array, process: Process, cond_score_fn: Callable[[Array, Array, Array], Array],
             low_res: Array, resolution: int, *, method: str, num_steps: int | None = None,
             ts: Array | None = None, denoise: bool = True, **options) -> tuple[Array, dict[str, Any]]:
  """Samples `[B, resolution, resolution, C]` images given their low-resolution versions.

  `cond_score_fn(x, t, low_res)` is the score of the conditional model (e.g.
  `parameterization.score_fn_from_network(train.network_fn(model, params, low_res=low_res),
  ...)` closed over low_res: see `run_task`); any sampler.
  """
  low_res = jnp.asarray(low_res, jnp.float32)
  shape = (low_res.shape[0], resolution, resolution, low_res.shape[-1])
  return samplers.sample(key, process, lambda x, t: cond_score_fn(x, t, low_res), shape, method=method,
                         num_steps=num_steps, ts=ts, denoise=denoise, **options)


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> np.ndarray:
  """Peak signal-to-noise ratio per example, in dB."""
  err = np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2,
                axis=tuple(range(1, np.ndim(x))))
  return 10.0 * np.log10(data_range**2 / np.maximum(err, 1e-20))


# --------------------------------------------------------------------------------------
# run_sample.py --task: read the input, run a trained model, write the pictures
# --------------------------------------------------------------------------------------


def _to_unit(arr: np.ndarray, name: str) -> np.ndarray:
  """An image array -> float32 `[N, H, W, C]` pixel intensities in [0, 1]."""
  arr = np.asarray(arr)
  if arr.ndim == 2:
    arr = arr[None, ..., None]
  elif arr.ndim == 3:
    arr = arr[None] if arr.shape[-1] in (1, 3) else arr[..., None]
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
    raise InputError(f"{name} holds an array of shape {arr.shape}; give [H, W], [H, W, C], [N, H, W] or "
                     f"[N, H, W, C] images with C = 1 (grey) or 3 (RGB).")
  if arr.dtype == np.bool_:
    return arr.astype(np.float32)
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / 255.0
  if arr.dtype == np.uint16:
    return arr.astype(np.float32) / 65535.0
  if not np.issubdtype(arr.dtype, np.floating):
    raise InputError(f"{name} holds {arr.dtype} values; give uint8 pixels (0..255) or floats in [0, 1].")
  lo, hi = float(np.min(arr)), float(np.max(arr))
  if lo < -1e-6 or hi > 1.0 + 1e-6 or not np.all(np.isfinite(arr)):
    raise InputError(f"{name} holds floats in [{lo:.3g}, {hi:.3g}]; float images must be pixel intensities in "
                     f"[0, 1] (divide uint8 values by 255; map [-1, 1] images with (x + 1) / 2).")
  return np.clip(arr, 0.0, 1.0).astype(np.float32)


def load_images(path: str, name: str = "--input", keys: tuple[str, ...] = ("images", "x", "input")) -> np.ndarray:
  """A PNG/JPEG image, or the images of an .npy / .npz file: float32 `[N, H, W, C]` in [0, 1].

  An .npz is read at the first of `keys` it has (or its only array). Grey PNGs give C = 1;
  palette and alpha images are converted to RGB (alpha dropped).
  """
  from PIL import Image, UnidentifiedImageError

  if not path or not os.path.isfile(path):
    raise InputError(f"{name}={path!r} is not a file; give a PNG/JPEG image, an .npy array or an .npz.")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".npy", ".npz"):
    try:
      data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise InputError(f"{name}={path!r} could not be read as {ext}: {e}.") from None
    if ext == ".npz":
      found = [k for k in keys if k in data.files]
      if not found and len(data.files) != 1:
        raise InputError(f"{name}={path!r} holds arrays {data.files}; name the images one of {list(keys)}.")
      data = data[found[0] if found else data.files[0]]
    return _to_unit(data, f"{name}={path!r}")
  try:
    img = Image.open(path)
    img.load()
  except (OSError, UnidentifiedImageError) as e:
    raise InputError(f"{name}={path!r} is not an image PIL can read ({e}); give a PNG/JPEG, .npy or .npz.") from None
  if img.mode in ("I;16", "I;16B", "I;16L"):
    arr = np.asarray(img, np.uint16)
  elif img.mode in ("L", "1", "LA"):
    arr = np.asarray(img.convert("L"))
  else:
    arr = np.asarray(img.convert("RGB"))
  return _to_unit(arr, f"{name}={path!r}")


def _is_gray(rgb: np.ndarray) -> bool:
  return rgb.shape[-1] == 3 and bool(np.all(rgb[..., :1] == rgb))


def match_channels(images: np.ndarray, channels: int, *, convert: bool, name: str, what: str) -> np.ndarray:
  """`images [N, H, W, C]` with `channels` channels; InputError for grey/RGB mixups without `convert`.

  An RGB image whose channels are all equal is grey and passes as grey. `convert` turns
  grey into RGB (repeated) and RGB into grey (channel mean).
  """
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 3 and channels == 1 and _is_gray(images):
    return images[..., :1]
  if not convert:
    have = "grayscale (1 channel)" if c == 1 else "an RGB image (3 channels)"
    need = "RGB images (3 channels)" if channels == 3 else "grayscale images (1 channel)"
    raise InputError(f"{name} is {have} but {what} takes {need}; pass --convert_channels to convert it "
                     f"({'repeat the grey level' if channels == 3 else 'channel mean'}), or give a matching image.")
  return np.repeat(images, 3, axis=-1) if channels == 3 else images.mean(axis=-1, keepdims=True)


def load_mask(path: str, image_shape: tuple[int, ...], *, invert: bool = False) -> np.ndarray:
  """A mask file for `image_shape = (N, H, W, C)`: float32 `[N, H, W, 1 or C]`, 1 = known.

  PNG masks: white (>= 50%) = known, black = generate (`invert` swaps them); arrays: values
  in [0, 1] (or bool), same convention. One mask serves every image, or one per image.
  """
  m = load_images(path, name="--mask", keys=("mask", "images", "x"))
  n, h, w, c = image_shape
  if m.shape[1:3] != (h, w):
    raise InputError(f"--mask={path!r} is {m.shape[1]}x{m.shape[2]} but the input images are {h}x{w}; give a "
                     f"mask of the input's size (white/1 = keep, black/0 = generate).")
  if m.shape[-1] == 3 and _is_gray(m):
    m = m[..., :1]
  if m.shape[-1] not in (1, c):
    raise InputError(f"--mask={path!r} has {m.shape[-1]} channels but the input has {c}; give a grey mask "
                     f"(or one per channel).")
  if m.shape[0] not in (1, n):
    raise InputError(f"--mask={path!r} holds {m.shape[0]} masks for {n} input images; give one mask, or one "
                     f"per image.")
  m = (m >= 0.5).astype(np.float32)
  m = 1.0 - m if invert else m
  return np.ascontiguousarray(np.broadcast_to(m, (n, h, w, m.shape[-1])))


def run_task(config, workdir: str, *, task: str, input_path: str, mask_path: str | None = None,
             invert_mask: bool = False, strength: float | None = None, convert_channels: bool = False,
             conditioning: str = "replace", cg_steps: int = 5, resample: int = 1, jump_length: int = 1,
             obs_noise: float = 0.0, step: int | None = None,
             method: str | None = None, num_steps: int | None = None, options: dict | None = None,
             seed: int = 0, batch_size: int | None = None, out_dir: str | None = None,
             labels: Sequence[int | str] | None = None, guidance_scale: float | None = None) -> dict[str, Any]:
  """Runs `task` with the EMA model of `workdir` on the images of `input_path`; writes the results.

  Tasks (all with any sampler, `method` / `num_steps` / `options` as for `run_sample.py`):
    inpaint   fill the pixels `mask_path` marks 0 (black); keep those it marks 1 (white).
              A latent diffusion model fills the latent cells that code any unknown pixel
              (`inpaint_images`).
    outpaint  an input smaller than the model's resolution, centred on a canvas of it; the
              rest generated (in the latents too).
    colorize  grey input (1 channel, or RGB with equal channels; an RGB image with
              `convert_channels`) -> RGB; needs an RGB model.
    sdedit    the input noised to t0 = strength * T and denoised (strength in (0, 1], 0.5 by
              default). A latent diffusion model (`config.latent`) edits the input's latents
              (the posterior mean) and decodes the result: Stable Diffusion's img2img.
    superres  a super-resolution model (`config.data.cond_resolution`): an input at the
              low resolution is super-resolved; one at the model's resolution is taken as
              ground truth, area-downsampled, super-resolved and scored (PSNR, also for
              bicubic upsampling).

  A class-conditional model is conditioned on `labels` (cycled over the inputs; 'null' or
  none: the null label, i.e. unconditional), with classifier-free guidance `guidance_scale`
  (default `config.sampling.guidance_scale`) where a label is given, as `run_sample.py`'s
  samples are.

  Writes `<out_dir or workdir/tasks>/<task>_<method>_step<step>_seed<seed>.png`: one row per
  input with input | mask | output (and the task's other columns) side by side, and an
  `.npz` of the same uint8 arrays. Returns the paths, NFE, timings (and PSNRs for superres).
  """
  from jaxdiff import evaluate, generate, latent, sharding, train, viz
  from jaxdiff.errors import check_choice

  check_choice("--task", task, TASKS)
  check_choice("--conditioning", conditioning, CONDITIONINGS)
  if task == "inpaint" and not mask_path:
    raise InputError("--task=inpaint needs --mask=PATH (a PNG or array of the input's size: white/1 = keep, "
                     "black/0 = generate).")
  if task != "inpaint" and mask_path:
    raise InputError(f"--mask={mask_path!r} is only read by --task=inpaint (got --task={task}); drop it.")
  if task == "sdedit":
    strength = check_strength(0.5 if strength is None else strength)
  elif strength is not None:
    raise InputError(f"--strength={strength} is only read by --task=sdedit (got --task={task}); drop it.")
  if conditioning != "replace" and task not in CONDITIONED_TASKS:
    raise InputError(f"--conditioning={conditioning} applies to inpaint, outpaint and colorize, not --task={task}.")
  if obs_noise and conditioning != "tweedie":
    raise InputError(f"--obs_noise={obs_noise:g} (noisy known values) needs --conditioning=tweedie, not "
                     f"--conditioning={conditioning}.")
  if (resample, jump_length) != (1, 1) and task not in CONDITIONED_TASKS:
    raise InputError(f"--resample={resample} --jump_length={jump_length} (RePaint's resampling) applies to inpaint, "
                     f"outpaint and colorize, not --task={task}; drop them.")

  exp = train.build_experiment(config)
  if not exp.data_spec.is_image or exp.is_classifier or exp.is_autoencoder:
    what = ("a classifier" if exp.is_classifier else "an autoencoder" if exp.is_autoencoder
            else f"a model of {config.data.dataset!r}")
    raise InputError(f"--task={task} needs an image diffusion model; {workdir!r} holds {what}.")
  if exp.latent is not None and task not in LATENT_TASKS:
    raise InputError(f"--task={task} conditions on pixels, but {workdir!r} is a latent diffusion model "
                     f"(config.latent.autoencoder={exp.latent.source!r}); of the tasks, --task=sdedit (img2img), "
                     f"inpaint and outpaint run in latent space (the input encoded, edited there, decoded).")
  res, channels = int(exp.data_spec.shape[0]), int(exp.data_spec.shape[-1])
  low = exp.cond_resolution
  if task == "superres" and not low:
    raise InputError(f"--task=superres needs a model trained with low-resolution conditioning "
                     f"(config.data.cond_resolution > 0, e.g. configs/mnist_superres.py); {workdir!r} has none.")
  if task != "superres" and low:
    raise InputError(f"{workdir!r} holds a super-resolution model (config.data.cond_resolution={low}); it takes "
                     f"--task=superres, not --task={task}.")
  if task == "colorize" and channels != 3:
    raise InputError(f"--task=colorize needs an RGB model, but {workdir!r} makes {channels}-channel images.")
  k = exp.num_classes
  cfg_w = float(config.sampling.guidance_scale if guidance_scale is None else guidance_scale)
  if (labels or guidance_scale) and not k:
    given = f"--labels={','.join(map(str, labels))}" if labels else f"--guidance_scale={guidance_scale:g}"
    raise InputError(f"{given} needs a class-conditional model, but {workdir!r} is unconditional "
                     f"(config.model.num_classes=0); drop it.")
  if guidance_scale and not labels:
    raise InputError(f"--guidance_scale={guidance_scale:g} guides towards --labels, which were not given; pass "
                     f"the classes, e.g. --labels=0,1,2 (0..{k - 1}; cycled over the inputs).")
  label_list = generate.parse_labels(labels, k, allow_null=True) if labels else None

  name = f"--input={input_path!r}"
  pixels = load_images(input_path)
  n, h, w = pixels.shape[:3]
  truth = reference = mask = None
  if task == "superres":
    if (h, w) not in ((low, low), (res, res)):
      raise InputError(f"{name} is {h}x{w}; --task=superres takes the model's low-resolution {low}x{low} "
                       f"images (or {res}x{res} ground truth, which is downsampled and scored).")
    pixels = match_channels(pixels, channels, convert=convert_channels, name=name, what="this model")
    if h == res:
      truth = pixels
      pixels = np.asarray(area_downsample(jnp.asarray(pixels), low))
  elif task == "outpaint":
    if h > res or w > res or (h, w) == (res, res):
      raise InputError(f"{name} is {h}x{w}; --task=outpaint takes an image smaller than the model's {res}x{res} "
                       f"resolution (it is centred and the rest generated).")
    pixels = match_channels(pixels, channels, convert=convert_channels, name=name, what="this model")
  else:
    if (h, w) != (res, res):
      hint = " (or use --task=outpaint for smaller images)" if h <= res and w <= res else ""
      raise InputError(f"{name} is {h}x{w} but the model makes {res}x{res} images; resize or crop the input "
                       f"to {res}x{res}{hint}.")
    if task == "colorize":
      if pixels.shape[-1] == 3 and not _is_gray(pixels):
        if not convert_channels:
          raise InputError(f"{name} is a colour RGB image but --task=colorize takes a grayscale one; pass "
                           f"--convert_channels to colorize its grey version (channel mean), or give a grey image.")
        reference = pixels
      pixels = pixels.mean(axis=-1, keepdims=True)
    else:
      pixels = match_channels(pixels, channels, convert=convert_channels, name=name, what="this model")
    if task == "inpaint":
      mask = load_mask(mask_path, pixels.shape, invert=invert_mask)

  # model space: [-1, 1] (centered) or [0, 1]
  to_model = (lambda p: 2.0 * p - 1.0) if exp.centered else (lambda p: p)
  inputs = {"image": to_model(pixels).astype(np.float32)}
  if task == "inpaint":
    inputs["mask"] = mask
  if task == "outpaint":
    canvas, out_mask = place_on_canvas(jnp.asarray(inputs["image"]), (res, res), fill=float(to_model(0.5)))
    inputs = {"image": np.asarray(canvas), "mask": np.asarray(out_mask)}
  if label_list is not None:
    inputs["label"] = generate.cycle_labels(label_list, n)
  interval = tuple(float(v) for v in config.sampling.guidance_interval)
  interval = None if interval[0] <= 0.0 and interval[1] == float("inf") else interval

  method = generate.resolve_method(method or config.sampling.method)
  opts = generate.sampler_options(config, method, options)
  num_steps = int(num_steps or config.sampling.num_steps)
  denoise = bool(config.sampling.denoise)
  clip_range = exp.data_range if config.sampling.clip_denoised else None  # None for latents (unbounded)
  process = exp.process

  def run(params, key, batch, vae_params):
    def score_fn_for(low_res=None, clip=True):
      score_fn = generate.model_score_fn(exp, params, labels=batch.get("label"), guidance_scale=cfg_w,
                                         interval=interval, rescale=float(config.sampling.guidance_rescale),
                                         low_res=low_res)
      if clip and clip_range is not None:
        score_fn = parameterization.clip_denoised(score_fn, process, *clip_range)
      return score_fn

    kw = dict(method=method, num_steps=num_steps, denoise=denoise, **opts)
    # the conditioned tasks clip after conditioning on the known part (see _conditioned)
    cond = dict(conditioning=conditioning, cg_steps=cg_steps, clip_range=clip_range, resample=resample,
                jump_length=jump_length, obs_noise=obs_noise)
    if task in ("inpaint", "outpaint"):
      x, info = inpaint_images(key, exp, score_fn_for(clip=False), batch["image"], batch["mask"],
                               vae_params=vae_params, **cond, **kw)
    elif task == "colorize":
      x, info = colorize(key, process, score_fn_for(clip=False), batch["image"], **cond, **kw)
    elif task == "sdedit":
      x, info = sdedit_images(key, exp, score_fn_for(), batch["image"], strength, vae_params=vae_params, **kw)
    else:
      x, info = superres(key, process, lambda x, t, lr: score_fn_for(lr)(x, t), batch["image"], res, **kw)
    return x, jnp.asarray(info["nfe"], jnp.int32)

  mesh = sharding.create_mesh(config.mesh.to_dict())
  step, params = evaluate.restore_ema_params(config, workdir, exp, mesh, step=step)
  vae_params = None if exp.latent is None else latent.load_params(exp.latent, mesh)
  bs = sharding.round_up_batch(min(int(batch_size or config.sampling.batch_size), n), mesh)
  fn = jax.jit(run, out_shardings=(sharding.batch_sharding(mesh, 4), sharding.replicated(mesh)))

  key = jax.random.key(seed)
  outs, t0 = [], time.time()
  for b in range(int(math.ceil(n / bs))):
    chunk = {k: v[b * bs:(b + 1) * bs] for k, v in inputs.items()}
    m = chunk["image"].shape[0]
    if m < bs:  # pad the last chunk with copies of its last image; dropped below
      chunk = {k: np.concatenate([v, np.repeat(v[-1:], bs - m, axis=0)]) for k, v in chunk.items()}
    # every process holds the whole (small) input: each gives its devices' rows
    chunk = sharding.put_host_tree(chunk, {k: sharding.batch_sharding(mesh, v.ndim) for k, v in chunk.items()})
    x, nfe = fn(params, jax.random.fold_in(key, b), chunk, vae_params)
    outs.append(sharding.to_host(x)[:m])
    log.info("%s: %d/%d images (%s, %d NFE) in %.1fs", task, min((b + 1) * bs, n), n, method, int(nfe),
             time.time() - t0)
  wall = time.time() - t0
  out = np.concatenate(outs)

  u8 = lambda p: viz.to_uint8(p, centered=False)  # noqa: E731  pixels in [0, 1]
  output = viz.to_uint8(out, exp.centered)
  result: dict[str, Any] = {"task": task, "method": method, "nfe": int(nfe), "checkpoint_step": int(step),
                            "num_images": int(n), "wall_s": wall}
  if task in ("inpaint", "outpaint"):
    shown_input = viz.to_uint8(inputs["image"], exp.centered) if task == "outpaint" else u8(pixels)
    columns = {"input": shown_input, "mask": u8(inputs["mask"]), "output": output}
  elif task == "colorize":
    columns = {"input": u8(pixels), "output": output}
    if reference is not None:
      columns["original"] = u8(reference)
  elif task == "sdedit":
    columns = {"input": u8(pixels), "output": output}
    result["strength"] = strength
  else:
    bicubic = np.clip(np.asarray(upsample(jnp.asarray(pixels), res)), 0.0, 1.0)
    columns = {"input": u8(pixels), "bicubic": u8(bicubic), "output": output}
    if truth is not None:
      columns["truth"] = u8(truth)
      out_unit = (out + 1.0) / 2.0 if exp.centered else out
      result["psnr"] = float(np.mean(psnr(np.clip(out_unit, 0.0, 1.0), truth, 1.0)))
      result["psnr_bicubic"] = float(np.mean(psnr(bicubic, truth, 1.0)))

  tag = f"_s{strength:g}" if task == "sdedit" else (f"_{conditioning}" if conditioning != "replace" else "")
  if obs_noise:
    tag += f"_n{obs_noise:g}"
  if resample > 1:
    tag += f"_r{resample}j{jump_length}"
  if label_list is not None:
    result["labels"] = inputs["label"].tolist()
    if cfg_w:
      tag += f"_cfg{cfg_w:g}"
      result["guidance_scale"] = cfg_w
  prefix = os.path.join(out_dir or os.path.join(workdir, "tasks"), f"{task}_{method}_step{step}_seed{seed}{tag}")
  if sharding.is_main_process():
    viz.save_side_by_side(list(columns.values()), prefix + ".png", titles=list(columns))
    np.savez_compressed(prefix + ".npz", **columns, **({} if label_list is None else {"labels": inputs["label"]}))
  result["paths"] = {"png": prefix + ".png", "npz": prefix + ".npz"}
  extra = (f"; PSNR {result['psnr']:.2f} dB (bicubic {result['psnr_bicubic']:.2f} dB)" if "psnr" in result else "")
  log.info("Wrote %s: %s of %d images, %s, %d NFE, %.1fs%s.", result["paths"]["png"], task, n, method,
           result["nfe"], wall, extra)
  return result
