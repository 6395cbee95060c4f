"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

One module, `NCSNpp`, covers both networks of score_sde's `models/ncsnpp.py`; they differ
only in their fields:

* NCSN++ (VE SDE): BigGAN-style residual blocks that resample inside the block, FIR
  (finite impulse response, [1, 3, 3, 1]) up/downsampling, residual blocks rescaled by
  1/sqrt(2), a "residual" input pyramid, and Gaussian Fourier features of log(sigma) as the
  noise embedding. `NCSNpp()` with its defaults is score_sde's CIFAR-10 NCSN++
  (`configs/ve/cifar10_ncsnpp_continuous.py`).
* DDPM++ (VP / sub-VP SDE): the same BigGAN blocks and rescaling, without FIR and without
  pyramids, with DDPM's sinusoidal embedding of the timestep: `NCSNpp(**DDPMPP_CIFAR10)`.

Layout (C_l = ch * ch_mult[l]; every residual block gets the noise embedding):

  [Fourier(log t) or sinusoidal(t)] -> Dense(4 ch), SiLU, Dense(4 ch)
  conv_in -> for each level l: num_res_blocks x [ResBlock(C_l) (+ attention)],
                               then (not at the last level) a downsampling ResBlock
                               (resblock_type='biggan') or Downsample ('ddpm'),
                               joined by the input pyramid (progressive_input)
          -> mid: ResBlock, attention, ResBlock
          -> for each level, last to first: (num_res_blocks + 1) x [concat skip, ResBlock(C_l)],
                               attention once (at attn_resolutions), the output pyramid
                               (progressive), then an upsampling ResBlock or Upsample
          -> GroupNorm, SiLU, conv3x3 (unless progressive='output_skip', whose pyramid is the output)

