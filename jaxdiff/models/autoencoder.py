"""AutoencoderKL, the VAE of latent diffusion (Rombach et al. 2022), in flax linen with NHWC images.

  encode: x [B, H, W, C] in [-1, 1] -> mean, logvar [B, H/f, W/f, latent_channels]
          (f = 2 ** (len(block_out_channels) - 1); Stable Diffusion's VAE: f = 8, 4 channels)
  decode: z [B, H/f, W/f, latent_channels] -> x [B, H, W, out_channels]

  Encoder: conv_in, per level `layers_per_block` resnet blocks (+ a stride-2 conv but at the
           last level), mid (resnet, single-head self-attention, resnet), GN + SiLU, conv_out
           to 2 x latent_channels, then the 1x1 `quant_conv`: the mean and log-variance of q(z|x).
  Decoder: the 1x1 `post_quant_conv`, conv_in, mid, per level from the deepest
           `layers_per_block + 1` resnet blocks (+ nearest 2x upsampling and a conv but at the
           last), GN + SiLU, conv_out.

The blocks are the U-Net's (`layers.ResnetBlock` without a time input, `layers.AttentionBlock`,
`layers.Downsample`, `layers.Upsample`), so they share its fast CPU gradients. The parameter
layout follows diffusers' `AutoencoderKL`, which `convert_diffusers.load_diffusers_vae` reads
(e.g. stabilityai/sd-vae-ft-ema, the VAE of the DiT-XL/2 checkpoints).

A latent diffusion model runs on the scaled latents (`encode_latents` / `decode_latents`):

  vae_kwargs, vae_params = load_diffusers_vae("path/to/sd-vae-ft-ema")
  vae = AutoencoderKL(**vae_kwargs)
  z = encode_latents(vae, vae_params, images, key)       # scaling_factor * (sample - shift_factor)
  images = decode_latents(vae, vae_params, z)            # back to [-1, 1] (not clipped)
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import layers

Array = jax.Array
Dtype = Any


def _check_channels(owner: str, channels: Sequence[int], num_groups: int, layers_per_block: int) -> None:
  if not channels:
    raise ConfigError(f"{owner} block_out_channels=() is empty; give one width per level, e.g. (128, 256, 512, 512).")
  for c in channels:
    if c < 1 or c % num_groups:
      raise ConfigError(f"{owner} block_out_channels={tuple(channels)}: {c} is not a positive multiple of "
                        f"norm_num_groups={num_groups}; every level's width must be one.")
  if layers_per_block < 1:
    raise ConfigError(f"{owner} layers_per_block={layers_per_block} must be >= 1 (Stable Diffusion's VAE: 2).")


class _Mid(nn.Module):
  """resnet, single-head self-attention, resnet at the deepest level."""

  channels: int
  num_groups: int
  norm_eps: float
  attention: bool
  dtype: Dtype
  param_dtype: Dtype
  custom_vjp: bool

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kw = dict(num_groups=self.num_groups, norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
              custom_vjp=self.custom_vjp)
    h = layers.ResnetBlock(self.channels, name="res_0", **kw)(h, None, False)
    if self.attention:
      h = layers.AttentionBlock(num_heads=1, out_kernel_init=layers.default_init, name="attn", **kw)(h)
    return layers.ResnetBlock(self.channels, name="res_1", **kw)(h, None, False)


class _Coder(nn.Module):
  """The fields and layers the encoder and decoder share."""

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  num_groups: int = 32
  norm_eps: float = 1e-6
  mid_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True

  def _kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp)

  def _res(self, ch: int, name: str, h: Array) -> Array:
    return layers.ResnetBlock(ch, self.num_groups, self.norm_eps, name=name, **self._kw())(h, None, False)

  def _mid(self, h: Array) -> Array:
    return _Mid(h.shape[-1], self.num_groups, self.norm_eps, self.mid_attention, name="mid", **self._kw())(h)

  def _out(self, h: Array, channels: int) -> Array:
    """GN + SiLU, conv3x3 to `channels`."""
    h = layers.GroupNorm(self.num_groups, self.norm_eps, act=True, custom_vjp=self.custom_vjp, name="norm_out",
                         dtype=self.dtype, param_dtype=self.param_dtype)(h)
    return layers.Conv(channels, name="conv_out", **self._kw())(h)


class Encoder(_Coder):
  """x [B, H, W, C] -> [B, H/f, W/f, 2 * latent_channels] (mean and log-variance, before `quant_conv`)."""

  latent_channels: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chs = tuple(self.block_out_channels)
    h = layers.Conv(chs[0], name="conv_in", **self._kw())(x)
    for i, ch in enumerate(chs):
      for j in range(self.layers_per_block):
        h = self._res(ch, f"down_{i}_res_{j}", h)
      if i < len(chs) - 1:
        h = layers.Downsample(name=f"down_{i}_downsample", **self._kw())(h)
    return self._out(self._mid(h), 2 * self.latent_channels)


class Decoder(_Coder):
  """z [B, h, w, latent_channels] (after `post_quant_conv`) -> [B, h*f, w*f, out_channels]."""

  out_channels: int = 3

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chs = tuple(reversed(self.block_out_channels))
    h = self._mid(layers.Conv(chs[0], name="conv_in", **self._kw())(z))
    for i, ch in enumerate(chs):
      for j in range(self.layers_per_block + 1):
        h = self._res(ch, f"up_{i}_res_{j}", h)
      if i < len(chs) - 1:
        h = layers.Upsample(name=f"up_{i}_upsample", **self._kw())(h)
    return self._out(h, self.out_channels)


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder: `encode(x) -> (mean, logvar)`, `decode(z) -> x`.

  `__call__(x, key=None)` encodes, samples z (the mean when `key` is None), decodes and
  returns `(reconstruction, mean, logvar)`; `init` goes through it. Use `encode` / `decode`
  with `apply(..., method=...)`, or the `encode_latents` / `decode_latents` helpers.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)  # one width per level; f = 2 ** (levels - 1)
  layers_per_block: int = 2  # resnet blocks per encoder level (+1 per decoder level)
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  mid_attention: bool = True  # self-attention in the middle blocks (diffusers' mid_block_add_attention)
  use_quant_conv: bool = True  # the 1x1 conv after the encoder (SD3 / Flux VAEs have none)
  use_post_quant_conv: bool = True  # the 1x1 conv before the decoder
  scaling_factor: float = 0.18215  # latents = scaling_factor * (z - shift_factor) (SD 1/2, DiT)
  shift_factor: float = 0.0
  dtype: Dtype = jnp.float32  # compute dtype (GroupNorm statistics and softmax are float32)
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # the U-Net blocks' hand-written gradients; False: forward mode works too

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(tuple(self.block_out_channels)) - 1)

  def setup(self) -> None:
    _check_channels("AutoencoderKL", tuple(self.block_out_channels), self.norm_num_groups, self.layers_per_block)
    if min(self.in_channels, self.out_channels, self.latent_channels) < 1:
      raise ConfigError(f"AutoencoderKL in_channels={self.in_channels}, out_channels={self.out_channels} and "
                        f"latent_channels={self.latent_channels} must all be >= 1.")
    kw = dict(num_groups=self.norm_num_groups, norm_eps=self.norm_eps, mid_attention=self.mid_attention,
              dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp,
              block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block)
    ckw = dict(kernel_size=(1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, param_dtype=self.param_dtype,
               custom_vjp=self.custom_vjp)
    self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    self.quant_conv = layers.Conv(2 * self.latent_channels, **ckw) if self.use_quant_conv else None
    self.post_quant_conv = layers.Conv(self.latent_channels, **ckw) if self.use_post_quant_conv else None

  def _check(self, what: str, a: Array, channels: int, multiple: int, fix: str) -> None:
    if a.ndim != 4 or a.shape[-1] != channels or a.shape[1] % multiple or a.shape[2] % multiple:
      raise InputError(f"AutoencoderKL.{what}: {'x' if what == 'encode' else 'z'}.shape={tuple(a.shape)} must be "
                       f"[B, H, W, {channels}] (NHWC) with H and W multiples of {multiple}; {fix}.")

  def encode(self, x: Array) -> tuple[Array, Array]:
    """x [B, H, W, in_channels] in [-1, 1] -> (mean, logvar) of q(z|x), each [B, H/f, W/f, latent_channels].

    logvar is clipped to [-30, 20], as diffusers' DiagonalGaussianDistribution does.
    """
    f = self.downsampling_factor
    self._check("encode", x, self.in_channels, f,
                f"pad or resize the images to multiples of {f} (the VAE downsamples {f}x)")
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """z [B, h, w, latent_channels] (unscaled) -> [B, h*f, w*f, out_channels]."""
    self._check("decode", z, self.latent_channels, 1, "pass latents with the VAE's latent_channels")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, Array, Array]:
    mean, logvar = self.encode(x)
    return self.decode(sample_posterior(mean, logvar, key)), mean, logvar


def sample_posterior(mean: Array, logvar: Array, key: Array | None) -> Array:
  """z ~ N(mean, exp(logvar)) (reparameterised, differentiable in mean and logvar); the mean when `key` is None."""
  return mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent's elements: [B]."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def encode_latents(vae: AutoencoderKL, params: Any, x: Array, key: Array | None = None) -> Array:
  """Images [B, H, W, C] in [-1, 1] -> diffusion latents `scaling_factor * (z - shift_factor)`.

  z is a sample of q(z|x) with `key`, its mean without one (deterministic latents).
  """
  mean, logvar = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
  return vae.scaling_factor * (sample_posterior(mean, logvar, key) - vae.shift_factor)


def decode_latents(vae: AutoencoderKL, params: Any, latents: Array) -> Array:
  """Diffusion latents (scaled, as `encode_latents` gives them) -> images [B, H, W, C] in about [-1, 1]."""
  z = latents / vae.scaling_factor + vae.shift_factor
  return vae.apply({"params": params}, z, method=AutoencoderKL.decode)
