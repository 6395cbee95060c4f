"""The DDPM U-Net (Ho et al. 2020), in flax linen with NHWC images.

`UNet()` with its defaults is the CIFAR-10 network of the paper, layer for layer the same as
diffusers' `UNet2DModel` built from the `google/ddpm-cifar10-32` config (35,746,307
parameters for 3 input channels; 2,245,763 with `ch=32`):

  conv_in -> for each level l (resolution H / 2**l, channels ch * ch_mult[l]):
               num_res_blocks x [ResnetBlock (+ AttentionBlock if H in attn_resolutions)],
               Downsample (not at the last level)
          -> mid: ResnetBlock, AttentionBlock, ResnetBlock
          -> for each level, last to first:
               (num_res_blocks + 1) x [concat skip, ResnetBlock (+ AttentionBlock)],
               Upsample (not at the first level)
          -> GroupNorm, SiLU, conv_out

Every resnet block gets the time embedding: `timestep_embedding(t, ch)` then
`TimeEmbedding(4 * ch)`. `t` is the network's conditioning input as a float, e.g. the
0-based DDPM timestep 0..999.

With `num_classes = K > 0` the network is class-conditional (Ho & Salimans 2022, as in
Dhariwal & Nichol's ADM): a label embedding `nn.Embed(K + 1, 4 * ch)` is added to the time
embedding (rows drawn from N(0, 1) as in ADM), and row K is the reserved "null" label of the unconditional model that
classifier-free guidance needs (`y=None` means the null label for every example). With
`num_classes=0` (the default) the network and its parameters are exactly the DDPM ones.

Usage:

  net = UNet(ch=128, dropout=0.1)
  params = net.init(key, x, t, train=False)["params"]
  eps_hat = net.apply({"params": params}, x, t, train=True, rngs={"dropout": key})

  cond = UNet(ch=64, num_classes=10)          # labels 0..9; 10 is the null label
  eps_hat = cond.apply({"params": cparams}, x, t, y, train=False)  # y: [B] int

`jaxdiff.models.convert_diffusers.load_diffusers_unet` loads diffusers checkpoints into it.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import layers

Array = jax.Array


class UNet(nn.Module):
  """DDPM U-Net: `__call__(x [B,H,W,C], t [B], y [B] = None, *, train) -> [B,H,W,out_channels]`."""

  ch: int = 128  # base channels C0; the time embedding is 4 * C0 wide
  ch_mult: Sequence[int] = (1, 2, 2, 2)  # channels of level l = ch * ch_mult[l]
  num_res_blocks: int = 2  # resnet blocks per level going down (+1 going up)
  attn_resolutions: Sequence[int] = (16,)  # feature-map sizes (H) that get self-attention
  dropout: float = 0.0  # dropout rate inside every resnet block (train=True only)
  out_channels: int | None = None  # default: same as input channels
  num_groups: int = 32  # GroupNorm groups
  norm_eps: float = 1e-6  # GroupNorm epsilon
  num_heads: int = 1  # attention heads; 1 = DDPM (one head spanning all channels)
  flip_sin_to_cos: bool = False  # timestep embedding order: False = [sin, cos] (DDPM)
  freq_shift: float = 1.0  # timestep embedding frequency shift: 1 = DDPM, 0 = Transformer
  dtype: Any = jnp.float32  # compute dtype (GroupNorm statistics are always float32)
  param_dtype: Any = jnp.float32  # parameter dtype
  remat: bool = False  # jax.checkpoint each resnet/attention block (nn.remat)
  # Hand-written gradients for GroupNorm and attention: faster training on XLA:CPU. They
  # cannot be differentiated in forward mode (jax.jvp); False gives the same network and
  # numbers with JAX's own derivatives, which the likelihood ODE's Jacobian products use.
  custom_vjp: bool = True
  num_classes: int = 0  # >0: class-conditional on labels 0..num_classes-1; num_classes = null label
  # Going up, attention after every resnet block of a level at attn_resolutions (DDPM, diffusers);
  # False: once per level, after its last block (score_sde's `ddpm` network, 35,218,947 params).
  up_attn_every_block: bool = True

  def _check_config(self) -> None:
    if not self.ch_mult:
      raise ConfigError(f"UNet ch_mult={tuple(self.ch_mult)} is empty; give at least one level, e.g. (1, 2, 2, 2).")
    for m in self.ch_mult:
      c = self.ch * m
      if c % self.num_groups:
        raise ConfigError(
            f"UNet ch={self.ch} x ch_mult {m} = {c} channels is not divisible by num_groups={self.num_groups}; "
            f"choose ch and ch_mult so that every level's channels are a multiple of num_groups.")
      if c % self.num_heads:
        raise ConfigError(
            f"UNet ch={self.ch} x ch_mult {m} = {c} channels is not divisible by num_heads={self.num_heads}; "
            f"use a num_heads that divides every level's channels.")
    if self.ch % self.num_groups:
      raise ConfigError(f"UNet ch={self.ch} is not divisible by num_groups={self.num_groups}; use a multiple of it.")
    if self.num_res_blocks < 0:
      raise ConfigError(f"UNet num_res_blocks={self.num_res_blocks} is negative; use 1 or more (DDPM: 2).")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"UNet dropout={self.dropout} is outside [0, 1); use e.g. 0.1.")
    if self.num_classes < 0:
      raise ConfigError(f"UNet num_classes={self.num_classes} is negative; use 0 (unconditional) or the "
                        f"number of classes.")

  def _check_inputs(self, x: Array, t: Array) -> Array:
    return check_image_inputs("UNet", x, t, len(self.ch_mult))

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
    """Predicts the network output (e.g. eps) for noisy images.

    Args:
      x: [B, H, W, C] images; H and W divisible by 2**(len(ch_mult)-1).
      t: [B] (or scalar) float conditioning input, e.g. the DDPM timestep 0..999.
      y: [B] (or scalar) int class labels in [0, num_classes], `num_classes` being the null
        label; None = the null label. Only for a class-conditional net (`num_classes > 0`).
      train: enables dropout (drawn from the 'dropout' rng collection).

    Returns:
      [B, H, W, out_channels] in `dtype`.
    """
    self._check_config()
    t = self._check_inputs(x, t)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    nkw = dict(kw, custom_vjp=self.custom_vjp)  # for the blocks with GroupNorm / attention
    resnet_cls = nn.remat(layers.ResnetBlock, static_argnums=(3,)) if self.remat else layers.ResnetBlock
    attn_cls = nn.remat(layers.AttentionBlock) if self.remat else layers.AttentionBlock

    def resnet(h, out_ch, name):
      block = resnet_cls(out_ch, num_groups=self.num_groups, norm_eps=self.norm_eps,
                         dropout=self.dropout, name=name, **nkw)
      return block(h, temb, train)

    def attention(h, name):
      return attn_cls(num_heads=self.num_heads, num_groups=self.num_groups, norm_eps=self.norm_eps,
                      name=name, **nkw)(h)

    temb = layers.timestep_embedding(t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos,
                                     freq_shift=self.freq_shift)
    temb = layers.TimeEmbedding(4 * self.ch, name="time_embed", **kw)(temb)
    temb = add_label_embedding("UNet", temb, y, x.shape[0], self.num_classes, **kw)

    h = layers.Conv(self.ch, kernel_init=layers.default_init, name="conv_in", **nkw)(x)
    skips = [h]
    num_levels = len(self.ch_mult)
    for level, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = resnet(h, self.ch * mult, f"down_{level}_res_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attention(h, f"down_{level}_attn_{j}")
        skips.append(h)
      if level != num_levels - 1:
        h = layers.Downsample(name=f"down_{level}_downsample", **nkw)(h)
        skips.append(h)

    h = resnet(h, h.shape[-1], "mid_res_0")
    h = attention(h, "mid_attn")
    h = resnet(h, h.shape[-1], "mid_res_1")

    for level in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resnet(h, self.ch * self.ch_mult[level], f"up_{level}_res_{j}")
        if h.shape[1] in self.attn_resolutions and self.up_attn_every_block:
          h = attention(h, f"up_{level}_attn_{j}")
      if h.shape[1] in self.attn_resolutions and not self.up_attn_every_block:
        h = attention(h, f"up_{level}_attn")
      if level != 0:
        h = layers.Upsample(name=f"up_{level}_upsample", **nkw)(h)

    h = layers.GroupNorm(self.num_groups, self.norm_eps, act=True, name="norm_out", **nkw)(h)
    out_channels = self.out_channels or x.shape[-1]
    return layers.Conv(out_channels, kernel_init=layers.zeros_init, name="conv_out", **nkw)(h)


def label_or_null(y: Array | None, batch: int, num_classes: int) -> Array:
  """Labels `[B]` int32 for a class-conditional net: `y` broadcast, or the null label if None."""
  if y is None:
    return jnp.full((batch,), num_classes, jnp.int32)
  y = jnp.asarray(y)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise InputError(f"class labels y must be integers; got dtype {y.dtype}. Pass int32 labels "
                     f"in [0, {num_classes}] ({num_classes} = the null label).")
  if y.ndim == 0:
    y = jnp.broadcast_to(y, (batch,))
  if y.shape != (batch,):
    raise InputError(f"class labels y.shape={y.shape} must be [B]=({batch},) or a scalar; pass one label "
                     f"per example.")
  return y.astype(jnp.int32)


def check_image_inputs(owner: str, x: Array, t: Array, num_levels: int) -> Array:
  """Checks a U-Net's x [B, H, W, C] (H, W divisible by 2**(num_levels-1)); t as [B] float."""
  if x.ndim != 4:
    raise InputError(f"{owner} x.shape={x.shape} must be rank 4 [B, H, W, C] (NHWC); "
                     f"add the missing axes or transpose NCHW input with x.transpose(0, 2, 3, 1).")
  b, h, w, _ = x.shape
  factor = 2 ** (num_levels - 1)
  if h % factor or w % factor:
    raise InputError(
        f"{owner} x.shape={x.shape}: H={h} and W={w} must be divisible by 2**(len(ch_mult)-1)={factor}; "
        f"pad or resize the images, or use fewer levels in ch_mult.")
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (b,))
  if t.shape != (b,):
    raise InputError(f"{owner} t.shape={t.shape} must be [B]=({b},) or a scalar; pass one noise level per example.")
  return t


def add_label_embedding(owner: str, temb: Array, y: Array | None, batch: int, num_classes: int, *,
                        stddev: float = 1.0, **kw) -> Array:
  """temb + a learned embedding of the class labels (submodule "label_embed"), if num_classes > 0.

  Called inside a network's compact `__call__`. Rows are drawn from N(0, stddev^2): 1 as in
  ADM (torch's nn.Embedding), as large as the time embedding at init; DiT uses 0.02. Row
  `num_classes` is the null label.
  """
  if num_classes:
    y = label_or_null(y, batch, num_classes)
    return temb + nn.Embed(num_classes + 1, temb.shape[-1], embedding_init=nn.initializers.normal(stddev),
                           name="label_embed", **kw)(y)
  if y is not None:
    raise InputError(f"{owner} got labels y, but num_classes=0 (an unconditional network); set "
                     f"config.model.num_classes to the number of classes to train a conditional one.")
  return temb
