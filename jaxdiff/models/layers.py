"""Building blocks of the jaxdiff networks (flax linen, NHWC).

* `timestep_embedding(t, dim)`: the sinusoidal embedding of a noise-level input `t` [B].
* `TimeEmbedding`: the MLP applied to it (Dense(4*C0), SiLU, Dense(4*C0) in DDPM).
* `GroupNorm`, `ResnetBlock`, `AttentionBlock`, `Downsample`, `Upsample`: the DDPM U-Net
  blocks (Ho et al. 2020), numerically the same as diffusers' `ResnetBlock2D`,
  `Attention` (`_from_deprecated_attn_block`), `Downsample2D(padding=0)` and `Upsample2D`.

Every layer takes `dtype` (the compute dtype) and `param_dtype`. GroupNorm always computes
its statistics and normalisation in float32 and returns `dtype`.

Initialisation follows the DDPM reference code: variance scaling (fan_avg, uniform) for
every kernel, zero biases, and zero for the last layer of each residual branch (the second
conv of a resnet block and the output projection of attention), so that every block
starts as the identity.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import xla_flags
from jaxdiff.errors import InputError

Array = jax.Array
Dtype = Any

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros


# Dropout. `jax.random.bernoulli` hashes a counter per element with Threefry-2x32, which
# jax lowers on CPU as a 5-iteration while loop that writes the whole [B, H, W, C] state to
# memory in every iteration: 36 ms for one [64, 32, 32, 64] mask on 2 cores, ~8% of the small
# U-Net's train step. The same hash written out here unrolled fuses with the counter and the
# select into one elementwise loop (3 ms), on every backend, and as a function of the global
# element index its mask does not depend on how the array is sharded.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
  """The Threefry-2x32 block cipher (20 rounds; Salmon et al. 2011), elementwise.

  The hash behind `jax.random`'s default PRNG, unrolled: for uint32 keys `k0, k1` and counter
  words `x0, x1` (any shape) it returns the two output words, equal to
  `jax.extend.random.threefry_2x32((k0, k1), concatenate([x0, x1]))` split in halves.
  """
  u32 = jnp.uint32
  k0, k1, x0, x1 = (jnp.asarray(v, u32) for v in (k0, k1, x0, x1))
  ks = (k0, k1, k0 ^ k1 ^ u32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << u32(r)) | (x1 >> u32(32 - r))) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + u32(i + 1)
  return x0, x1


def _element_counters(shape: tuple[int, ...]) -> tuple[Array, Array]:
  """uint32 words (index within the leading axis' entry, index along the leading axis)."""
  if len(shape) < 2:
    shape = (1,) * (2 - len(shape)) + tuple(shape)
  inner = math.prod(shape[1:])
  if inner >= 2**32:
    raise InputError(f"dropout: one entry of the leading axis of shape {tuple(shape)} has {inner} "
                     f"elements, more than the 2**32 its counter can number; split the array.")
  flat = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in range(len(shape) - 1, 0, -1):
    flat = flat + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
    stride *= shape[d]
  return flat, jax.lax.broadcasted_iota(jnp.uint32, shape, 0)


def dropout_mask(key: Array, shape: tuple[int, ...], keep_prob: float) -> Array:
  """A boolean mask of `shape`, each element True with probability `keep_prob`, independently.

  Element i is kept when the Threefry-2x32 hash of its index under `key` is below
  `keep_prob * 2**32`; when the last axis is even, one hash gives the bits of channels c and
  c + C/2 (as `jax.random` uses both output words).
  """
  shape = tuple(int(d) for d in shape)
  keep_prob = float(keep_prob)
  if not 0.0 <= keep_prob <= 1.0:
    raise InputError(f"dropout keep_prob={keep_prob} is outside [0, 1].")
  if keep_prob == 1.0 or math.prod(shape) == 0:
    return jnp.ones(shape, bool)
  return _hashed_mask(key, shape, keep_prob)


# A jit of its own, so it is traced once per (shape, keep_prob), not at every call: the
# unrolled cipher is ~100 ops, and a U-Net's ~20 dropouts share a few shapes (the big
# U-Net's train step traced in 2.2-2.3 s instead of 2.5-3.8). XLA inlines the call: the
# compiled step is the same.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _hashed_mask(key: Array, shape: tuple[int, ...], keep_prob: float) -> Array:
  data = jax.random.key_data(key)  # threefry keys (jax's default) are the cipher's key words
  k0, k1 = data if data.shape == (2,) else jax.random.bits(key, (2,), jnp.uint32)
  paired = len(shape) >= 1 and shape[-1] % 2 == 0
  hashed = shape[:-1] + (shape[-1] // 2,) if paired else shape
  x0, x1 = _element_counters(hashed)
  a, b = threefry2x32(k0, k1, x0, x1)
  bits = jnp.concatenate([a, b], axis=-1) if paired else a
  bits = bits.reshape(shape)
  return bits < jnp.uint32(min(round(keep_prob * 2.0**32), 2**32 - 1))


def dropout(x: Array, rate: float, key: Array) -> Array:
  """Inverted dropout: zeroes each element with probability `rate`, scales the rest by 1/(1-rate)."""
  if not 0.0 <= rate < 1.0:
    raise InputError(f"dropout rate={rate} is outside [0, 1); use e.g. 0.1.")
  if rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = dropout_mask(key, x.shape, keep)
  return jax.lax.select(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
  """`flax.linen.Dropout` on `dropout` above (same rng collection, same call)."""

  rate: float
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng(self.rng_collection))


def timestep_embedding(
    t: Array,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
) -> Array:
  """Sinusoidal embedding of a float [B] input, float32 [B, dim].

  `freq_i = exp(-ln(max_period) * i / (dim // 2 - freq_shift))` for i < dim // 2; the
  embedding is `[sin(t * freq), cos(t * freq)]` (`[cos, sin]` with `flip_sin_to_cos`),
  zero-padded by one column when `dim` is odd. `freq_shift=1` is the DDPM convention,
  `freq_shift=0` the Transformer one.
  """
  if t.ndim != 1:
    raise InputError(f"t.shape={t.shape} must be [B]; pass one noise level per example.")
  half = dim // 2
  if half < 1 or half - freq_shift <= 0:
    raise InputError(
        f"dim={dim} is too small for freq_shift={freq_shift}; use dim >= {2 * (int(freq_shift) + 1)}.")
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimeEmbedding(nn.Module):
  """MLP on a noise-level embedding: Dense(features), SiLU, Dense(out_features)."""

  features: int  # hidden width (4 * C0 in DDPM)
  out_features: int | None = None  # default: `features`
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: Array) -> Array:
    """[B, D] -> [B, out_features] in `dtype`."""
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=default_init, name=name)
    h = dense(self.features, "dense_0")(emb)
    h = dense(self.out_features or self.features, "dense_1")(nn.silu(h))
    return h


