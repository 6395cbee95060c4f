"""DiT, the Diffusion Transformer (Peebles & Xie 2023), in flax linen with NHWC images.

  patchify: p x p patches -> Dense(D) tokens [B, (H/p)(W/p), D] + fixed 2-D sin-cos positions
  c = MLP(sinusoidal(t)) (+ label embedding; row num_classes is the null label)
  depth x DiTBlock (adaLN-Zero):
      shift1, scale1, gate1, shift2, scale2, gate2 = Dense(6D)(SiLU(c))      (zero-initialised)
      h = h + gate1 * Attention(LN(h) * (1 + scale1) + shift1)
      h = h + gate2 * MLP(LN(h) * (1 + scale2) + shift2)                      (GELU, tanh form)
  final: LN(h) * (1 + scale) + shift with (shift, scale) = Dense(2D)(SiLU(c)), Dense(p*p*C_out)
  unpatchify -> [B, H, W, C_out]

The layer norms have no parameters (every scale and shift comes from c). Initialisation is
DiT's: Xavier-uniform kernels and zero biases, N(0, 0.02) for the time MLP and the label
table, and zeros for every adaLN modulation and the output layer, so an initialised DiT is
the zero function and each block starts as the identity.

`DiT(**dit_size("S/2"))` gives the paper's sizes (S, B, L, XL with patch 2, 4 or 8); the
defaults are DiT-S/2. `jaxdiff.models.convert_diffusers.load_diffusers_dit` loads diffusers'
`DiTTransformer2DModel` checkpoints (facebook/DiT-XL-2-256 and -512's `transformer/`) into it.

Usage:

  net = DiT(**dit_size("B/4"), num_classes=10)          # labels 0..9; 10 is the null label
  params = net.init(key, x, t, y, train=False)["params"]
  eps_hat = net.apply({"params": params}, x, t, y, train=False)   # x: [B, H, W, C]

Unlike the paper's released models, which also predict a variance (learn_sigma), the
network predicts one quantity (eps, x0, v or flow: config.loss.prediction), with
`out_channels` = the input's channels unless set (super-resolution gives it the noisy
image and the upsampled low-resolution one, 2C channels in, C out).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import layers
from jaxdiff.models.unet import add_label_embedding, check_image_inputs

Array = jax.Array
Dtype = Any

# (hidden_size, depth, num_heads) of the paper's Table 1.
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_embed_init = nn.initializers.normal(0.02)


def dit_size(name: str) -> dict[str, int]:
  """`dit_size("XL/2")` -> dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)."""
  size, _, patch = name.partition("/")
  if size not in DIT_SIZES or patch not in ("2", "4", "8"):
    raise ConfigError(f"dit_size({name!r}): use '<size>/<patch>' with size one of {', '.join(DIT_SIZES)} and "
                      f"patch 2, 4 or 8, e.g. 'S/2' or 'XL/2'.")
  hidden, depth, heads = DIT_SIZES[size]
  return dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed positions [grid_h * grid_w, dim] (row-major tokens), as DiT / MAE build them.

  Token (i, j) (row i, column j) gets [sin(j w), cos(j w), sin(i w), cos(i w)] with
  w_k = 10000^(-k / (dim / 4)), k < dim / 4: the first half encodes the column.
  """
  if dim % 4:
    raise ConfigError(f"DiT hidden_size={dim} must be a multiple of 4 for the 2-D sin-cos positions.")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                           indexing="ij")
  parts = []
  for pos in (cols.reshape(-1), rows.reshape(-1)):
    out = pos[:, None] * omega[None, :]
    parts += [np.sin(out), np.cos(out)]
  return np.concatenate(parts, axis=1).astype(np.float32)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(eps: float, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dtype)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: `(h [B, T, D], c [B, D]) -> [B, T, D]`."""

  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6  # the layer norm before attention
  mlp_norm_eps: float = 1e-6  # the layer norm before the MLP
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  custom_vjp: bool = True  # layers.attention's hand-written gradient (False: forward mode works)

  @nn.compact
  def __call__(self, h: Array, c: Array) -> Array:
    b, t, d = h.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda n, name, init=layers.default_init: nn.Dense(n, kernel_init=init, name=name, **kw)  # noqa: E731
    mod = dense(6 * d, "ada_ln", layers.zeros_init)(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

    x = _modulate(_layer_norm(self.norm_eps, self.dtype)(h), shift1, scale1)
    q, k, v = layers.QKVProjection(d, name="qkv", **kw)(x)
    q, k, v = (a.reshape(b, t, self.num_heads, d // self.num_heads) for a in (q, k, v))
    a = (layers.attention if self.custom_vjp else layers.attention_plain)(q, k, v)
    a = dense(d, "attn_out")(a.reshape(b * t, d)).reshape(b, t, d)
    h = h + gate1[:, None, :] * a

    x = _modulate(_layer_norm(self.mlp_norm_eps, self.dtype)(h), shift2, scale2)
    x = dense(int(d * self.mlp_ratio), "mlp_0")(x.reshape(b * t, d))
    x = dense(d, "mlp_1")(nn.gelu(x, approximate=True)).reshape(b, t, d)
    return h + gate2[:, None, :] * x


class DiT(nn.Module):
  """Diffusion Transformer: `__call__(x [B,H,W,C], t [B], y [B] = None, *, train) -> [B,H,W,out_channels]`."""

  patch_size: int = 2  # p: H and W must be multiples of it; (H/p)(W/p) tokens
  hidden_size: int = 384  # D, the token width
  depth: int = 12  # number of DiT blocks
  num_heads: int = 6  # attention heads (D / num_heads per head)
  mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
  num_classes: int = 0  # >0: class-conditional on labels 0..num_classes-1; num_classes = null label
  out_channels: int | None = None  # default: same as input channels
  freq_dim: int = 256  # width of the sinusoidal embedding of t
  flip_sin_to_cos: bool = True  # [cos, sin] order (DiT)
  freq_shift: float = 0.0  # 0 = DiT; diffusers' DiTTransformer2DModel embeds with 1
  norm_eps: float = 1e-6  # attention and final layer norms
  mlp_norm_eps: float = 1e-6  # MLP layer norm (diffusers' DiTTransformer2DModel: its norm_eps, 1e-5)
  dtype: Any = jnp.float32  # compute dtype (layer-norm statistics and softmax are float32)
  param_dtype: Any = jnp.float32
  remat: bool = False  # jax.checkpoint each block (nn.remat): less memory, ~1/3 more compute
  custom_vjp: bool = True  # hand-written attention gradient; False for forward-mode (jax.jvp) likelihoods

  def _check_config(self) -> None:
    d = self.hidden_size
    if self.patch_size < 1:
      raise ConfigError(f"DiT patch_size={self.patch_size} must be >= 1 (DiT: 2, 4 or 8).")
    if self.depth < 1:
      raise ConfigError(f"DiT depth={self.depth} must be >= 1 (DiT-S: 12).")
    if self.num_heads < 1 or d % self.num_heads:
      raise ConfigError(f"DiT hidden_size={d} is not divisible by num_heads={self.num_heads}; use a "
                        f"num_heads that divides it (DiT uses 64 channels per head).")
    if d % 4:
      raise ConfigError(f"DiT hidden_size={d} must be a multiple of 4 (2-D sin-cos positions).")
    if self.mlp_ratio <= 0:
      raise ConfigError(f"DiT mlp_ratio={self.mlp_ratio} must be > 0 (DiT: 4.0).")
    if self.num_classes < 0:
      raise ConfigError(f"DiT num_classes={self.num_classes} is negative; use 0 (unconditional) or the "
                        f"number of classes.")

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False) -> Array:
    """Predicts the network output (e.g. eps) for noisy images.

    Args:
      x: [B, H, W, C] images; H and W multiples of `patch_size`.
      t: [B] (or scalar) float conditioning input, e.g. the DDPM timestep 0..999.
      y: [B] (or scalar) int class labels in [0, num_classes] (`num_classes` = the null
        label); None = the null label. Only for a class-conditional net (`num_classes > 0`).
      train: unused (DiT has no dropout); accepted like the other networks.

    Returns:
      [B, H, W, out_channels] in x's dtype.
    """
    del train
    self._check_config()
    p, d = self.patch_size, self.hidden_size
    t = check_image_inputs("DiT", x, t, 1)
    bsz, height, width, ch = x.shape
    if height % p or width % p:
      raise InputError(f"DiT x.shape={x.shape}: H={height} and W={width} must be multiples of patch_size={p}; "
                       f"pad or resize the images, or use another patch size.")
    gh, gw = height // p, width // p
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    # Patchify as one GEMM: [B, gh, p, gw, p, C] -> [B*T, p*p*C] @ kernel [p, p, C, D] (a conv kernel, HWIO).
    kernel = self.param("patch_embed_kernel", layers.default_init, (p, p, ch, d), self.param_dtype)
    bias = self.param("patch_embed_bias", layers.zeros_init, (d,), self.param_dtype)
    patches = x.astype(self.dtype).reshape(bsz, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
    h = patches.reshape(bsz * gh * gw, p * p * ch) @ kernel.reshape(p * p * ch, d).astype(self.dtype)
    h = (h + bias.astype(self.dtype)).reshape(bsz, gh * gw, d)
    h = h + jnp.asarray(sincos_pos_embed_2d(d, gh, gw), self.dtype)[None]

    temb = layers.timestep_embedding(t, self.freq_dim, flip_sin_to_cos=self.flip_sin_to_cos,
                                     freq_shift=self.freq_shift)
    temb = nn.Dense(d, kernel_init=_embed_init, name="time_embed_0", **kw)(temb)
    c = nn.Dense(d, kernel_init=_embed_init, name="time_embed_1", **kw)(nn.silu(temb))
    c = add_label_embedding("DiT", c, y, bsz, self.num_classes, stddev=0.02, **kw)

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block_cls(self.num_heads, self.mlp_ratio, self.norm_eps, self.mlp_norm_eps, custom_vjp=self.custom_vjp,
                    name=f"block_{i}", **kw)(h, c)

    out_ch = self.out_channels or ch
    shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=layers.zeros_init, name="final_ada_ln", **kw)(nn.silu(c)),
                             2, axis=-1)
    h = _modulate(_layer_norm(self.norm_eps, self.dtype)(h), shift, scale)
    h = nn.Dense(p * p * out_ch, kernel_init=layers.zeros_init, name="final_proj", **kw)(h.reshape(-1, d))
    out = h.reshape(bsz, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5).reshape(bsz, height, width, out_ch)
    return out.astype(x.dtype)
