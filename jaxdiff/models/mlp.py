"""A residual MLP score network for low-dimensional data (2-D toys, tabular)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import InputError
from jaxdiff.models.layers import Dropout, timestep_embedding
from jaxdiff.models.unet import label_or_null


class MLP(nn.Module):
  """`x: [B, d], t: [B], y: [B] = None -> [B, d]`: time-embedded residual MLP.

  With `num_classes = K > 0` a label embedding (K + 1 rows; row K is the null label, used
  when `y` is None) is added to the time embedding, as in the U-Net.
  """

  hidden: int = 256  # width of every hidden layer
  num_layers: int = 3  # number of residual blocks
  time_dim: int = 64  # sinusoidal time-embedding width
  num_classes: int = 0  # >0: class-conditional, label `num_classes` is the null label
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    if x.ndim != 2:
      raise InputError(f"MLP takes x of shape [B, d]; got {x.shape}. Flatten the data or use the U-Net.")
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype)
    temb = timestep_embedding(t, self.time_dim)
    temb = dense(self.hidden)(nn.silu(dense(self.hidden)(temb)))
    if self.num_classes:
      y = label_or_null(y, x.shape[0], self.num_classes)
      temb = temb + nn.Embed(self.num_classes + 1, self.hidden, embedding_init=nn.initializers.normal(1.0),
                             param_dtype=self.param_dtype)(y)
    elif y is not None:
      raise InputError("MLP got labels y, but num_classes=0 (an unconditional network); set "
                       "config.model.num_classes to the number of classes to train a conditional one.")
    h = dense(self.hidden)(x.astype(self.dtype))
    for _ in range(self.num_layers):
      r = nn.silu(nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)(h))
      r = dense(self.hidden)(r) + dense(self.hidden)(nn.silu(temb))
      r = nn.silu(r)
      r = Dropout(self.dropout, deterministic=not train)(r)
      h = h + dense(self.hidden)(r)
    h = nn.silu(nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)(h))
    return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.zeros)(h).astype(x.dtype)
