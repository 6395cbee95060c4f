"""Loads score_sde's NCSN++ / DDPM++ weights into jaxdiff's `NCSNpp`: from its JAX checkpoints
and from score_sde_pytorch's, without TensorFlow or torch.

score_sde (JAX / flax), a `checkpoints/checkpoint_<n>` file (or that directory: the latest):

  kwargs = ncsnpp_kwargs_from_score_sde(config.model, config.data)   # score_sde's config
  params = convert_score_sde_flax_params(load_score_sde_checkpoint(path), NCSNpp(**kwargs),
                                         image_shape=(32, 32, 3), negate_output=config.model.scale_by_sigma)

`load_score_sde_checkpoint` reads the EMA weights (`params_ema`, what score_sde samples with;
`ema=False`: the training weights). Its `ddpm` network (score_sde's DDPM / "DDPM cont."
checkpoints) loads the same way into `UNet(**unet_kwargs_from_score_sde(config.model,
config.data))`: the DDPM U-Net with attention once per level going up. score_sde's linen
modules are named per class in call order (`Conv_0`, `ResnetBlockBigGANpp_3`, `AttnBlockpp_1`,
...); `NCSNpp` calls the same layers in the same order, so each name is paired with one `NCSNpp` submodule.

score_sde_pytorch:

  params = convert_score_sde_state_dict(state_dict, NCSNpp(**kwargs), image_shape=(32, 32, 3),
                                        negate_output=config.model.scale_by_sigma)

`state_dict` maps score_sde_pytorch's parameter names (`all_modules.<i>.<name>`, with or
without DataParallel's `module.` prefix; the `sigmas` buffer is ignored) to arrays. From one
of its checkpoints (`checkpoint_<n>.pth`), in a Python that has torch:

  state = torch.load(path, map_location="cpu")
  weights = state["model"]
  # score_sde samples with the EMA weights: `shadow_params` lists the parameters that take
  # gradients (all but the Fourier features' W) in state-dict order.
  names = [k for k in weights if not k.endswith("sigmas") and not k.endswith("all_modules.0.W")]
  weights = dict(weights, **dict(zip(names, state["ema"]["shadow_params"])))
  np.savez("ncsnpp.npz", **{k: v.float().numpy() for k, v in weights.items()})

and then `convert_score_sde_state_dict(dict(np.load("ncsnpp.npz")), ...)` here. score_sde
keeps its modules in one flat list, in the order the forward pass uses them, so the i-th
score_sde module that has parameters is the i-th `NCSNpp` submodule that has parameters.

Either way each pair must be the same kind of layer with the same shapes (anything else
raises `InputError`, naming both sides). Conv kernels become HWIO, linear weights [in, out],
the attention's three NINs the fused `qkv` kernel.

Output conventions: score_sde's VP models output eps (its score is -output / std), as
jaxdiff's `prediction='eps'`. Its VE models with `scale_by_sigma` output sigma * score = -eps
(before the division by sigma), so pass `negate_output=True` for them: the output layer (or
every output-pyramid conv) is negated and the network then predicts eps. Its networks see
`2x - 1` for data in [0, 1] (`data.centered=False`): `ncsnpp_kwargs_from_score_sde` sets
`center_input` for that.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxdiff.errors import InputError
from jaxdiff.models import layers
from jaxdiff.models.ncsnpp import NCSNpp, Resample, ResnetBlockpp
from jaxdiff.models.unet import UNet

# score_sde config.model key -> NCSNpp field
_KEYS = {"nf": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions",
         "dropout": "dropout", "resamp_with_conv": "resamp_with_conv", "fir": "fir", "fir_kernel": "fir_kernel",
         "skip_rescale": "skip_rescale", "resblock_type": "resblock_type", "progressive": "progressive",
         "progressive_input": "progressive_input", "progressive_combine": "progressive_combine",
         "embedding_type": "embedding_type", "fourier_scale": "fourier_scale", "init_scale": "init_scale"}


def _getter(section: Any):
  """`get(key, default)` for a score_sde config section: a dict, a ConfigDict or any object."""
  return section.get if hasattr(section, "get") else lambda k, d=None: getattr(section, k, d)


def ncsnpp_kwargs_from_score_sde(model: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`NCSNpp` fields from a score_sde `config.model` (and `config.data`, for `centered`)."""
  get = _getter(model)
  name = get("name", "ncsnpp")
  if name != "ncsnpp":
    raise InputError(f"score_sde config.model.name={name!r}: only 'ncsnpp' (NCSN++ / DDPM++) maps onto "
                     f"jaxdiff's NCSNpp; the 'ddpm' network is jaxdiff's UNet (unet_kwargs_from_score_sde).")
  if not get("conditional", True):
    raise InputError("score_sde config.model.conditional=False: jaxdiff's NCSNpp is always noise-conditional.")
  act = str(get("nonlinearity", "swish")).lower()
  if act not in ("swish", "silu"):
    raise InputError(f"score_sde config.model.nonlinearity={act!r}: NCSNpp uses SiLU (swish) only.")
  kwargs = {}
  for key, field in _KEYS.items():
    value = get(key, None)
    if value is not None:
      kwargs[field] = tuple(value) if isinstance(value, (list, tuple)) else value
  for key in ("resblock_type", "progressive", "progressive_input", "progressive_combine", "embedding_type"):
    if key in kwargs:
      kwargs[key] = str(kwargs[key]).lower()
  if data is not None:
    dget = _getter(data)
    kwargs["center_input"] = not bool(dget("centered", True))
  return kwargs


