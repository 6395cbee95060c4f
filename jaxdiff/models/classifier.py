"""A noise-conditional image classifier for classifier guidance (Dhariwal & Nichol 2021).

`NoiseClassifier` is the downsampling half of the DDPM U-Net (`jaxdiff.models.unet`) with a
classification head, as ADM's classifier is the U-Net encoder:

  conv_in -> for each level l: num_res_blocks x [ResnetBlock (+ AttentionBlock)],
                               Downsample (not at the last level)
          -> mid: ResnetBlock, AttentionBlock, ResnetBlock
          -> GroupNorm, SiLU, global average pool, Dense(num_classes)

Every resnet block gets the time embedding of the noise level, so one network classifies
`x_t` at every noise level of the process; `jaxdiff.losses.make_classifier_loss` trains it
with cross-entropy on `x_t` at random times, and `jaxdiff.guidance` turns it into
`grad_x log p(y | x_t, t)`.

Usage:

  clf = NoiseClassifier(num_classes=10, ch=32, ch_mult=(1, 2, 2))
  params = clf.init(key, x, c, train=False)["params"]
  logits = clf.apply({"params": params}, x, c, train=False)  # [B, num_classes]
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import layers

Array = jax.Array


class NoiseClassifier(nn.Module):
  """`__call__(x [B,H,W,C], t [B], *, train) -> logits [B, num_classes]` (float32)."""

  num_classes: int = 10  # number of classes (logits)
  ch: int = 128  # base channels C0; the time embedding is 4 * C0 wide
  ch_mult: Sequence[int] = (1, 2, 2, 2)  # channels of level l = ch * ch_mult[l]
  num_res_blocks: int = 2  # resnet blocks per level
  attn_resolutions: Sequence[int] = (16,)  # feature-map sizes (H) that get self-attention
  dropout: float = 0.0  # dropout rate inside every resnet block (train=True only)
  num_groups: int = 32  # GroupNorm groups
  norm_eps: float = 1e-6  # GroupNorm epsilon
  num_heads: int = 1  # attention heads
  dtype: Any = jnp.float32  # compute dtype (the logits are returned in float32)
  param_dtype: Any = jnp.float32  # parameter dtype

  def _check(self, x: Array, t: Array) -> Array:
    if self.num_classes < 2:
      raise ConfigError(f"NoiseClassifier num_classes={self.num_classes} must be >= 2; set "
                        f"config.model.num_classes to the dataset's number of classes.")
    if not self.ch_mult:
      raise ConfigError(f"NoiseClassifier ch_mult={tuple(self.ch_mult)} is empty; give at least one level.")
    for c in [self.ch] + [self.ch * m for m in self.ch_mult]:
      if c % self.num_groups:
        raise ConfigError(f"NoiseClassifier has {c} channels at some level, not divisible by "
                          f"num_groups={self.num_groups}; choose ch and ch_mult so that every level's "
                          f"channels are a multiple of num_groups.")
    if x.ndim != 4:
      raise InputError(f"NoiseClassifier x.shape={x.shape} must be rank 4 [B, H, W, C] (NHWC).")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    if t.shape != (x.shape[0],):
      raise InputError(f"NoiseClassifier t.shape={t.shape} must be [B]=({x.shape[0]},) or a scalar.")
    return t

  @nn.compact
  def __call__(self, x: Array, t: Array, *, train: bool) -> Array:
    """Class logits of noisy images.

    Args:
      x: [B, H, W, C] noisy images (scaled as `guidance.classifier_input` does).
      t: [B] (or scalar) float conditioning input, the process's `noise_cond(t)`.
      train: enables dropout (drawn from the 'dropout' rng collection).

    Returns:
      [B, num_classes] float32 logits.
    """
    t = self._check(x, t)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    temb = layers.timestep_embedding(t, self.ch)
    temb = layers.TimeEmbedding(4 * self.ch, name="time_embed", **kw)(temb)

    def resnet(h, out_ch, name):
      return layers.ResnetBlock(out_ch, num_groups=self.num_groups, norm_eps=self.norm_eps,
                                dropout=self.dropout, name=name, **kw)(h, temb, train)

    def attention(h, name):
      return layers.AttentionBlock(num_heads=self.num_heads, num_groups=self.num_groups,
                                   norm_eps=self.norm_eps, name=name, **kw)(h)

    # layers.Conv: flax.linen.Conv's parameters, with gradients that stay fast inside the
    # sampling loop (classifier guidance differentiates the classifier at every step).
    h = layers.Conv(self.ch, kernel_init=layers.default_init, name="conv_in", **kw)(x)
    for level, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = resnet(h, self.ch * mult, f"down_{level}_res_{j}")
        if h.shape[1] in self.attn_resolutions:
          h = attention(h, f"down_{level}_attn_{j}")
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(name=f"down_{level}_downsample", **kw)(h)
    h = resnet(h, h.shape[-1], "mid_res_0")
    h = attention(h, "mid_attn")
    h = resnet(h, h.shape[-1], "mid_res_1")
    h = layers.GroupNorm(self.num_groups, self.norm_eps, act=True, name="norm_out", **kw)(h)
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    # the pooled features (apply(..., mutable=['intermediates'])): a Frechet distance between
    # samples and data in this classifier's feature space (benchmarks/cond_mnist_eval.py)
    self.sow("intermediates", "features", h)
    return nn.Dense(self.num_classes, kernel_init=layers.default_init, name="head",
                    param_dtype=self.param_dtype)(h)
