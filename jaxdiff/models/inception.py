"""The Inception-v3 network of the Frechet Inception Distance, as pytorch-fid computes it.

FID (Heusel et al. 2017) compares the mean and covariance of Inception-v3 pool features
(2048-D) of samples and data. The numbers papers report come from one particular network,
TensorFlow's 2015-12-05 Inception graph; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
holds its weights in torchvision's layout, with the graph's quirks kept: average pools that
leave the zero padding out of the mean, a max pool in the last block, 1008 classes.
`FIDInception` is that network in linen (NHWC), each convolution's batch norm folded into it
(inference only):

  params = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")   # no torch needed
  feats = fid_features(params, images)     # images [B, H, W, C] in [0, 1] -> [B, 2048]

`fid_features` resizes to 299x299 (bilinear, torch's `align_corners=False`, no antialiasing),
maps [0, 1] to [-1, 1] and repeats a grey channel three times, as pytorch-fid's `InceptionV3`
does. `load_fid_inception` reads the checkpoint with `read_torch_file` (torch's zip and legacy
formats, without torch) and folds it with `convert_fid_inception_state_dict`; an `.npz` of
the state dict works too. `tests/test_inception.py` matches pytorch-fid's own network's
features for seeded weights (the fixture's README says how it was made).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InputError
from jaxdiff.models.torch_file import read_state_dict

FEATURES = 2048
CLASSES = 1008  # the 2015 graph's softmax (ImageNet's 1000 and 8 unused), what the Inception Score reads
RESOLUTION = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d


class _Conv(nn.Module):
  """torchvision's BasicConv2d (conv without bias, batch norm, ReLU), the norm folded into a bias."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride), padding=((ph, ph), (pw, pw)),
                dtype=self.dtype, name="conv")(x)
    return nn.relu(x)


def _avg_pool(x):  # TF's average pool: the mean over the window's pixels inside the image
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _MixedA(nn.Module):  # Mixed_5b, 5c, 5d: pytorch-fid's FIDInceptionA
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, f, k=(1, 1), p=(0, 0): _Conv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
    b5 = c("branch5x5_2", 64, (5, 5), (2, 2))(c("branch5x5_1", 48)(x))
    b3 = c("branch3x3dbl_3", 96, (3, 3), (1, 1))(c("branch3x3dbl_2", 96, (3, 3), (1, 1))(c("branch3x3dbl_1", 64)(x)))
    return jnp.concatenate([c("branch1x1", 64)(x), b5, b3, c("branch_pool", self.pool_features)(_avg_pool(x))], -1)


class _MixedB(nn.Module):  # Mixed_6a: torchvision's InceptionB, the 35 -> 17 reduction
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, f, k=(1, 1), s=1, p=(0, 0): _Conv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
    b3 = c("branch3x3", 384, (3, 3), 2)(x)
    d = c("branch3x3dbl_3", 96, (3, 3), 2)(c("branch3x3dbl_2", 96, (3, 3), 1, (1, 1))(c("branch3x3dbl_1", 64)(x)))
    return jnp.concatenate([b3, d, _max_pool(x)], -1)


class _MixedC(nn.Module):  # Mixed_6b-e: FIDInceptionC, factorized 7x7 convolutions
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, f, k=(1, 1), p=(0, 0): _Conv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
    c7, row, col = self.channels_7x7, ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b7 = c("branch7x7_3", 192, *col)(c("branch7x7_2", c7, *row)(c("branch7x7_1", c7)(x)))
    d = c("branch7x7dbl_1", c7)(x)
    for i, (f, kp) in enumerate(((c7, col), (c7, row), (c7, col), (192, row)), start=2):
      d = c(f"branch7x7dbl_{i}", f, *kp)(d)
    return jnp.concatenate([c("branch1x1", 192)(x), b7, d, c("branch_pool", 192)(_avg_pool(x))], -1)


