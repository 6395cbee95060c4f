"""LPIPS (Zhang et al. 2018), the perceptual distance consistency models are trained with.

LPIPS compares two images through the five ReLU stages of an ImageNet VGG-16 (relu1_2 ...
relu5_3): each stage's features are unit-normalized over channels, their squared difference
is weighted per channel by a learned 1x1 layer (fit to human judgments), averaged over space,
and the five stages are summed. `LPIPS` is the `lpips` package's v0.1 VGG network in linen
(NHWC), and `lpips_distance` its use in consistency distillation (Song et al. 2023): both
images resized to 224x224 (bilinear) first, as their code does for images below 256.

The weights are two published files, read without torch:

  params = load_lpips("vgg16-397923af.pth", "vgg.pth")
  d = lpips_distance(params, a, b)          # a, b [B, H, W, 1 or 3] in [-1, 1] -> [B]

`vgg16-397923af.pth` is torchvision's ImageNet VGG-16
(https://download.pytorch.org/models/vgg16-397923af.pth) and `vgg.pth` the `lpips` package's
`lpips/weights/v0.1/vgg.pth` (its linear layers, 7 KB; https://github.com/richzhang/
PerceptualSimilarity). A state dict of the whole `lpips.LPIPS(net='vgg')` module
(`net.slice*`, `lin*`) works as one file, and `.npz` files of state dicts too.
`tests/test_lpips.py` matches the `lpips` package's own network on seeded weights.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InputError
from jaxdiff.models.torch_file import read_state_dict

# VGG-16's convolutions ("M": a 2x2 max pool), up to relu5_3
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (1, 3, 6, 9, 12)  # the convolutions whose ReLU outputs are compared: relu1_2 ... relu5_3
# torchvision's `vgg16().features` index of each convolution, and the lpips package's slices of it
TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SLICE_STARTS = (0, 4, 9, 16, 23)  # net.slice1 .. slice5 begin at these feature indices
# the lpips ScalingLayer: ImageNet's normalization, for inputs in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
RESOLUTION = 224  # consistency models' LPIPS input size


class LPIPS(nn.Module):
  """`(a, b) -> [B]` LPIPS distance of images `[B, H, W, 3]` in [-1, 1] at their own size (H, W >=
  16: four 2x2 pools). Both go through the network as one batch."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    x = (jnp.concatenate([a, b]).astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    x = x.astype(self.dtype)
    total, conv = 0.0, 0
    for item in VGG16:
      if item == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # torch's floor mode: an odd last row is dropped
        continue
      x = nn.relu(nn.Conv(item, (3, 3), padding=1, dtype=self.dtype, name=f"conv{conv}")(x))
      if conv in TAPS:
        fa, fb = jnp.split(x.astype(jnp.float32), 2)
        # unit length over channels, as lpips' normalize_tensor. Where a pixel's features are all 0
        # the root's gradient is NaN, but the ReLU's backward select drops it (all inputs <= 0 there).
        unit = lambda f: f / (jnp.sqrt(jnp.sum(f * f, -1, keepdims=True)) + 1e-10)  # noqa: E731
        diff = jnp.square(unit(fa) - unit(fb))
        weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{TAPS.index(conv)}")(diff)
        total = total + jnp.mean(weighted, axis=(1, 2, 3))
      conv += 1
    return total


def lpips_distance(params: Any, a: jax.Array, b: jax.Array, *, resolution: int | None = RESOLUTION,
                   dtype: Any = jnp.float32) -> jax.Array:
  """LPIPS `[B]` between images `a`, `b` `[B, H, W, 1 or 3]` in [-1, 1] (jittable, differentiable).

  Grey images are repeated to three channels; both are resized to `resolution` x `resolution`
  (bilinear, torch's `align_corners=False`, as consistency models' code does below 256 pixels;
  None: their own size, which must be >= 16).
  """
  if a.shape != b.shape or a.ndim != 4 or a.shape[-1] not in (1, 3):
    raise InputError(f"LPIPS takes two image batches [B, H, W, 1 or 3] of one shape; got {tuple(a.shape)} and "
                     f"{tuple(b.shape)}.")
  if a.shape[-1] == 1:
    a, b = jnp.repeat(a, 3, axis=-1), jnp.repeat(b, 3, axis=-1)
  if resolution is not None and a.shape[1:3] != (resolution, resolution):
    size = (a.shape[0], resolution, resolution, 3)
    a, b = (jax.image.resize(v.astype(jnp.float32), size, method="linear", antialias=False) for v in (a, b))
  if min(a.shape[1:3]) < 16:
    raise InputError(f"LPIPS needs images of at least 16x16 (VGG-16 pools four times); got {a.shape[1]}x"
                     f"{a.shape[2]}: pass resolution=224 (or another size >= 16).")
  return LPIPS(dtype=dtype).apply({"params": params}, a, b)