def unet_kwargs_from_score_sde(model: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`UNet` fields for score_sde's (JAX) `ddpm` network from its `config.model` (and `config.data`).

  The same network as jaxdiff's DDPM U-Net except that, going up, score_sde attends once per
  level (after the level's last block) rather than after every block
  (`up_attn_every_block=False`); GroupNorm has flax's default 32 groups.
  """
  get = _getter(model)
  name = get("name", "ddpm")
  if name != "ddpm":
    raise InputError(f"score_sde config.model.name={name!r}: unet_kwargs_from_score_sde is for its 'ddpm' "
                     f"network; 'ncsnpp' is jaxdiff's NCSNpp (ncsnpp_kwargs_from_score_sde).")
  checks = {"conditional": True, "resamp_with_conv": True, "normalization": "GroupNorm", "nonlinearity": "swish"}
  for key, want in checks.items():
    if str(get(key, want)).lower() != str(want).lower():
      raise InputError(f"score_sde config.model.{key}={get(key)!r}: jaxdiff's UNet is the {key}={want!r} "
                       f"network only.")
  if data is not None:
    dget = _getter(data)
    if not dget("centered", True):
      raise InputError("score_sde config.data.centered=False: that ddpm network maps its input to 2x - 1 "
                       "itself, which jaxdiff's UNet does not; use a checkpoint trained on centered data.")
  return dict(ch=int(get("nf")), ch_mult=tuple(get("ch_mult")), num_res_blocks=int(get("num_res_blocks")),
              attn_resolutions=tuple(get("attn_resolutions")), dropout=float(get("dropout", 0.1)),
              num_groups=32, norm_eps=1e-6, up_attn_every_block=False)


def _torch_modules(state_dict: Mapping[str, Any]) -> list[tuple[int, dict[str, np.ndarray]]]:
  """[(index, {param name: array})] for score_sde's `all_modules` that have parameters, in order."""
  modules: dict[int, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    k = key[len("module."):] if key.startswith("module.") else key
    if k == "sigmas":  # the noise schedule buffer of upstream's NCSNpp, not a weight
      continue
    parts = k.split(".", 2)
    if len(parts) != 3 or parts[0] != "all_modules" or not parts[1].isdigit():
      raise InputError(f"state_dict key {key!r} is not a score_sde NCSNpp parameter (all_modules.<i>.<name>); "
                       f"pass the state dict of score_sde_pytorch's NCSNpp.")
    modules.setdefault(int(parts[1]), {})[parts[2]] = np.asarray(value, np.float32)
  return sorted(modules.items())


def _flax_kind(path: tuple[str, ...], module: nn.Module, ddpm: bool) -> str | None:
  """The class of score_sde's (JAX) module that the network's submodule `module` at `path` stands
  for (`ddpm`: the network is the UNet, score_sde's `ddpm`; else NCSNpp, its `ncsnpp`)."""
  if isinstance(module, ResnetBlockpp):
    return "ResnetBlockBigGANpp" if module.kind == "biggan" else "ResnetBlockDDPMpp"
  if isinstance(module, layers.ResnetBlock):
    return "ResnetBlockDDPM"
  if isinstance(module, layers.AttentionBlock):
    return "AttnBlock" if ddpm else "AttnBlockpp"
  if isinstance(module, Resample):
    return "Upsample" if module.up else "Downsample"
  if isinstance(module, (layers.Downsample, layers.Upsample)):
    return type(module).__name__
  if isinstance(module, layers.GroupNorm):
    return "GroupNorm"
  if isinstance(module, layers.Conv):  # the input pyramid's join is a conv1x1 inside score_sde's Combine
    return "Combine" if path[-1].endswith("_combine") else "Conv"
  if isinstance(module, nn.Dense):  # the noise-embedding MLP
    return "Dense"
  return None


def _call_order(model: NCSNpp | UNet, shape: tuple[int, ...]) -> tuple[list[tuple[tuple[str, ...], str]], Any]:
  """(path, score_sde flax name) of the submodules that own parameters, in the order the forward
  pass calls them, and the params' shapes.

  The flax name is what score_sde's JAX `NCSNpp` calls the same module: linen numbers the
  submodules of each class in creation (= call) order, counting those without parameters too
  (e.g. a pyramid's `Downsample` without a conv).
  """
  calls: list[tuple[tuple[str, ...], str]] = []
  seen: set[tuple[str, ...]] = set()
  counts: dict[str, int] = {}

  def record(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    top = len(path) == 1 or len(path) == 2 and path[0] == "time_embed"
    if context.method_name == "__call__" and top and path not in seen:
      seen.add(path)
      kind = _flax_kind(path, context.module, isinstance(model, UNet))
      if kind is not None:
        calls.append((path, f"{kind}_{counts.get(kind, 0)}"))
        counts[kind] = counts.get(kind, 0) + 1
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, *shape), jnp.float32)
  with nn.intercept_methods(record):
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.ones((1,)), train=False))["params"]

  def owns(path):  # whether the submodule at `path` has parameters
    node = params
    for p in path:
      if not isinstance(node, Mapping) or p not in node:
        return False
      node = node[p]
    return isinstance(node, Mapping) and bool(node)

  order = [(p, name) for p, name in calls if owns(p)]
  if "fourier_freqs" in params:
    order.insert(0, (("fourier_freqs",), "GaussianFourierProjection_0"))
  return order, params