class _MixedD(nn.Module):  # Mixed_7a: torchvision's InceptionD, the 17 -> 8 reduction
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, f, k=(1, 1), s=1, p=(0, 0): _Conv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
    b3 = c("branch3x3_2", 320, (3, 3), 2)(c("branch3x3_1", 192)(x))
    d = c("branch7x7x3_1", 192)(x)
    d = c("branch7x7x3_3", 192, (7, 1), 1, (3, 0))(c("branch7x7x3_2", 192, (1, 7), 1, (0, 3))(d))
    d = c("branch7x7x3_4", 192, (3, 3), 2)(d)
    return jnp.concatenate([b3, d, _max_pool(x)], -1)


class _MixedE(nn.Module):  # Mixed_7b (FIDInceptionE_1, average pool) and 7c (FIDInceptionE_2, max pool)
  max_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda name, f, k=(1, 1), p=(0, 0): _Conv(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731

    def split(prefix, y):  # a 1x3 and a 3x1 convolution side by side
      return jnp.concatenate([c(f"{prefix}a", 384, (1, 3), (0, 1))(y), c(f"{prefix}b", 384, (3, 1), (1, 0))(y)], -1)

    b3 = split("branch3x3_2", c("branch3x3_1", 384)(x))
    d = split("branch3x3dbl_3", c("branch3x3dbl_2", 384, (3, 3), (1, 1))(c("branch3x3dbl_1", 448)(x)))
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
    return jnp.concatenate([c("branch1x1", 320)(x), b3, d, c("branch_pool", 192)(pooled)], -1)


class FIDInception(nn.Module):
  """pytorch-fid's FID Inception-v3: its 2048-D pool features, and with `logits=True` also the
  1008 class logits without the classifier's bias (what Salimans et al.'s Inception Score code
  multiplies the pool features with; torch-fidelity's `logits_unbiased`). Input: `[B, 299, 299,
  3]` in [-1, 1] (`preprocess`). Submodules carry torchvision's names (`Mixed_6b/branch7x7_1`,
  `fc`)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, logits: bool = False):
    c = lambda name, f, k, s=1, p=(0, 0): _Conv(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
    x = c("Conv2d_2a_3x3", 32, (3, 3))(c("Conv2d_1a_3x3", 32, (3, 3), 2)(x.astype(self.dtype)))
    x = _max_pool(c("Conv2d_2b_3x3", 64, (3, 3), 1, (1, 1))(x))
    x = _max_pool(c("Conv2d_4a_3x3", 192, (3, 3))(c("Conv2d_3b_1x1", 80, (1, 1))(x)))
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = _MixedA(pool, self.dtype, name=name)(x)
    x = _MixedB(self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = _MixedC(c7, self.dtype, name=name)(x)
    x = _MixedD(self.dtype, name="Mixed_7a")(x)
    x = _MixedE(False, self.dtype, name="Mixed_7b")(x)
    x = _MixedE(True, self.dtype, name="Mixed_7c")(x)
    feats = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if logits:
      return feats, nn.Dense(CLASSES, use_bias=False, name="fc")(feats)  # the IS code's logits: no bias
    return feats


def preprocess(images: jax.Array) -> jax.Array:
  """`[B, H, W, 1 or 3]` in [0, 1] -> `[B, 299, 299, 3]` in [-1, 1], as pytorch-fid's InceptionV3."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise InputError(f"FID features take images [B, H, W, 1 or 3] in [0, 1]; got shape {tuple(images.shape)}.")
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), method="linear", antialias=False)
  return 2.0 * x - 1.0


def fid_features(params: Any, images: jax.Array, *, dtype: Any = jnp.float32) -> jax.Array:
  """The 2048-D FID features `[B, 2048]` of `images` `[B, H, W, 1 or 3]` in [0, 1] (jittable)."""
  return FIDInception(dtype=dtype).apply({"params": params}, preprocess(images))