GroupNorm uses min(C // 4, 32) groups, as in score_sde. Initialisation follows score_sde:
variance scaling (fan_avg, uniform) with scale 1 for every kernel, zero biases, and
`init_scale` (0: zero) for the last layer of every residual branch and the output conv.

jaxdiff's processes give the network `process.noise_cond(t)`: sigma for VE (so
`embedding_type='fourier'` embeds log(sigma), as score_sde does) and 999 t for VP / sub-VP
(the sinusoidal embedding of score_sde's continuous DDPM++). score_sde's `scale_by_sigma`
(the output divided by sigma) is `loss.prediction='eps'` here: the score is -eps / sigma.
`jaxdiff.models.convert_score_sde` loads score_sde's checkpoints (JAX and PyTorch) into this module.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError
from jaxdiff.models import layers
from jaxdiff.models.unet import add_label_embedding, check_image_inputs

Array = jax.Array
Dtype = Any

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def scaled_init(scale: float):
  """score_sde's `default_init(scale)`: variance scaling (fan_avg, uniform); scale 0 -> 1e-10."""
  return nn.initializers.variance_scaling(scale if scale else 1e-10, "fan_avg", "uniform")


def groups_for(channels: int) -> int:
  """score_sde's GroupNorm group count, min(C // 4, 32)."""
  return max(1, min(channels // 4, 32))


# ----- FIR resampling (upfirdn) -----
#
# `upfirdn(x, k, up, down, pad)` upsamples x by inserting up - 1 zeros after every sample,
# pads it, convolves it with the filter k and keeps every down-th sample, on H and W. The
# filters here are separable (outer(k1, k1) / sum(k1)^2), so each axis is one 1-D pass,
# written as a sum of strided slices: elementwise work that XLA fuses, with no depthwise
# convolution (XLA:CPU runs those slowly).


def _fir_1d(x: Array, k1: np.ndarray, axis: int, up: int, down: int, pad: tuple[int, int]) -> Array:
  """One axis of `upfirdn`: zero-insert, pad, convolve with the 1-D filter k1, decimate."""
  n = x.shape[axis]
  cfg = [(0, 0, 0)] * x.ndim
  cfg[axis] = (pad[0], pad[1] + up - 1, up - 1)  # up - 1 zeros after every sample (incl. the last)
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
  taps = len(k1)
  length = n * up + pad[0] + pad[1] - taps + 1
  n_out = (length - 1) // down + 1
  kf = k1[::-1]  # convolution, not correlation (matters for asymmetric filters only)
  out = None
  for j in range(taps):
    if kf[j] == 0:
      continue
    s = jax.lax.slice_in_dim(xp, j, j + (n_out - 1) * down + 1, stride=down, axis=axis)
    term = s * jnp.asarray(kf[j], x.dtype)
    out = term if out is None else out + term
  return out


def fir_filter_1d(fir_kernel: Sequence[float]) -> np.ndarray:
  """The normalised 1-D FIR filter k / sum(k); the 2-D filter is its outer product."""
  k = np.asarray(fir_kernel, np.float64)
  if k.ndim != 1 or k.size < 1 or k.sum() == 0:
    raise ConfigError(f"fir_kernel={tuple(fir_kernel)} must be a non-empty 1-D filter with a non-zero sum, "
                      f"e.g. (1, 3, 3, 1).")
  return k / k.sum()


def upfirdn(x: Array, fir_kernel: Sequence[float], *, up: int = 1, down: int = 1,
            pad: tuple[int, int] = (0, 0), gain: float = 1.0) -> Array:
  """Upsample (zero insertion), pad, FIR-filter and downsample x [B, H, W, C] on H and W.

  The filter is outer(k, k) / sum(k)^2 times `gain`; upsampling by `up` needs gain up^2 to
  keep the mean. `pad` is the (before, after) zero padding of each axis after upsampling.
  """
  k1 = fir_filter_1d(fir_kernel) * math.sqrt(gain)
  for axis in (1, 2):
    x = _fir_1d(x, k1, axis, up, down, pad)
  return x


def fir_upsample(x: Array, fir_kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
  """[B, H, W, C] -> [B, 2H, 2W, C]: zero insertion, then the FIR filter (gain factor^2)."""
  p = len(fir_kernel) - factor
  return upfirdn(x, fir_kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2), gain=factor**2)


def fir_downsample(x: Array, fir_kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> Array:
  """[B, H, W, C] -> [B, H/2, W/2, C]: the FIR filter, then every second sample."""
  p = len(fir_kernel) - factor
  return upfirdn(x, fir_kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling of [B, H, W, C] by `factor`."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


def naive_downsample(x: Array, factor: int = 2) -> Array:
  """Average pooling of [B, H, W, C] over factor x factor blocks."""
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FIRConv(nn.Module):
  """3x3 conv (bias) fused with a 2x FIR resampling: score_sde's `up_or_down_sampling.Conv2d`.

  `up`: a stride-2 transposed convolution, then the FIR filter (the same map as FIR
  upsampling followed by the conv). `down`: the FIR filter, then a stride-2 convolution.
  Parameters as `layers.Conv` (`kernel` [3, 3, Cin, features], `bias`).
  """

  features: int
  up: bool = False
  down: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up == self.down:
      raise ConfigError("FIRConv needs exactly one of up=True or down=True.")
    kernel = self.param("kernel", layers.default_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", layers.zeros_init, (self.features,), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    taps, factor, kw = len(self.fir_kernel), 2, 3
    if self.up:
      # The transposed conv: x with one zero between samples, padded by kw - 1, correlated
      # with the kernel: [B, 2H + 1, 2W + 1, features].
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((kw - 1, kw - 1), (kw - 1, kw - 1)),
                                       lhs_dilation=(factor, factor), dimension_numbers=layers._CONV_DN)
      p = (taps - factor) - (kw - 1)
      y = upfirdn(y, self.fir_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), gain=factor**2)
    else:
      p = (taps - factor) + (kw - 1)
      y = upfirdn(x, self.fir_kernel, pad=((p + 1) // 2, p // 2))
      conv = layers.conv2d if self.custom_vjp else layers.conv2d_plain
      y = conv(y, kernel, (factor, factor), ((0, 0), (0, 0)))
    return y + bias.astype(self.dtype)


class Resample(nn.Module):
  """score_sde's standalone `Upsample` / `Downsample` (2x), with or without a conv and FIR.

  Without FIR: nearest-neighbour upsampling (+ conv3x3), or a stride-2 conv3x3 after
  (0, 1) padding / 2x2 average pooling. With FIR: `fir_upsample` / `fir_downsample`, or
  `FIRConv`. `features` (default: the input's) is the conv's output width.
  """

  up: bool
  with_conv: bool = True
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp)
    out = self.features or x.shape[-1]
    if not self.with_conv:
      if self.fir:
        return fir_upsample(x, self.fir_kernel) if self.up else fir_downsample(x, self.fir_kernel)
      return naive_upsample(x) if self.up else naive_downsample(x)
    if self.fir:
      return FIRConv(out, up=self.up, down=not self.up, fir_kernel=self.fir_kernel, name="conv", **kw)(x)
    if self.up:
      return layers.UpsampleConv(out, name="conv", **kw)(x)
    return layers.Conv(out, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="conv", **kw)(x)


class ResnetBlockpp(nn.Module):
  """score_sde's `ResnetBlockBigGANpp` (kind='biggan') and `ResnetBlockDDPMpp` (kind='ddpm').

  GN, SiLU, [2x resampling of h and x: biggan only], conv3x3, + Dense(SiLU(temb)), GN, SiLU,
  Dropout, conv3x3 (init `init_scale`); the shortcut is a 1x1 conv when the width changes (or,
  for biggan, when resampling). Output (x + h), divided by sqrt(2) with `skip_rescale`.
  """

  out_ch: int
  kind: str = "biggan"  # biggan | ddpm
  up: bool = False
  down: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dropout: float = 0.0
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ckw = dict(kw, custom_vjp=self.custom_vjp)
    in_ch = x.shape[-1]
    h = layers.GroupNorm(groups_for(in_ch), 1e-6, act=True, name="norm_0", **ckw)(x)
    if self.up or self.down:
      if self.fir:
        resample = (lambda a: fir_upsample(a, self.fir_kernel)) if self.up else (
            lambda a: fir_downsample(a, self.fir_kernel))
      else:
        resample = naive_upsample if self.up else naive_downsample
      h, x = resample(h), resample(x.astype(self.dtype))
    h = layers.Conv(self.out_ch, kernel_init=layers.default_init, name="conv_0", **ckw)(h)
    h = h + nn.Dense(self.out_ch, kernel_init=layers.default_init, name="temb_proj",
                     **kw)(nn.silu(temb))[:, None, None, :]
    h = layers.GroupNorm(groups_for(self.out_ch), 1e-6, act=True, name="norm_1", **ckw)(h)
    if self.dropout > 0.0:
      h = layers.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.Conv(self.out_ch, kernel_init=scaled_init(self.init_scale), name="conv_1", **ckw)(h)
    if in_ch != self.out_ch or self.up or self.down:
      x = layers.Conv(self.out_ch, (1, 1), padding=((0, 0), (0, 0)), kernel_init=layers.default_init,
                      name="shortcut", **ckw)(x)
    out = x + h
    return out * _INV_SQRT2 if self.skip_rescale else out


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++: `__call__(x [B,H,W,C], t [B], y [B] = None, *, train) -> [B,H,W,out_channels]`.

  The defaults are score_sde's CIFAR-10 NCSN++ (VE, continuous): 62,758,915 parameters, 128 of them
  the fixed Fourier frequencies (DDPM++, `DDPMPP_CIFAR10`: 61,804,419).
  """

  ch: int = 128  # base channels (score_sde's nf); the noise embedding MLP is 4 * ch wide
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)  # feature-map sizes that get self-attention
  dropout: float = 0.1
  resblock_type: str = "biggan"  # biggan (resampling inside residual blocks) | ddpm
  resamp_with_conv: bool = True  # resblock_type='ddpm': conv in the Upsample / Downsample layers
  fir: bool = True  # FIR up/downsampling (else nearest / average pooling)
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True  # residual sums divided by sqrt(2)
  progressive: str = "none"  # output pyramid: none | output_skip | residual
  progressive_input: str = "residual"  # input pyramid: none | input_skip | residual
  progressive_combine: str = "sum"  # input_skip join: sum | cat
  embedding_type: str = "fourier"  # fourier (features of log t; t = VE's sigma) | positional (DDPM's)
  fourier_scale: float = 16.0  # std of the (fixed) Gaussian Fourier frequencies
  init_scale: float = 0.0  # init scale of the last layer of each residual branch and the output conv
  center_input: bool = False  # x -> 2x - 1 first (score_sde's networks on data in [0, 1])
  out_channels: int | None = None  # default: the input's channels
  num_classes: int = 0  # >0: class-conditional (a label embedding added to the noise embedding)
  dtype: Any = jnp.float32  # compute dtype (GroupNorm statistics are always float32)
  param_dtype: Any = jnp.float32
  remat: bool = False  # jax.checkpoint each residual / attention block
  custom_vjp: bool = True  # hand-written gradients (fast on XLA:CPU); False: plain ops (forward mode too)

  def _check_config(self) -> None:
    choices = dict(resblock_type=("biggan", "ddpm"), progressive=("none", "output_skip", "residual"),
                   progressive_input=("none", "input_skip", "residual"), progressive_combine=("sum", "cat"),
                   embedding_type=("fourier", "positional"))
    for key, valid in choices.items():
      if getattr(self, key) not in valid:
        raise ConfigError(f"NCSNpp {key}={getattr(self, key)!r} is not known; use one of {', '.join(valid)}.")
    if not self.ch_mult:
      raise ConfigError(f"NCSNpp ch_mult={tuple(self.ch_mult)} is empty; give at least one level, e.g. (1, 2, 2, 2).")
    if self.ch < 2 or self.ch % 2:
      raise ConfigError(f"NCSNpp ch={self.ch} must be even and >= 2 (the sinusoidal embedding is ch wide).")
    if self.num_res_blocks < 1:
      raise ConfigError(f"NCSNpp num_res_blocks={self.num_res_blocks} must be >= 1 (score_sde: 4; deep: 8).")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"NCSNpp dropout={self.dropout} is outside [0, 1); use e.g. 0.1.")
    if self.num_classes < 0:
      raise ConfigError(f"NCSNpp num_classes={self.num_classes} is negative; use 0 (unconditional) or the "
                        f"number of classes.")
    fir_filter_1d(self.fir_kernel)
    if self.fir and len(self.fir_kernel) < 2:
      raise ConfigError(f"NCSNpp fir_kernel={tuple(self.fir_kernel)} needs at least 2 taps for 2x resampling.")

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
    """Predicts the network output (eps for jaxdiff's 'eps' prediction) for noisy images.

    Args:
      x: [B, H, W, C] images; H and W divisible by 2**(len(ch_mult)-1).
      t: [B] (or scalar) float conditioning input: VE's sigma (> 0) for the Fourier
        embedding, which takes its log; e.g. 999 t for the positional one.
      y: [B] int class labels in [0, num_classes] (num_classes = the null label) or None.
      train: enables dropout (the 'dropout' rng collection).
    """
    self._check_config()
    t = check_image_inputs("NCSNpp", x, t, len(self.ch_mult))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ckw = dict(kw, custom_vjp=self.custom_vjp)
    block_cls = nn.remat(ResnetBlockpp, static_argnums=(3,)) if self.remat else ResnetBlockpp
    attn_cls = nn.remat(layers.AttentionBlock) if self.remat else layers.AttentionBlock
    biggan = self.resblock_type == "biggan"

    def resnet(h, out_ch, name, up=False, down=False):
      block = block_cls(out_ch, kind=self.resblock_type, up=up, down=down, fir=self.fir,
                        fir_kernel=tuple(self.fir_kernel), dropout=self.dropout,
                        skip_rescale=self.skip_rescale, init_scale=self.init_scale, name=name, **ckw)
      return block(h, temb, train)

    def attention(h, name):
      out = attn_cls(num_heads=1, num_groups=groups_for(h.shape[-1]), norm_eps=1e-6,
                     out_kernel_init=scaled_init(self.init_scale), name=name, **ckw)(h)
      return out * _INV_SQRT2 if self.skip_rescale else out  # AttentionBlock returns x + h

    def resample(h, up, name, with_conv, features=None):
      return Resample(up=up, with_conv=with_conv, fir=self.fir, fir_kernel=tuple(self.fir_kernel),
                      features=features, name=name, **ckw)(h)

    def rescaled_sum(a, b):
      return (a + b) * _INV_SQRT2 if self.skip_rescale else a + b

    # Noise embedding.
    if self.embedding_type == "fourier":
      freqs = self.param("fourier_freqs", nn.initializers.normal(self.fourier_scale), (self.ch,),
                         self.param_dtype)
      # Fixed random features: no gradient (and so no Adam update).
      proj = jnp.log(t.astype(jnp.float32))[:, None] * jax.lax.stop_gradient(freqs.astype(jnp.float32))
      proj = proj * (2 * np.pi)
      temb = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
    else:
      temb = layers.timestep_embedding(t, self.ch)
    temb = layers.TimeEmbedding(4 * self.ch, name="time_embed", **kw)(temb)
    temb = add_label_embedding("NCSNpp", temb, y, x.shape[0], self.num_classes, **kw)

    in_channels = x.shape[-1]
    if self.center_input:
      x = 2.0 * x - 1.0
    pyramid_in = x if self.progressive_input != "none" else None
    h = layers.Conv(self.ch, kernel_init=layers.default_init, name="conv_in", **ckw)(x)
    skips = [h]
    levels = len(self.ch_mult)
    for level, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = resnet(h, self.ch * mult, f"down_{level}_res_{j}")
        if h.shape[2] in self.attn_resolutions:
          h = attention(h, f"down_{level}_attn_{j}")
        skips.append(h)
      if level == levels - 1:
        continue
      if biggan:
        h = resnet(h, h.shape[-1], f"down_{level}_downsample", down=True)
      else:
        h = resample(h, False, f"down_{level}_downsample", self.resamp_with_conv)
      if self.progressive_input == "input_skip":
        pyramid_in = resample(pyramid_in, False, f"down_{level}_pyramid", with_conv=False)
        joined = layers.Conv(h.shape[-1], (1, 1), padding=((0, 0), (0, 0)), kernel_init=layers.default_init,
                             name=f"down_{level}_combine", **ckw)(pyramid_in)
        h = jnp.concatenate([joined, h], axis=-1) if self.progressive_combine == "cat" else joined + h
      elif self.progressive_input == "residual":
        pyramid_in = resample(pyramid_in, False, f"down_{level}_pyramid", with_conv=True, features=h.shape[-1])
        h = pyramid_in = rescaled_sum(pyramid_in, h)
      skips.append(h)

    h = resnet(h, h.shape[-1], "mid_res_0")
    h = attention(h, "mid_attn")
    h = resnet(h, h.shape[-1], "mid_res_1")

    out_channels = self.out_channels or in_channels
    pyramid = None
    for level in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * self.ch_mult[level], f"up_{level}_res_{j}")
      if h.shape[2] in self.attn_resolutions:
        h = attention(h, f"up_{level}_attn")
      if self.progressive != "none":
        name = f"up_{level}_pyramid"
        if level == levels - 1:
          p = layers.GroupNorm(groups_for(h.shape[-1]), 1e-6, act=True, name=f"{name}_norm", **ckw)(h)
          if self.progressive == "output_skip":
            pyramid = layers.Conv(out_channels, kernel_init=scaled_init(self.init_scale), name=f"{name}_conv",
                                  **ckw)(p)
          else:
            pyramid = layers.Conv(h.shape[-1], kernel_init=layers.default_init, name=f"{name}_conv", **ckw)(p)
        elif self.progressive == "output_skip":
          pyramid = resample(pyramid, True, f"{name}_up", with_conv=False)
          p = layers.GroupNorm(groups_for(h.shape[-1]), 1e-6, act=True, name=f"{name}_norm", **ckw)(h)
          pyramid = pyramid + layers.Conv(out_channels, kernel_init=scaled_init(self.init_scale),
                                          name=f"{name}_conv", **ckw)(p)
        else:
          pyramid = resample(pyramid, True, f"{name}_up", with_conv=True, features=h.shape[-1])
          h = pyramid = rescaled_sum(pyramid, h)
      if level != 0:
        if biggan:
          h = resnet(h, h.shape[-1], f"up_{level}_upsample", up=True)
        else:
          h = resample(h, True, f"up_{level}_upsample", self.resamp_with_conv)
    assert not skips

    if self.progressive == "output_skip":
      return pyramid.astype(self.dtype)
    h = layers.GroupNorm(groups_for(h.shape[-1]), 1e-6, act=True, name="norm_out", **ckw)(h)
    return layers.Conv(out_channels, kernel_init=scaled_init(self.init_scale), name="conv_out", **ckw)(h)


# score_sde's CIFAR-10 settings (configs/vp/cifar10_ddpmpp_continuous.py); NCSNpp's defaults are
# its NCSN++ (configs/ve/cifar10_ncsnpp_continuous.py).
DDPMPP_CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1,
                      resblock_type="biggan", fir=False, skip_rescale=True, progressive="none",
                      progressive_input="none", progressive_combine="sum", embedding_type="positional",
                      init_scale=0.0)