def _oihw(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def _convert_one(path: tuple[str, ...], target: Any, src: dict[str, np.ndarray]) -> Any:
  """One score_sde module's parameters in NCSNpp's layout for the submodule at `path`."""
  name = ".".join(path)
  keys = set(src)

  def conv(prefix):
    out = {"kernel": _oihw(src[f"{prefix}weight"])}
    if f"{prefix}bias" in src:
      out["bias"] = src[f"{prefix}bias"]
    return out

  def gn(prefix):
    return {"scale": src[f"{prefix}weight"], "bias": src[f"{prefix}bias"]}

  if path == ("fourier_freqs",):
    if keys != {"W"}:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has its Fourier features (W).")
    return src["W"]
  if "norm_0" in target:  # residual block
    if not {"GroupNorm_0.weight", "Conv_0.weight", "Dense_0.weight", "Conv_1.weight"} <= keys:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has the residual block {name}.")
    out = {"norm_0": gn("GroupNorm_0."), "conv_0": conv("Conv_0."), "norm_1": gn("GroupNorm_1."),
           "conv_1": conv("Conv_1."),
           "temb_proj": {"kernel": src["Dense_0.weight"].T, "bias": src["Dense_0.bias"]}}
    if "Conv_2.weight" in src:
      out["shortcut"] = conv("Conv_2.")
    elif "NIN_0.W" in src:
      out["shortcut"] = {"kernel": src["NIN_0.W"][None, None], "bias": src["NIN_0.b"]}
    return out
  if "qkv" in target:  # attention
    if not {"GroupNorm_0.weight", "NIN_0.W", "NIN_3.W"} <= keys:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has the attention block {name}.")
    return {"norm": gn("GroupNorm_0."),
            "qkv": {"kernel": np.concatenate([src[f"NIN_{i}.W"] for i in range(3)], axis=1),
                    "bias": np.concatenate([src[f"NIN_{i}.b"] for i in range(3)])},
            "out_proj": {"kernel": src["NIN_3.W"], "bias": src["NIN_3.b"]}}
  if "conv" in target:  # Resample with a conv
    prefix = "Conv2d_0." if "Conv2d_0.weight" in keys else "Conv_0."
    if f"{prefix}weight" not in keys:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has the resampling conv {name}.")
    return {"conv": conv(prefix)}
  if "kernel" in target and target["kernel"].ndim == 4:  # conv (conv_in, combine, pyramid / output convs)
    for prefix in ("Conv_0.", "Conv."):  # score_sde's Combine (named Conv_0 upstream, Conv in some forks)
      if keys == {f"{prefix}weight", f"{prefix}bias"}:
        return conv(prefix)
    if keys != {"weight", "bias"} or src["weight"].ndim != 4:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has the conv {name}.")
    return conv("")
  if "kernel" in target:  # dense (the noise embedding MLP)
    if keys != {"weight", "bias"} or src["weight"].ndim != 2:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has the dense layer {name}.")
    return {"kernel": src["weight"].T, "bias": src["bias"]}
  if "scale" in target:  # GroupNorm
    if keys != {"weight", "bias"} or src["weight"].ndim != 1:
      raise InputError(f"score_sde module with {sorted(keys)} where NCSNpp has the GroupNorm {name}.")
    return gn("")
  raise InputError(f"NCSNpp submodule {name} has no score_sde counterpart.")


def _check_model(model: NCSNpp | UNet, *, allow_unet: bool = False) -> None:
  kinds = (NCSNpp, UNet) if allow_unet else (NCSNpp,)
  if not isinstance(model, kinds):
    raise InputError(f"model={type(model).__name__}: score_sde's NCSN++ / DDPM++ weights load into "
                     f"jaxdiff.models.NCSNpp (ncsnpp_kwargs_from_score_sde)"
                     + (", its (JAX) DDPM weights into UNet (unet_kwargs_from_score_sde)." if allow_unet else "."))
  name = type(model).__name__
  if model.num_classes:
    raise InputError(f"{name} num_classes={model.num_classes}: score_sde's networks have no label embedding; "
                     f"use num_classes=0.")
  if isinstance(model, UNet) and (model.up_attn_every_block or model.num_heads != 1):
    raise InputError(f"UNet(up_attn_every_block={model.up_attn_every_block}, num_heads={model.num_heads}): "
                     f"score_sde's ddpm network attends once per level going up, with one head; build the "
                     f"UNet with unet_kwargs_from_score_sde(config.model, config.data).")


def _assemble(model: NCSNpp | UNet, target: Any, pairs: list[tuple[tuple[str, ...], str, dict[str, np.ndarray]]],
              negate_output: bool) -> dict[str, Any]:
  """The network's params from (its path, score_sde module name, weights in PyTorch layout) pairs."""
  params: dict[str, Any] = {}
  for path, label, src in pairs:
    node = target
    for p in path:
      node = node[p]
    try:
      value = _convert_one(path, node, src)
    except KeyError as e:
      raise InputError(f"score_sde module {label} lacks {e} for NCSNpp's {'.'.join(path)}.") from None
    except InputError as e:
      raise InputError(f"{label}: {e}") from None
    want = jax.tree.map(lambda s: tuple(s.shape), node)
    got = jax.tree.map(lambda a: tuple(np.shape(a)), value)
    if want != got:
      raise InputError(f"score_sde module {label} has shapes {got} where NCSNpp's {'.'.join(path)} "
                       f"has {want}; build NCSNpp from the checkpoint's config (ncsnpp_kwargs_from_score_sde).")
    dest = params
    for p in path[:-1]:
      dest = dest.setdefault(p, {})
    dest[path[-1]] = value
  if negate_output:
    outputs = [k for k in params if k == "conv_out" or (k.startswith("up_") and k.endswith("_pyramid_conv")
                                                         and getattr(model, "progressive", "") == "output_skip")]
    for k in outputs:
      params[k] = {n: -v for n, v in params[k].items()}
  return jax.tree.map(jnp.asarray, params)


def convert_score_sde_state_dict(state_dict: Mapping[str, Any], model: NCSNpp, image_shape: tuple[int, int, int],
                                 *, negate_output: bool = False) -> dict[str, Any]:
  """score_sde_pytorch `NCSNpp` weights -> `model`'s params (see the module docstring).

  `image_shape` is (H, W, C) of the score_sde model's data (attention is placed by size).
  `negate_output=True` for VE models with `scale_by_sigma` (their output is -eps).
  """
  _check_model(model)
  order, target = _call_order(model, tuple(image_shape))
  modules = _torch_modules(state_dict)
  if len(modules) != len(order):
    raise InputError(f"the state_dict has {len(modules)} score_sde modules with parameters, NCSNpp(...) at "
                     f"image_shape={tuple(image_shape)} has {len(order)}; build NCSNpp with "
                     f"ncsnpp_kwargs_from_score_sde(config.model, config.data) of the checkpoint's config.")
  pairs = [(path, f"all_modules.{index}", src) for (path, _), (index, src) in zip(order, modules)]
  return _assemble(model, target, pairs, negate_output)


def _torch_layout(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """One score_sde (flax) module's parameters, flattened and in score_sde_pytorch's names and layout.

  The two codebases name their layers alike (GroupNorm_0, Conv_1, NIN_0, Conv2d_0, ...); flax's
  GroupNorm `scale` is torch's `weight`, its conv kernels are HWIO (torch OIHW), its dense
  kernels [in, out] (torch [out, in]); NIN's W, b and the Fourier W are the same in both.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_torch_layout(value, f"{prefix}{key}."))
      continue
    value = np.asarray(value, np.float32)
    if key == "scale":
      key = "weight"
    elif key in ("kernel", "weight") and value.ndim == 4:  # nn.Conv / up_or_down_sampling.Conv2d
      key, value = "weight", np.transpose(value, (3, 2, 0, 1))
    elif key == "kernel" and value.ndim == 2:  # nn.Dense
      key, value = "weight", value.T
    out[f"{prefix}{key}"] = value
  return out


def convert_score_sde_flax_params(params: Mapping[str, Any], model: NCSNpp | UNet,
                                  image_shape: tuple[int, int, int], *, negate_output: bool = False) -> dict[str, Any]:
  """score_sde (JAX / flax) `NCSNpp` params -> `model`'s params (an `NCSNpp`); its `DDPM` params
  -> a `UNet` built with `unet_kwargs_from_score_sde`.

  `params` is the tree score_sde trains and samples with (`state.params_ema`, or
  `state.optimizer.target`), e.g. from `load_score_sde_checkpoint`; a `{"params": ...}`
  variables dict works too. score_sde's linen modules are auto-named per class in call order
  (`ResnetBlockBigGANpp_3`, `Conv_0`, ...); each is paired with the NCSNpp submodule called
  in the same place, and must be the same kind of layer with the same shapes.
  `image_shape` and `negate_output` as in `convert_score_sde_state_dict`.
  """
  _check_model(model, allow_unet=True)
  if not isinstance(params, Mapping):
    raise InputError(f"params is a {type(params).__name__}; pass score_sde's parameter tree (a dict of dicts, "
                     f"e.g. load_score_sde_checkpoint(path)).")
  if set(params) == {"params"}:
    params = params["params"]
  order, target = _call_order(model, tuple(image_shape))
  names = [name for _, name in order]
  missing, extra = [n for n in names if n not in params], sorted(set(params) - set(names))
  if missing or extra:
    raise InputError(f"the score_sde params and NCSNpp(...) at image_shape={tuple(image_shape)} differ: "
                     f"NCSNpp needs {missing or 'nothing more'}, the params also have {extra or 'nothing'}; "
                     f"build NCSNpp with ncsnpp_kwargs_from_score_sde(config.model, config.data) of the "
                     f"checkpoint's config.")
  pairs = []
  for path, name in order:
    if not isinstance(params[name], Mapping):
      raise InputError(f"score_sde params[{name!r}] is a {type(params[name]).__name__}, not a module's "
                       f"parameters; pass the params tree itself (load_score_sde_checkpoint).")
    pairs.append((path, name, _torch_layout(params[name])))
  return _assemble(model, target, pairs, negate_output)


def _latest_checkpoint(directory: str) -> str:
  steps = []
  for name in os.listdir(directory):
    m = re.fullmatch(r"checkpoint_(\d+)", name)
    if m and os.path.isfile(os.path.join(directory, name)):
      steps.append((int(m.group(1)), name))
  if not steps:
    raise InputError(f"checkpoint directory {directory!r} has no checkpoint_<n> file; pass score_sde's "
                     f"<workdir>/checkpoints directory or one checkpoint_<n> file in it.")
  return os.path.join(directory, max(steps)[1])


def load_score_sde_checkpoint(path: str | os.PathLike[str], *, ema: bool = True) -> dict[str, Any]:
  """The network parameters of a score_sde (JAX) checkpoint, as a tree of float32 numpy arrays.

  `path` is one `checkpoint_<n>` file that score_sde's `run_lib` wrote (flax's msgpack
  serialisation of its training `State`), or a directory of them (the latest is read).
  `ema=True` returns `params_ema`, the weights score_sde samples and evaluates with;
  `ema=False` returns the raw training weights (`optimizer.target`). No TensorFlow needed.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = _latest_checkpoint(path)
  if not os.path.isfile(path):
    raise InputError(f"score_sde checkpoint {path!r} does not exist; pass a checkpoint_<n> file from score_sde's "
                     f"<workdir>/checkpoints (or that directory).")
  with open(path, "rb") as f:
    data = f.read()
  try:
    state = serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001 - msgpack raises several types for foreign bytes
    raise InputError(f"{path!r} is not a flax msgpack checkpoint ({type(e).__name__}: {e}); score_sde "
                     f"(JAX) writes checkpoints/checkpoint_<n> with flax.training.checkpoints. For "
                     f"score_sde_pytorch's .pth files use convert_score_sde_state_dict.") from None
  optimizer = state.get("optimizer") if isinstance(state, dict) else None
  if not isinstance(state, dict) or "params_ema" not in state or not isinstance(optimizer, dict) \
      or "target" not in optimizer:
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise InputError(f"{path!r} holds {keys}, not score_sde's training state (params_ema, optimizer.target, "
                     f"...); is it a score_sde checkpoint?")
  tree = state["params_ema"] if ema else optimizer["target"]
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