def features_and_logits(params: Any, images: jax.Array, *, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """`fid_features` and the 1008 class logits `[B, 1008]` (bias-free, for `inception_score`) in one pass."""
  return FIDInception(dtype=dtype).apply({"params": params}, preprocess(images), logits=True)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """The Inception Score (Salimans et al. 2016) of class logits `[N, 1008]`: the mean and standard
  deviation over `splits` equal parts of `exp(E_x KL(p(y|x) || p(y)))`, as the papers compute it
  (10 splits of 50,000 samples). Float64, from log-softmax (no log of a rounded 0)."""
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or len(z) < splits or splits < 1:
    raise InputError(f"inception_score needs logits [N, classes] with N >= splits={splits}; got {z.shape}.")
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  scores = []
  for part in np.array_split(logp, splits):
    log_marginal = np.log(np.exp(part).mean(0))
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def abstract_params() -> Any:
  """The parameter shapes of `FIDInception` (`jax.ShapeDtypeStruct`s; nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
  return jax.eval_shape(functools.partial(FIDInception().init, logits=True), jax.random.key(0), x)["params"]


def convert_fid_inception_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid's Inception state dict (name -> array) -> `FIDInception` params (numpy, fp32).

  Each `<layer>.conv.weight` [O, I, kh, kw] with its `<layer>.bn.*` becomes `<layer>/conv` with
  kernel `w * g / sqrt(v + 1e-3)` (HWIO) and bias `b - m * g / sqrt(v + 1e-3)`; the classifier
  `fc` becomes `fc` (kernel [2048, 1008]; its bias is not used, see `FIDInception`).
  `AuxLogits.*` and `num_batches_tracked` are not used. A missing layer, a leftover one or a
  shape that differs from the network's is an InputError naming it.
  """
  sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v) for k, v in state_dict.items()}
  want = {name: leaf.shape for name, leaf in traverse_util.flatten_dict(abstract_params(), sep="/").items()}
  layers = sorted({k[:-len(".conv.weight")] for k in sd
                   if k.endswith(".conv.weight") and not k.startswith("AuxLogits.")})
  flat: dict[str, np.ndarray] = {}
  for layer in layers:
    try:
      w, g, b, m, v = (sd[f"{layer}.{n}"].astype(np.float64) for n in
                       ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"))
    except KeyError as e:
      raise InputError(f"FID Inception state dict: {layer!r} has a conv but no {e.args[0]!r}.") from None
    scale = g / np.sqrt(v + BN_EPS)
    name = layer.replace(".", "/") + "/conv"
    kernel, bias = (w.transpose(2, 3, 1, 0) * scale).astype(np.float32), (b - m * scale).astype(np.float32)
    if want.get(name + "/kernel") != kernel.shape:
      what = "is not a layer of it" if name + "/kernel" not in want else (
          f"has kernel {kernel.shape} (HWIO), the network {want[name + '/kernel']}")
      raise InputError(f"FID Inception state dict: {layer!r} {what}; load pytorch-fid's "
                       f"pt_inception-2015-12-05 weights (FIDInception is that network).")
    flat[name + "/kernel"], flat[name + "/bias"] = kernel, bias
  if "fc.weight" not in sd:
    raise InputError("FID Inception state dict has no classifier (fc.weight); pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth has it (the Inception Score reads it).")
  flat["fc/kernel"] = np.asarray(sd["fc.weight"], np.float32).T
  if flat["fc/kernel"].shape != want["fc/kernel"]:
    raise InputError(f"FID Inception state dict: fc.weight has shape {sd['fc.weight'].shape}, not "
                     f"({CLASSES}, {FEATURES}).")
  missing = sorted({n.rsplit("/conv/", 1)[0] for n in want if "/conv/" in n}
                   - {lay.replace(".", "/") for lay in layers})
  if missing:
    raise InputError(f"FID Inception state dict lacks {len(missing)} layer(s), e.g. {missing[:3]}; it is not "
                     f"pytorch-fid's Inception (pt_inception-2015-12-05-6726825d.pth).")
  return traverse_util.unflatten_dict(flat, sep="/")


def load_fid_inception(path: str | os.PathLike[str]) -> dict[str, Any]:
  """`FIDInception` params from pytorch-fid's checkpoint (`.pth`, read without torch) or an `.npz`
  of its state dict."""
  return convert_fid_inception_state_dict(read_state_dict(
      path, what="FID Inception weights", missing_hint="download pytorch-fid's https://github.com/mseitzer/"
      "pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth and pass its path."))
