"""Loads score_sde_pytorch NCSN++ / DDPM++ weights into jaxdiff's `NCSNpp`, without torch.

  kwargs = ncsnpp_kwargs_from_score_sde(config.model, config.data)   # score_sde's config
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

and then `convert_score_sde_state_dict(dict(np.load("ncsnpp.npz")), ...)` here.

score_sde keeps its modules in one flat list, in the order the forward pass uses them; so
does `NCSNpp` (its submodules are created in call order), so the i-th score_sde module that
has parameters is the i-th `NCSNpp` submodule that has parameters, and each pair must be the
same kind of layer with the same shapes (anything else raises `InputError`). Conv kernels go
from OIHW to HWIO, linear weights from [out, in] to [in, out], the attention's three NINs
into the fused `qkv` kernel.

Output conventions: score_sde's VP models output eps (its score is -output / std), as
jaxdiff's `prediction='eps'`. Its VE models with `scale_by_sigma` output sigma * score = -eps,
so pass `negate_output=True` for them: the output layer (or every output-pyramid conv) is
negated and the network then predicts eps. Its networks see `2x - 1` for data in [0, 1]
(`data.centered=False`): `ncsnpp_kwargs_from_score_sde` sets `center_input` for that.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InputError
from jaxdiff.models.ncsnpp import NCSNpp

# score_sde config.model key -> NCSNpp field
_KEYS = {"nf": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions",
         "dropout": "dropout", "resamp_with_conv": "resamp_with_conv", "fir": "fir", "fir_kernel": "fir_kernel",
         "skip_rescale": "skip_rescale", "resblock_type": "resblock_type", "progressive": "progressive",
         "progressive_input": "progressive_input", "progressive_combine": "progressive_combine",
         "embedding_type": "embedding_type", "fourier_scale": "fourier_scale", "init_scale": "init_scale"}


def ncsnpp_kwargs_from_score_sde(model: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`NCSNpp` fields from a score_sde `config.model` (and `config.data`, for `centered`)."""
  get = model.get if hasattr(model, "get") else lambda k, d=None: getattr(model, k, d)
  name = get("name", "ncsnpp")
  if name != "ncsnpp":
    raise InputError(f"score_sde config.model.name={name!r}: only 'ncsnpp' (NCSN++ / DDPM++) maps onto "
                     f"jaxdiff's NCSNpp; the 'ddpm' network is jaxdiff's UNet.")
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
    dget = data.get if hasattr(data, "get") else lambda k, d=None: getattr(data, k, d)
    kwargs["center_input"] = not bool(dget("centered", True))
  return kwargs


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


def _call_order(model: NCSNpp, shape: tuple[int, ...]) -> tuple[list[tuple[str, ...]], Any]:
  """The paths of the submodules that own parameters, in the order the forward pass calls them."""
  calls: list[tuple[str, ...]] = []

  def record(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name == "__call__" and path and path not in calls:
      calls.append(path)
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

  # Direct children of the network, except the noise-embedding MLP, whose two Dense layers
  # are two score_sde modules.
  order = [p for p in calls if (len(p) == 1 and p[0] != "time_embed" or len(p) == 2 and p[0] == "time_embed")
           and owns(p)]
  if "fourier_freqs" in params:
    order.insert(0, ("fourier_freqs",))
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


def convert_score_sde_state_dict(state_dict: Mapping[str, Any], model: NCSNpp, image_shape: tuple[int, int, int],
                                 *, negate_output: bool = False) -> dict[str, Any]:
  """score_sde_pytorch `NCSNpp` weights -> `model`'s params (see the module docstring).

  `image_shape` is (H, W, C) of the score_sde model's data (attention is placed by size).
  `negate_output=True` for VE models with `scale_by_sigma` (their output is -eps).
  """
  if model.num_classes:
    raise InputError(f"NCSNpp num_classes={model.num_classes}: score_sde's NCSN++ has no label embedding; "
                     f"use num_classes=0.")
  order, target = _call_order(model, tuple(image_shape))
  modules = _torch_modules(state_dict)
  if len(modules) != len(order):
    raise InputError(f"the state_dict has {len(modules)} score_sde modules with parameters, NCSNpp(...) at "
                     f"image_shape={tuple(image_shape)} has {len(order)}; build NCSNpp with "
                     f"ncsnpp_kwargs_from_score_sde(config.model, config.data) of the checkpoint's config.")
  params: dict[str, Any] = {}
  for path, (index, src) in zip(order, modules):
    node = target
    for p in path:
      node = node[p]
    try:
      value = _convert_one(path, node, src)
    except KeyError as e:
      raise InputError(f"score_sde module all_modules.{index} lacks {e} for NCSNpp's {'.'.join(path)}.") from None
    want = jax.tree.map(lambda s: tuple(s.shape), node)
    got = jax.tree.map(lambda a: tuple(np.shape(a)), value)
    if want != got:
      raise InputError(f"score_sde module all_modules.{index} has shapes {got} where NCSNpp's {'.'.join(path)} "
                       f"has {want}; build NCSNpp from the checkpoint's config (ncsnpp_kwargs_from_score_sde).")
    dest = params
    for p in path[:-1]:
      dest = dest.setdefault(p, {})
    dest[path[-1]] = value
  if negate_output:
    outputs = [k for k in params if k == "conv_out" or (k.startswith("up_") and k.endswith("_pyramid_conv")
                                                         and model.progressive == "output_skip")]
    for k in outputs:
      params[k] = {n: -v for n, v in params[k].items()}
  return jax.tree.map(jnp.asarray, params)
