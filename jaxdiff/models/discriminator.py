"""The patch discriminator of latent diffusion's autoencoder (Esser et al. 2021; Rombach et al. 2022).

pix2pix's "NLayerDiscriminator" (Isola et al. 2017), which LDM trains against its KL
autoencoders: 4x4 convolutions, `num_layers` of them with stride 2 and two with stride 1, each
followed by a normalisation and LeakyReLU(0.2) (the first has no normalisation), ending in one
logit per patch:

  images [B, H, W, C] -> logits [B, h, w, 1]

The widths are `features * min(2^n, 8)`. Each logit sees a patch of 34x34 pixels (two layers)
or 70x70 (three): the objective judges local texture, and the L1 / perceptual terms keep the
global structure. `patch_grid` gives the output's side.

The normalisation is GroupNorm (per example, no running statistics) where pix2pix and LDM use
BatchNorm: a train step stays a pure function of (parameters, batch), and the discriminator
judges each image on its own. Convolutions start as N(0, 0.02^2), pix2pix's init.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError, InputError

Dtype = Any


def patch_grid(side: int, num_layers: int) -> int:
  """The side of the logit grid for images of side `side`: num_layers convolutions k=4, s=2,
  p=1 (side -> floor(side / 2)), then two with s=1 (side -> side - 1 each)."""
  for _ in range(num_layers):
    side //= 2
  return side - 2


class PatchDiscriminator(nn.Module):
  """`images [B, H, W, C] -> logits [B, h, w, 1]` (`h = patch_grid(H, num_layers)`)."""

  features: int = 64  # width of the first convolution (LDM: 64)
  num_layers: int = 3  # stride-2 convolutions (LDM: 3; 2 for 28x28 images)
  num_groups: int = 32  # GroupNorm groups (capped at the first normalised layer's width)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def widths(self) -> tuple[int, ...]:
    return tuple(self.features * min(2 ** n, 8) for n in range(self.num_layers + 1))

  def _groups(self) -> int:
    return min(self.num_groups, self.widths()[1])

  def check(self) -> None:
    if self.features < 1 or self.num_layers < 1:
      raise ConfigError(f"PatchDiscriminator features={self.features} and num_layers={self.num_layers} must be "
                        f">= 1 (config.loss.disc_features, config.loss.disc_layers; LDM: 64 and 3).")
    if self.widths()[1] % self._groups():
      raise ConfigError(f"PatchDiscriminator features={self.features}: the normalised widths {self.widths()[1:]} "
                        f"must be multiples of {self._groups()} GroupNorm groups; use a multiple of "
                        f"{self._groups()} (config.loss.disc_features).")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    self.check()
    if x.ndim != 4 or patch_grid(min(x.shape[1:3]), self.num_layers) < 1:
      raise InputError(f"PatchDiscriminator: x.shape={tuple(x.shape)} must be [B, H, W, C] with H, W >= "
                       f"{3 * 2 ** self.num_layers} for num_layers={self.num_layers}; "
                       f"use fewer layers (config.loss.disc_layers) for small images.")
    init = nn.initializers.normal(0.02)
    conv = lambda ch, stride, bias, name: nn.Conv(  # noqa: E731
        ch, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias, kernel_init=init, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    widths = self.widths()
    h = nn.leaky_relu(conv(widths[0], 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
    for n in range(1, self.num_layers + 1):
      h = conv(widths[n], 2 if n < self.num_layers else 1, False, f"conv_{n}")(h)
      h = nn.GroupNorm(self._groups(), epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                       name=f"norm_{n}")(h.astype(jnp.float32))
      h = nn.leaky_relu(h, 0.2).astype(self.dtype)
    return conv(1, 1, True, "conv_out")(h).astype(jnp.float32)
