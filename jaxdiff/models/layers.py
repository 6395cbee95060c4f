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

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import InputError

Array = jax.Array
Dtype = Any

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros


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


class GroupNorm(nn.Module):
  """Group normalisation over [B, H, W, C] (any rank >= 2, channels last), in float32.

  Mean and variance come from one pass over the [..., G, C/G] view (E[x^2] - E[x]^2); the
  scale and shift are folded into one per-(example, channel) multiply-add, so the
  normalisation (and an optional following SiLU) is a single elementwise pass.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  act: bool = False  # apply SiLU after the affine transform
  dtype: Dtype = jnp.float32  # output dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    g = self.num_groups
    if c % g:
      raise InputError(
          f"GroupNorm: x.shape[-1]={c} is not divisible by num_groups={g}; use a divisor of {c}.")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    b = x.shape[0]
    spatial = x.shape[1:-1]
    xg = x.astype(jnp.float32).reshape(b, -1, g, c // g)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)  # [B, 1, G, 1]
    mean_sq = jnp.mean(jnp.square(xg), axis=(1, 3), keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + self.epsilon)
    a = inv * scale.astype(jnp.float32).reshape(1, 1, g, c // g)  # [B, 1, G, C/G]
    shift = bias.astype(jnp.float32).reshape(1, 1, g, c // g) - mean * a
    y = (xg * a + shift).reshape(b, *spatial, c)
    if self.act:
      y = nn.silu(y)
    return y.astype(self.dtype)


class ResnetBlock(nn.Module):
  """DDPM residual block: GN, SiLU, conv3x3, + Dense(SiLU(temb)), GN, SiLU, Dropout, conv3x3.

  The shortcut is a 1x1 conv when the channel count changes. Output = shortcut + h.
  """

  out_ch: int  # output channels
  num_groups: int = 32
  norm_eps: float = 1e-6
  dropout: float = 0.0
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    """x [B, H, W, Cin], temb [B, D] -> [B, H, W, out_ch]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: GroupNorm(  # noqa: E731
        self.num_groups, self.norm_eps, act=True, name=name, **kw)
    h = norm("norm_0")(x)
    h = nn.Conv(self.out_ch, (3, 3), padding=((1, 1), (1, 1)), kernel_init=default_init,
                name="conv_0", **kw)(h)
    h = h + nn.Dense(self.out_ch, kernel_init=default_init, name="temb_proj",
                     **kw)(nn.silu(temb))[:, None, None, :]
    h = norm("norm_1")(h)
    if self.dropout > 0.0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), padding=((1, 1), (1, 1)), kernel_init=zeros_init,
                name="conv_1", **kw)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), kernel_init=default_init, name="shortcut", **kw)(x)
    return x + h


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

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise InputError(f"AttentionBlock: x.shape[-1]={c} is not divisible by "
                       f"num_heads={self.num_heads}; use a divisor of {c}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.num_groups, self.norm_eps, name="norm", **kw)(x)
    qkv = nn.Dense(3 * c, kernel_init=default_init, name="qkv", **kw)(h)
    qkv = qkv.reshape(b, height * width, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, D] each
    h = jax.nn.dot_product_attention(q, k, v)
    h = h.reshape(b, height, width, c)
    h = nn.Dense(c, kernel_init=zeros_init, name="out_proj", **kw)(h)
    return x + h


class Downsample(nn.Module):
  """Conv3x3 with stride 2 after padding (0, 1) on H and W (TF 'SAME' for even sizes)."""

  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C]."""
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                   kernel_init=default_init, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling, then conv3x3."""

  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C]."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), kernel_init=default_init,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