def _group_mean(s: Array, g: int) -> Array:
  """Per-channel statistics [B, C] -> the mean over each channel's group, [B, C].

  A product with the [C, C] block-averaging matrix, not reshape-mean-broadcast: XLA fuses
  a broadcast into every [B, H, W, C] pass that reads it, recomputing the group mean per
  element with a group index that kept XLA:CPU's loop from vectorising, while a dot's [B, C]
  result is computed once (GroupNorm + SiLU forward of [64, 32, 32, 64]: 6.7 -> 3.3 ms).
  """
  c = s.shape[-1]
  group = np.arange(c) // (c // g)
  avg = (group[:, None] == group[None, :]).astype(np.float32) / (c // g)
  return jnp.dot(s, avg, precision=jax.lax.Precision.HIGHEST)


def _positions(x: Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - 1))


def _per_channel(v: Array, x: Array) -> Array:
  """[B, C] -> [B, 1, ..., 1, C], broadcastable against x [B, ..., C]."""
  return v.reshape(v.shape[0], *([1] * (x.ndim - 2)), v.shape[-1])


def _gn_coeffs(x: Array, scale: Array, bias: Array, g: int, eps: float):
  """Per-(example, channel) mean, 1/std, and the folded multiply-add `y = x * a + shift`."""
  mean = _group_mean(jnp.mean(x, axis=_positions(x)), g)
  var = jnp.maximum(_group_mean(jnp.mean(jnp.square(x), axis=_positions(x)), g) - jnp.square(mean), 0.0)
  inv = jax.lax.rsqrt(var + eps)
  a = inv * scale
  return mean, inv, a, bias - mean * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, eps: float, act: bool) -> Array:
  """GroupNorm (+ SiLU) of float32 `x [B, ..., C]` with per-channel `scale`, `bias` [C].

  Statistics are reduced per channel over the positions first ([B, C]) and then over each
  group's channels, and the gradient is written out by hand (`custom_vjp`): XLA's CPU
  backend runs the autodiff of the grouped [B, HW, G, C/G] form 2-4x slower (its
  reductions over non-minor axes), which made GroupNorm a fifth of a U-Net train step.
  Forward and backward work on x in its own shape (reducing over the position axes), not
  on a [B, H*W, C] view: XLA:CPU fused x's producer (a U-Net's skip concatenation, say)
  into such a reshape and materialised x in both shapes (small U-Net train step 5% faster
  and 70 MB lighter without it).
  """
  return _group_norm_fwd(x, scale, bias, num_groups, eps, act)[0]