def abstract_params() -> Any:
  """`LPIPS`'s parameter shapes (`jax.ShapeDtypeStruct`s; nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]


def _feature_index(name: str) -> int | None:
  """torchvision's `features.<i>.` or the lpips module's `net.slice<k>.<i>.` -> feature index i."""
  parts = name.split(".")
  if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
    return int(parts[1])
  if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice") and parts[2].isdigit():
    k = parts[1][len("slice"):]
    if k.isdigit() and 1 <= int(k) <= len(_SLICE_STARTS):
      return int(parts[2])  # the lpips package keeps torchvision's indices inside its slices
  return None


def convert_lpips_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """torch state dict(s), merged -> `LPIPS` params (numpy, fp32).

  The VGG-16 convolutions come from torchvision's `features.<i>.weight/bias` or the lpips
  module's `net.slice<k>.<i>.weight/bias` (OIHW -> HWIO), the five linear layers from
  `lin<k>.model.1.weight` ([1, C, 1, 1]). torchvision's classifier, the lpips scaling
  buffers and `module.` prefixes are ignored; a missing or misshapen tensor is an InputError
  that says which file holds it.
  """
  sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v) for k, v in state_dict.items()}
  want = {name: leaf.shape for name, leaf in traverse_util.flatten_dict(abstract_params(), sep="/").items()}
  flat: dict[str, np.ndarray] = {}
  for key, value in sd.items():
    index = _feature_index(key)
    if index is not None and index in TORCHVISION_CONVS:
      conv = TORCHVISION_CONVS.index(index)
      name = f"conv{conv}/{'kernel' if key.endswith('weight') else 'bias'}"
      flat[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    elif key.startswith("lin") and key.endswith(".model.1.weight") and key[3:-len(".model.1.weight")].isdigit():
      flat[f"lin{key[3:-len('.model.1.weight')]}/kernel"] = value.transpose(2, 3, 1, 0)
  missing = [n for n in want if n not in flat]
  if missing:
    which = ("torchvision's VGG-16 (vgg16-397923af.pth)" if missing[0].startswith("conv") else
             "the lpips package's linear layers (lpips/weights/v0.1/vgg.pth)")
    raise InputError(f"LPIPS weights lack {len(missing)} tensor(s), e.g. {missing[:2]}: give {which} too.")
  for name, shape in want.items():
    if flat[name].shape != shape:
      raise InputError(f"LPIPS weights: {name} has shape {flat[name].shape} (after OIHW -> HWIO), the network "
                       f"{shape}; these are not VGG-16 / LPIPS v0.1 VGG weights.")
  return traverse_util.unflatten_dict({n: flat[n].astype(np.float32) for n in want}, sep="/")


def load_lpips(*paths: str | os.PathLike[str]) -> dict[str, Any]:
  """`LPIPS` params from torch checkpoints (read without torch) or `.npz` state dicts, merged:
  torchvision's VGG-16 and the lpips package's `v0.1/vgg.pth`, or one file with both."""
  if not paths:
    raise InputError("load_lpips needs the weights: vgg16-397923af.pth and lpips' weights/v0.1/vgg.pth.")
  merged: dict[str, np.ndarray] = {}
  for path in paths:
    merged.update(read_state_dict(
        path, what="LPIPS weights", missing_hint="download torchvision's VGG-16 https://download.pytorch.org/"
        "models/vgg16-397923af.pth and take the lpips package's lpips/weights/v0.1/vgg.pth (pip download lpips)."))
  return convert_lpips_state_dict(merged)