def _group_norm_fwd(x, scale, bias, num_groups, eps, act):
  mean, inv, a, shift = _gn_coeffs(x, scale, bias, num_groups, eps)
  y = x * _per_channel(a, x) + _per_channel(shift, x)
  if act:
    # SiLU as y / (1 + e^-y), not y * sigmoid(y): XLA:CPU copies cheap elementwise producers
    # into each consumer, and a product it would recompute inside the transpose that feeds
    # the next conv's weight gradient ([B,H,W,C] -> [C,H,W,B]), in transposed order with
    # strided reads (45 ms vs 9 ms for a [64,32,32,64] map). A division is not copied: the
    # output is materialised once (small train step 2.0 -> 1.85 s, big 3.3 -> 3.2 s).
    y = y / (1.0 + jnp.exp(-y))
  return y, (x, scale, bias, mean, inv)


def _group_norm_bwd(num_groups, eps, act, res, dout):
  del eps
  x, scale, bias, mean, inv = res
  dy = dout
  pc = functools.partial(_per_channel, x=x)
  if act:  # d silu(y) / dy = s (1 + y (1 - s)), with y recomputed (cheaper than storing it)
    a = inv * scale
    y = x * pc(a) + pc(bias - mean * a)
    # sigmoid as (1 + tanh(y/2)) / 2, not 1 / (1 + e^-y): XLA would CSE that e^-y with the
    # forward's, split the forward into two passes and keep e^-y from the forward to here.
    s = 0.5 * jnp.tanh(0.5 * y) + 0.5
    dy = dy * (s * (1.0 + y * (1.0 - s)))
  n = math.prod(x.shape[1:-1])
  sdy = jnp.sum(dy, axis=_positions(x))  # [B, C]
  sdyx = jnp.sum(dy * x, axis=_positions(x))  # [B, C]
  sdy_xhat = inv * (sdyx - mean * sdy)  # sum over positions of dy * xhat
  dscale = jnp.sum(sdy_xhat, axis=0)
  dbias = jnp.sum(sdy, axis=0)
  # dx = inv * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dy * scale,
  # folded into dx = dy * p - x * q + r per (example, channel).
  m1 = _group_mean(sdy * scale, num_groups) / n
  m2 = _group_mean(scale * sdy_xhat, num_groups) / n
  p = inv * scale
  q = inv * inv * m2
  r = q * mean - inv * m1
  dx = dy * pc(p) - x * pc(q) + pc(r)
  return dx, dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm_plain(x: Array, scale: Array, bias: Array, num_groups: int, eps: float, act: bool) -> Array:
  """`group_norm` with JAX's own derivatives: the same numbers, differentiable in forward mode
  (`jax.jvp`) as well as reverse mode, which the `custom_vjp` version is not."""
  return _group_norm_fwd(x, scale, bias, num_groups, eps, act)[0]


class GroupNorm(nn.Module):
  """Group normalisation over [B, H, W, C] (any rank >= 2, channels last), in float32.

  Mean and variance come from one pass (E[x^2] - E[x]^2); the scale and shift are folded
  into one per-(example, channel) multiply-add, so the normalisation (and an optional
  following SiLU) is a single elementwise pass. See `group_norm` for the gradient.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  act: bool = False  # apply SiLU after the affine transform
  dtype: Dtype = jnp.float32  # output dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # hand-written gradient (fast on XLA:CPU); False: plain ops, forward-mode too

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    g = self.num_groups
    if c % g:
      raise InputError(
          f"GroupNorm: x.shape[-1]={c} is not divisible by num_groups={g}; use a divisor of {c}.")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    fn = group_norm if self.custom_vjp else group_norm_plain
    y = fn(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
           g, float(self.epsilon), bool(self.act))
    return y.astype(self.dtype)


_CONV_DN = ("NHWC", "HWIO", "NHWC")


def conv2d_plain(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> Array:
  """`conv2d` with JAX's own derivatives (forward mode works too); the same numbers."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_CONV_DN)


def _use_matmul_weight_grad(x_shape, kernel_shape, strides) -> bool:
  """Whether `conv2d`'s weight gradient goes through GEMMs instead of XLA's convolution.

  XLA:CPU lowers a weight gradient to a convolution whose window is the whole feature map
  (batch = input channels, features = examples). With YNNPACK's convolutions (jaxlib's
  default, see `jaxdiff.xla_flags`) that runs ~4x slower than the forward on 32x32 maps and
  a 1x1 conv's weight gradient ~15x slower than the GEMM it is; as one GEMM per kernel tap
  over the (example, position) axis the big U-Net's train step is 1.27x faster and the
  small one's 1.14x. With XLA's Eigen convolutions (jaxdiff's default flag) XLA's own
  weight gradient is as fast or faster, so only 1x1 convs (plain GEMMs) take this path.
  Strided convs, maps under 16x16 and 3-channel ends always keep XLA's.
  """
  kh, kw, cin, cout = kernel_shape
  if tuple(strides) != (1, 1):
    return False
  if kh == kw == 1:
    return True  # a 1x1 conv is a Dense layer: its weight gradient is one GEMM
  return (xla_flags.ynn_convolutions_enabled() and x_shape[1] * x_shape[2] >= 256
          and min(cin, cout) >= 16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> Array:
  """NHWC convolution `x [B, H, W, Cin] * kernel [kh, kw, Cin, Cout]` with a CPU-friendly gradient.

  The gradients are written as convolutions in XLA:CPU's canonical NHWC/HWIO form
  (`_input_grad`, `_weight_grad`: full speed inside while loops too, where JAX's own forms
  run 13-20x slower), and the weight gradient as `sum_taps shift(x)^T @ dy` GEMMs where
  `_use_matmul_weight_grad` says that is faster. A `custom_vjp`, so reverse mode only:
  `conv2d_plain` is the same op with JAX's derivatives.
  """
  return conv2d_plain(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return conv2d_plain(x, kernel, strides, padding), (x, kernel)


def _input_grad(g, kernel, x_shape, strides, padding):
  """d conv / d x as one forward conv of `g` (dilated by the strides) with the flipped kernel.

  Inside a while loop (a sampler's scan: classifier guidance, reverse-mode likelihood)
  XLA:CPU leaves the kernel of JAX's own input-gradient convolution in [kh, kw, Cout, Cin]
  order and runs it ~13x slower than outside a loop (a 6-conv stack: 6.5 ms alone, 87 ms per
  iteration in a `fori_loop`; a stride-2 conv 2.6x); written as a plain HWIO forward conv it
  runs at full speed in both places. Returns None where padding > kernel - 1 (JAX's form).
  """
  kh, kw = kernel.shape[:2]
  pad_t = []
  for size, k, (lo, hi), s, n_out in zip(x_shape[1:3], (kh, kw), padding, strides, g.shape[1:3]):
    rest = (size + lo + hi - k) - (n_out - 1) * s  # input rows past the last window, dropped
    pad_t.append((k - 1 - lo, k - 1 - hi + rest))
  if min(min(p) for p in pad_t) < 0:
    return None
  k_t = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # [kh, kw, Cout, Cin], flipped in space
  return jax.lax.conv_general_dilated(g, k_t, (1, 1), pad_t, lhs_dilation=tuple(strides),
                                      dimension_numbers=_CONV_DN)


def _weight_grad(x, g, kernel_shape, strides, padding):
  """d conv / d kernel as one canonical NHWC/HWIO convolution: x as [Cin, H, W, B] (batch and
  features swapped), g as the [Ho, Wo, B, Cout] kernel, dilated by the strides.

  XLA:CPU brings JAX's own weight-gradient convolution into this form outside loops, but
  inside a while loop it runs it as written, ~20x slower (6 convs: 8.9 ms alone, 180 ms per
  iteration in a `fori_loop`); spelled out it runs at the same speed in both places.
  """
  kh, kw = kernel_shape[:2]
  lhs = jnp.transpose(x, (3, 1, 2, 0))
  rhs = jnp.transpose(g, (1, 2, 0, 3))
  out = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), padding, rhs_dilation=tuple(strides),
                                     dimension_numbers=_CONV_DN)
  return jnp.transpose(out[:, :kh, :kw], (1, 2, 0, 3))


def _conv2d_bwd(strides, padding, res, g):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  dx = _input_grad(g, kernel, x.shape, strides, padding)
  if dx is None:
    dx = jax.vjp(lambda a: conv2d_plain(a, kernel, strides, padding), x)[1](g)[0]
  if not _use_matmul_weight_grad(x.shape, kernel.shape, strides):
    return dx, _weight_grad(x, g, kernel.shape, strides, padding).astype(kernel.dtype)
  b, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  g2 = g.reshape(-1, cout)

  # One kernel tap per iteration: a loop (not an unrolled sequence) so that only one shifted
  # copy of x is live at a time; unrolled, XLA schedules all kh*kw copies at once.
  def tap(k, dk):
    xs = jax.lax.dynamic_slice(xp, (0, k // kw, k % kw, 0), (b, ho, wo, cin)).reshape(-1, cin)
    t = jax.lax.dot_general(xs, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(dk, t, k, 0)

  dk = jax.lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, cin, cout), jnp.float32))
  dk = dk.reshape(kernel.shape).astype(kernel.dtype)
  return dx, dk


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """2-D convolution, NHWC, explicit padding; the parameters of `flax.linen.Conv` (`kernel`
  [kh, kw, Cin, Cout], `bias` [Cout]) so checkpoints and converters see the same tree.

  With `custom_vjp` (the default) the weight gradient uses `conv2d`'s GEMM form where that is
  faster on XLA:CPU; `custom_vjp=False` is the plain `lax.conv_general_dilated` (forward mode).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  use_bias: bool = True
  kernel_init: Any = default_init
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, Cin] -> [B, H', W', features] in `dtype`."""
    if x.ndim != 4:
      raise InputError(f"Conv: x.shape={x.shape} must be [B, H, W, C] (NHWC).")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
    fn = conv2d if self.custom_vjp else conv2d_plain
    padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
    y = fn(x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides), padding)
    if self.use_bias:
      bias = self.param("bias", zeros_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class ResnetBlock(nn.Module):
  """DDPM residual block: GN, SiLU, conv3x3, + Dense(SiLU(temb)), GN, SiLU, Dropout, conv3x3.

  The shortcut is a 1x1 conv when the channel count changes. Output = shortcut + h. With
  `temb=None` there is no time projection (the autoencoder's blocks, diffusers' `temb_channels=None`).
  """

  out_ch: int  # output channels
  num_groups: int = 32
  norm_eps: float = 1e-6
  dropout: float = 0.0
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # hand-written gradients of GroupNorm and the convs (see GroupNorm, conv2d)

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
    """x [B, H, W, Cin], temb [B, D] (or None) -> [B, H, W, out_ch]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ckw = dict(kw, custom_vjp=self.custom_vjp)
    norm = lambda name: GroupNorm(  # noqa: E731
        self.num_groups, self.norm_eps, act=True, custom_vjp=self.custom_vjp, name=name, **kw)
    h = norm("norm_0")(x)
    h = Conv(self.out_ch, kernel_init=default_init, name="conv_0", **ckw)(h)
    if temb is not None:
      h = h + nn.Dense(self.out_ch, kernel_init=default_init, name="temb_proj",
                       **kw)(nn.silu(temb))[:, None, None, :]
    h = norm("norm_1")(h)
    if self.dropout > 0.0:
      h = Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.out_ch, kernel_init=zeros_init, name="conv_1", **ckw)(h)
    if x.shape[-1] != self.out_ch:
      x = Conv(self.out_ch, (1, 1), padding=((0, 0), (0, 0)), kernel_init=default_init, name="shortcut",
               **ckw)(x)
    return x + h


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(D)) v for `q, k, v [B, T, N, D]` (N heads) -> [B, T, N, D].

  The same numbers as `jax.nn.dot_product_attention` (softmax in float32), written as two
  einsums with a hand-written gradient (dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
  dQ = dS K, dK = dS^T Q): on XLA's CPU backend this runs the forward 3-4x and the
  backward ~2x faster than `jax.nn.dot_product_attention`'s generic path.

  Under differentiation (the train step) the heads are folded into the batch, [B*N, T, D]
  (free for one head), and dK, dV are computed transposed (Q^T dS, dO^T P), so XLA:CPU
  transposes the [.., D] operands instead of copying each [B, T, T] matrix into another
  layout: forward + backward of one small-U-Net block (B=64, T=256, D=64) 58 -> 33 ms.
  Without differentiation (sampling) the softmax is normalised after the product with v,
  which XLA:CPU runs as one fused kernel (see `_attention_primal`).
  """
  return _attention_primal(q, k, v)


def _attention_primal(q, k, v):
  """`attention` without differentiation (sampling): heads folded into the batch, and the
  softmax normalised after the product with v (o = (e v) / rowsum(e), e = exp(s - max s)).

  XLA:CPU runs this as one YNNPACK fusion (scores, softmax, product): a small-U-Net block
  (B=64, T=256, D=64) 29 -> 8 ms (PyTorch's CPU flash attention: 7.9), small-U-Net sampling
  14% faster. q, k, v and the output pass through a no-op `reduce_precision`, which YNNPACK
  does not take in: without it the fusion grew over the projections, the GroupNorm and the
  previous residual block's convolutions, which then ran in YNNPACK (big U-Net 7% slower).
  """
  n = q.shape[2]
  scale = q.shape[-1] ** -0.5
  q3, k3, v3 = (_fusion_boundary(_fold_heads(a)) for a in (q, k, v))
  s = jnp.einsum("btd,bsd->bts", q3 * scale, k3, preferred_element_type=jnp.float32)
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  o3 = jnp.einsum("bts,bsd->btd", e.astype(v.dtype), v3, preferred_element_type=jnp.float32)
  o3 = o3 / jnp.sum(e, axis=-1, keepdims=True)
  return _unfold_heads(_fusion_boundary(o3.astype(v.dtype)), n)


def _fusion_boundary(a: Array) -> Array:
  """`a` unchanged, through a `reduce_precision` to its own precision (not an identity XLA drops)."""
  info = jnp.finfo(a.dtype)
  return jax.lax.reduce_precision(a, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _fold_heads(a: Array) -> Array:
  """[B, T, N, D] -> [B*N, T, D] (a bitcast when N == 1)."""
  b, t, n, d = a.shape
  return a.transpose(0, 2, 1, 3).reshape(b * n, t, d)


def _unfold_heads(a: Array, n: int) -> Array:
  """[B*N, T, D] -> [B, T, N, D]."""
  bn, t, d = a.shape
  return a.reshape(bn // n, n, t, d).transpose(0, 2, 1, 3)


def _attention_fwd(q, k, v):
  n = q.shape[2]
  scale = q.shape[-1] ** -0.5
  q3, k3, v3 = _fold_heads(q), _fold_heads(k), _fold_heads(v)
  s = jnp.einsum("btd,bsd->bts", q3 * scale, k3, preferred_element_type=jnp.float32)
  p = jax.nn.softmax(s, axis=-1)
  o3 = jnp.einsum("bts,bsd->btd", p.astype(v.dtype), v3)
  return _unfold_heads(o3, n), (q3, k3, v3, p, o3)


def _attention_bwd(res, do):
  q3, k3, v3, p, o3 = res
  n = do.shape[2]
  scale = q3.shape[-1] ** -0.5
  do3 = _fold_heads(do)
  dv_t = jnp.einsum("btd,bts->bds", do3, p.astype(do.dtype))
  dp = jnp.einsum("btd,bsd->bts", do3, v3, preferred_element_type=jnp.float32)
  delta = jnp.sum(do3.astype(jnp.float32) * o3.astype(jnp.float32), axis=-1)
  ds = (p * (dp - delta[..., None])).astype(q3.dtype)
  dq = jnp.einsum("bts,bsd->btd", ds, k3) * scale
  dk_t = jnp.einsum("btd,bts->bds", q3, ds) * scale
  dq, dk, dv = (_unfold_heads(a, n) for a in (dq, dk_t.transpose(0, 2, 1), dv_t.transpose(0, 2, 1)))
  return dq.astype(q3.dtype), dk.astype(k3.dtype), dv.astype(v3.dtype)


attention.defvjp(_attention_fwd, _attention_bwd)


def attention_plain(q: Array, k: Array, v: Array) -> Array:
  """`attention` with JAX's own derivatives (forward mode works too); the same numbers."""
  return _attention_primal(q, k, v)


class QKVProjection(nn.Module):
  """q, k, v = x W[:, :C] + b[:C], x W[:, C:2C] + b[C:2C], x W[:, 2C:] + b[2C:] for x [..., Cin].

  The parameters of `nn.Dense(3C)` (kernel [Cin, 3C], bias [3C]), applied as three GEMMs on
  slices of the kernel rather than one GEMM split afterwards: the gradient of the split
  would stitch dq, dk, dv back into one [..., 3C] array, a strided copy that XLA:CPU runs
  slower than the projection itself (5 of them cost ~0.17 s per big-U-Net train step).
  The GEMMs run on x flattened to [N, Cin]: differentiated over a [B, T, Cin] input, XLA:CPU
  fed each weight gradient a transposed copy of the output gradient ([C, B*T], often with
  GroupNorm's backward recomputed inside it in transposed order); on 2-D operands the
  weight gradient's dot reads both as they are (small U-Net train step 2-3% faster).
  """

  features: int  # C, the width of each of q, k, v
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    c = self.features
    kernel = self.param("kernel", default_init, (x.shape[-1], 3 * c), self.param_dtype).astype(self.dtype)
    bias = self.param("bias", zeros_init, (3 * c,), self.param_dtype).astype(self.dtype)
    x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    return tuple((x2 @ kernel[:, i * c:(i + 1) * c] + bias[i * c:(i + 1) * c]).reshape(*x.shape[:-1], c)
                 for i in range(3))


class AttentionBlock(nn.Module):
  """Self-attention over the H*W positions: GN, qkv Dense, softmax(q k^T / sqrt(d)) v, Dense.

  q, k and v come from one Dense(3C) (the same as three Dense(C) with bias; kernel
  columns are [q | k | v]). `num_heads=1` is DDPM's single head spanning all channels.
  Output = x + out_proj(attention).
  """

  num_heads: int = 1
  num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # hand-written gradients of GroupNorm and attention (see GroupNorm)
  out_kernel_init: Any = zeros_init  # the output projection's init (zero: the block starts as identity)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise InputError(f"AttentionBlock: x.shape[-1]={c} is not divisible by "
                       f"num_heads={self.num_heads}; use a divisor of {c}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.num_groups, self.norm_eps, custom_vjp=self.custom_vjp, name="norm", **kw)(x)
    q, k, v = QKVProjection(c, name="qkv", **kw)(h)
    q, k, v = (a.reshape(b, height * width, self.num_heads, c // self.num_heads) for a in (q, k, v))
    h = (attention if self.custom_vjp else attention_plain)(q, k, v)
    # [B*H*W, C], not [B, H, W, C]: see QKVProjection (the same holds for nn.Dense)
    h = nn.Dense(c, kernel_init=self.out_kernel_init, name="out_proj", **kw)(h.reshape(b * height * width, c))
    return x + h.reshape(x.shape)


class Downsample(nn.Module):
  """Conv3x3 with stride 2 after padding (0, 1) on H and W (TF 'SAME' for even sizes)."""

  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # `conv2d`'s GEMM weight gradient; False: plain conv (forward mode)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C]."""
    return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), kernel_init=default_init,
                dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp, name="conv")(x)


def upsample_conv3x3(x: Array, kernel: Array, conv=conv2d) -> Array:
  """`conv3x3(nearest_upsample_2x(x), kernel)` (zero padding 1), computed on x's own grid.

  In the 2x nearest-upsampled map, output pixel (2i + a, 2j + b) sees only rows
  {i - 1, i} (a = 0) or {i, i + 1} (a = 1) of x, and likewise for columns, so the 3x3 conv
  is four 2x2 convs on x, one per phase (a, b), whose kernels are sums of the 3x3 taps
  (row a = 0: [w0, w1 + w2]; a = 1: [w0 + w1, w2]). That is 4/9 of the FLOPs, and the
  upsampled map is never built: on XLA:CPU the forward of the small U-Net's 32x32
  upsampling conv takes 11 instead of 22 ms (B=64) and forward + backward 87 instead of
  124 ms; the big U-Net's (B=16, 256 channels) 35-48 vs 71-75 ms and 150 vs 275 ms. The
  same numbers up to float rounding (the tap sums). `conv(x, kernel, strides, padding)` is
  `conv2d` or `conv2d_plain`; x [B, H, W, Cin], kernel [3, 3, Cin, Cout] -> [B, 2H, 2W, Cout].
  """
  b, h, w, _ = x.shape
  if kernel.shape[:2] != (3, 3):
    raise InputError(f"upsample_conv3x3: kernel.shape={kernel.shape} must be [3, 3, Cin, Cout].")
  taps = (lambda k: (k[0], k[1] + k[2]), lambda k: (k[0] + k[1], k[2]))  # phase 0, 1 -> 2 taps
  pads = ((1, 0), (0, 1))  # phase 0 reads index i - 1 and i, phase 1 i and i + 1
  rows = []
  for a in range(2):
    k_rows = jnp.stack(taps[a](kernel))  # [2, 3, Cin, Cout]
    phases = []
    for c in range(2):
      k = jnp.stack(taps[c](jnp.moveaxis(k_rows, 1, 0)), axis=1)  # [2, 2, Cin, Cout]
      phases.append(conv(x, k, (1, 1), (pads[a], pads[c])))
    rows.append(jnp.stack(phases, axis=3))  # [B, H, W, 2 (b), Cout]
  y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), Cout]
  return y.reshape(b, 2 * h, 2 * w, y.shape[-1])


class UpsampleConv(nn.Module):
  """`Conv(features)` (3x3, padding 1, bias) applied to x upsampled 2x (nearest), computed by
  `upsample_conv3x3`; the parameters of that `Conv` (`kernel` [3, 3, Cin, features], `bias`)."""

  features: int
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # `conv2d` (CPU-friendly gradients); False: `conv2d_plain` (forward mode)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, Cin] -> [B, 2H, 2W, features] in `dtype`."""
    if x.ndim != 4:
      raise InputError(f"UpsampleConv: x.shape={x.shape} must be [B, H, W, C] (NHWC).")
    kernel = self.param("kernel", default_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", zeros_init, (self.features,), self.param_dtype)
    fn = conv2d if self.custom_vjp else conv2d_plain
    # The tap sums in the parameter dtype, then the compute dtype (bf16 sums would round more).
    y = upsample_conv3x3(x.astype(self.dtype), kernel,
                         conv=lambda x, k, s, p: fn(x, k.astype(self.dtype), s, p))
    return y + bias.astype(self.dtype)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling, then conv3x3 (as one `UpsampleConv`, named "conv")."""

  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # `conv2d`'s CPU-friendly gradients; False: plain conv (forward mode)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C]."""
    return UpsampleConv(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                        custom_vjp=self.custom_vjp, name="conv")(x)
