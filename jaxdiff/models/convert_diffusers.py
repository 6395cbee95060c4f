"""Loads diffusers checkpoints into jaxdiff networks, without torch.

  unet_kwargs, params = load_diffusers_unet("path/to/google-ddpm-cifar10-32")
  net = UNet(**unet_kwargs)
  eps_hat = net.apply({"params": params}, x_nhwc, t, train=False)

  dit_kwargs, params = load_diffusers_dit("path/to/DiT-XL-2-256")   # its transformer/
  eps_hat = DiT(**dit_kwargs).apply({"params": params}, z_nhwc, t, labels)

  vae_kwargs, vae_params = load_diffusers_vae("path/to/sd-vae-ft-ema")
  images = decode_latents(AutoencoderKL(**vae_kwargs), vae_params, latents)

`UNet2DModel` -> `UNet`, `DiTTransformer2DModel` -> `DiT` (see `load_diffusers_dit`) and
`AutoencoderKL` -> `autoencoder.AutoencoderKL` (see `load_diffusers_vae`).

A checkpoint is a directory with `config.json` and `diffusion_pytorch_model.safetensors`
(what `save_pretrained(dir, safe_serialization=True)` writes; a pipeline directory with a
`unet/` or `transformer/` subfolder works too). It is read with `safetensors.numpy`, an
optional dependency: `pip install jaxdiff[convert]`.

Only the DDPM family of `UNet2DModel` configs maps onto the jaxdiff U-Net: `DownBlock2D` /
`AttnDownBlock2D` / `UpBlock2D` / `AttnUpBlock2D` blocks, the `UNetMidBlock2D` with
attention, positional time embedding, SiLU, `downsample_padding=0` and the same attention
levels going down and up. Anything else raises `InputError` naming the config key.

The U-Net places attention by feature-map size; `attn_resolutions` comes from the config's
`sample_size`, so run the converted network at that resolution.

Conv kernels go from torch's OIHW to flax's HWIO, linear weights from [out, in] to
[in, out]; q, k and v are concatenated into the U-Net's fused `qkv` Dense. Both the
current attention names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the deprecated ones of
older checkpoints (`query`, `key`, `value`, `proj_attn`) are read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import InputError
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.dit import DiT
from jaxdiff.models.unet import UNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# UNet2DModel.__init__ defaults (diffusers 0.42), for keys a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
# deprecated attention parameter names -> current ones
_OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _unsupported(key: str, value: Any, fix: str) -> InputError:
  return InputError(f"diffusers config {key}={value!r} cannot be represented by the jaxdiff UNet; {fix}.")


def _expect(cfg: Mapping[str, Any], key: str, valid: tuple[Any, ...], fix: str) -> None:
  if cfg[key] not in valid:
    raise _unsupported(key, cfg[key], fix)


def _sample_height(cfg: Mapping[str, Any]) -> int | None:
  size = cfg["sample_size"]
  if isinstance(size, (list, tuple)):
    return int(size[0])
  return None if size is None else int(size)


def unet_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Maps a diffusers `UNet2DModel` config to `UNet(**kwargs)`; InputError if it cannot."""
  cls = config.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    raise _unsupported("_class_name", cls, "only UNet2DModel checkpoints can be converted")
  cfg = {**_DIFFUSERS_DEFAULTS, **config}
  _expect(cfg, "time_embedding_type", ("positional",), "only the sinusoidal ('positional') embedding is supported")
  _expect(cfg, "center_input_sample", (False,), "set it to false and scale the input to [-1, 1] yourself")
  _expect(cfg, "mid_block_type", ("UNetMidBlock2D",), "the UNet always has a UNetMidBlock2D")
  _expect(cfg, "add_attention", (True,), "the UNet's mid block always has attention")
  _expect(cfg, "mid_block_scale_factor", (1,), "only an output scale factor of 1 is supported")
  _expect(cfg, "downsample_padding", (0,), "only the DDPM downsampling (pad (0, 1), stride 2, padding 0) is supported")
  _expect(cfg, "act_fn", ("silu", "swish"), "only SiLU is supported")
  _expect(cfg, "resnet_time_scale_shift", ("default",), "only the additive time embedding ('default') is supported")
  _expect(cfg, "class_embed_type", (None,), "class-conditional UNet2DModels are not supported")
  _expect(cfg, "num_class_embeds", (None,), "class-conditional UNet2DModels are not supported")
  _expect(cfg, "attn_norm_num_groups", (None, cfg["norm_num_groups"]),
          "attention GroupNorm must use norm_num_groups groups")

  channels = [int(c) for c in cfg["block_out_channels"]]
  down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
  num_levels = len(channels)
  if len(down) != num_levels or len(up) != num_levels:
    raise _unsupported("down_block_types", down, "give one down and one up block per entry of block_out_channels")
  for key, types, valid in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
    for block in types:
      if block not in valid:
        raise _unsupported(key, types, f"only {' / '.join(valid)} blocks are supported, not {block!r}")
  ch = channels[0]
  if any(c % ch for c in channels):
    raise _unsupported("block_out_channels", channels, "every level's channels must be a multiple of the first")
  time_dim = cfg["time_embedding_dim"]
  if time_dim not in (None, 4 * ch):
    raise _unsupported("time_embedding_dim", time_dim, f"only 4 * block_out_channels[0] = {4 * ch} is supported")

  down_attn = [level for level, block in enumerate(down) if block == "AttnDownBlock2D"]
  up_attn = [num_levels - 1 - i for i, block in enumerate(up) if block == "AttnUpBlock2D"]
  if sorted(down_attn) != sorted(up_attn):
    raise _unsupported("up_block_types", up, f"attention must sit at the same levels going up as going down ({down})")
  if cfg["downsample_type"] != "conv" and any(level != num_levels - 1 for level in down_attn):
    raise _unsupported("downsample_type", cfg["downsample_type"], "only 'conv' downsampling is supported")
  if cfg["upsample_type"] != "conv" and any(level != 0 for level in up_attn):
    raise _unsupported("upsample_type", cfg["upsample_type"], "only 'conv' upsampling is supported")
  height = _sample_height(cfg)
  if down_attn and height is None:
    raise _unsupported("sample_size", None, "give the training resolution; it places the attention layers")
  if height is not None and height % 2 ** (num_levels - 1):
    raise _unsupported("sample_size", cfg["sample_size"], f"it must be divisible by 2**{num_levels - 1}")
  attn_resolutions = tuple(height // 2**level for level in sorted(down_attn))

  head_dim = cfg["attention_head_dim"]
  if head_dim is None:
    num_heads = 1
  else:
    # diffusers: heads = channels // attention_head_dim, per attention layer (mid included)
    heads = {channels[level] // head_dim for level in down_attn} | {channels[-1] // head_dim}
    if len(heads) != 1 or any(channels[level] % head_dim for level in down_attn + [num_levels - 1]):
      raise _unsupported("attention_head_dim", head_dim,
                         "every attention layer must get the same whole number of heads")
    num_heads = heads.pop()

  return dict(
      ch=ch,
      ch_mult=tuple(c // ch for c in channels),
      num_res_blocks=int(cfg["layers_per_block"]),
      attn_resolutions=attn_resolutions,
      dropout=float(cfg["dropout"]),
      out_channels=int(cfg["out_channels"]),
      num_groups=int(cfg["norm_num_groups"]),
      norm_eps=float(cfg["norm_eps"]),
      num_heads=num_heads,
      flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
      freq_shift=float(cfg["freq_shift"]),
  )


class _StateDict:
  """Takes tensors out of a diffusers state dict by name and remembers which were taken."""

  def __init__(self, state_dict: Mapping[str, np.ndarray]):
    self.tensors = {}
    for key, value in state_dict.items():
      parts = key.split(".")
      if len(parts) >= 2 and parts[-2] in _OLD_ATTN_NAMES and "attentions" in parts:
        key = ".".join(parts[:-2] + [_OLD_ATTN_NAMES[parts[-2]], parts[-1]])
      self.tensors[key] = np.asarray(value, dtype=np.float32)
    self.missing: list[str] = []

  def take(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      self.missing.append(key)
      return np.zeros((0,), np.float32)
    return self.tensors.pop(key)

  def has(self, prefix: str) -> bool:
    return any(k.startswith(prefix + ".") for k in self.tensors)

  def conv(self, prefix: str) -> dict[str, np.ndarray]:
    kernel = self.take(f"{prefix}.weight")
    return {"kernel": kernel.transpose(2, 3, 1, 0) if kernel.ndim == 4 else kernel,
            "bias": self.take(f"{prefix}.bias")}

  def dense(self, prefix: str) -> dict[str, np.ndarray]:
    weight = self.take(f"{prefix}.weight")
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):  # a 1x1 conv stored for a linear layer (old VAEs)
      weight = weight[:, :, 0, 0]
    return {"kernel": weight.T, "bias": self.take(f"{prefix}.bias")}

  def norm(self, prefix: str) -> dict[str, np.ndarray]:
    return {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}

  def resnet(self, prefix: str, temb: bool = True) -> dict[str, Any]:
    block = {
        "norm_0": self.norm(f"{prefix}.norm1"),
        "conv_0": self.conv(f"{prefix}.conv1"),
        "norm_1": self.norm(f"{prefix}.norm2"),
        "conv_1": self.conv(f"{prefix}.conv2"),
    }
    if temb:
      block["temb_proj"] = self.dense(f"{prefix}.time_emb_proj")
    if self.has(f"{prefix}.conv_shortcut"):
      block["shortcut"] = self.conv(f"{prefix}.conv_shortcut")
    return block

  def attention(self, prefix: str) -> dict[str, Any]:
    q, k, v = (self.dense(f"{prefix}.{name}") for name in ("to_q", "to_k", "to_v"))
    return {
        "norm": self.norm(f"{prefix}.group_norm"),
        "qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
        "out_proj": self.dense(f"{prefix}.to_out.0"),
    }


def _flat_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} for a nested dict of arrays or ShapeDtypeStructs."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat_shapes(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(value.shape)
  return out


def _expected_shapes(unet_kwargs: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
  levels = len(unet_kwargs["ch_mult"])
  height = _sample_height({**_DIFFUSERS_DEFAULTS, **config}) or 2 ** (levels - 1)
  in_channels = int(config.get("in_channels", _DIFFUSERS_DEFAULTS["in_channels"]))
  x = jax.ShapeDtypeStruct((1, height, height, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  init = lambda x, t: UNet(**unet_kwargs).init(jax.random.key(0), x, t, train=False)  # noqa: E731
  return jax.eval_shape(init, x, t)["params"]


def convert_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a diffusers `UNet2DModel` state dict to jaxdiff `UNet` params (float32).

  Args:
    state_dict: parameter name -> array, as `safetensors.numpy.load_file` returns it.
    config: the model's `config.json` as a dict.

  Returns:
    The `params` collection of `UNet(**unet_kwargs_from_config(config))`.

  Raises:
    InputError: the config cannot be represented, or tensors are missing, left over or
      of the wrong shape.
  """
  kwargs = unet_kwargs_from_config(config)
  sd = _StateDict(state_dict)
  num_levels = len(kwargs["ch_mult"])
  nres = kwargs["num_res_blocks"]
  params: dict[str, Any] = {
      "conv_in": sd.conv("conv_in"),
      "time_embed": {"dense_0": sd.dense("time_embedding.linear_1"),
                     "dense_1": sd.dense("time_embedding.linear_2")},
  }
  for level in range(num_levels):
    prefix = f"down_blocks.{level}"
    for j in range(nres):
      params[f"down_{level}_res_{j}"] = sd.resnet(f"{prefix}.resnets.{j}")
      if sd.has(f"{prefix}.attentions.{j}"):
        params[f"down_{level}_attn_{j}"] = sd.attention(f"{prefix}.attentions.{j}")
    if level != num_levels - 1:
      params[f"down_{level}_downsample"] = {"conv": sd.conv(f"{prefix}.downsamplers.0.conv")}
  params["mid_res_0"] = sd.resnet("mid_block.resnets.0")
  params["mid_attn"] = sd.attention("mid_block.attentions.0")
  params["mid_res_1"] = sd.resnet("mid_block.resnets.1")
  for level in range(num_levels):
    prefix = f"up_blocks.{num_levels - 1 - level}"
    for j in range(nres + 1):
      params[f"up_{level}_res_{j}"] = sd.resnet(f"{prefix}.resnets.{j}")
      if sd.has(f"{prefix}.attentions.{j}"):
        params[f"up_{level}_attn_{j}"] = sd.attention(f"{prefix}.attentions.{j}")
    if level != 0:
      params[f"up_{level}_upsample"] = {"conv": sd.conv(f"{prefix}.upsamplers.0.conv")}
  params["norm_out"] = sd.norm("conv_norm_out")
  params["conv_out"] = sd.conv("conv_out")

  _check_converted(sd, params, _expected_shapes(kwargs, config), "UNet", kwargs)
  return jax.tree.map(jnp.asarray, params)


def _check_converted(sd: _StateDict, params: Mapping[str, Any], want: Mapping[str, Any], net: str,
                     kwargs: Mapping[str, Any]) -> None:
  """InputError unless every tensor was used, none was missing and every shape fits `net`."""
  if sd.missing:
    raise InputError(f"state_dict lacks {len(sd.missing)} tensors the config implies, e.g. {sd.missing[:3]}; "
                     f"pass the checkpoint that belongs to this config.json.")
  if sd.tensors:
    raise InputError(f"state_dict has {len(sd.tensors)} tensors the jaxdiff {net} has no place for, e.g. "
                     f"{sorted(sd.tensors)[:3]}; pass the checkpoint that belongs to this config.json.")
  got, want = _flat_shapes(params), _flat_shapes(want)
  if got != want:
    diff = [f"{k}: got {got.get(k)}, {net} wants {want.get(k)}" for k in sorted(got.keys() | want.keys())
            if got.get(k) != want.get(k)]
    raise InputError(f"{len(diff)} converted parameters do not fit {net}(**{dict(kwargs)}), e.g. {diff[:2]}; "
                     f"pass the checkpoint that belongs to this config.json.")


def _read_config(path_or_dir: str | os.PathLike[str], subfolder: str, model_class: str) -> tuple[dict[str, Any], str]:
  """(config, weights path) of a save_pretrained directory, its pipeline's `subfolder`, or a weights file."""
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.isdir(os.path.join(path, subfolder)):
      path = os.path.join(path, subfolder)
    weights = os.path.join(path, WEIGHTS_NAME)
    config_path = os.path.join(path, CONFIG_NAME)
  else:
    weights = path
    config_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
  for f in (config_path, weights):
    if not os.path.isfile(f):
      raise InputError(f"path_or_dir={os.fspath(path_or_dir)!r}: {f} does not exist; pass a diffusers {model_class} "
                       f"directory saved with save_pretrained(dir, safe_serialization=True).")
  with open(config_path) as f:
    return json.load(f), weights


def _read_checkpoint(path_or_dir: str | os.PathLike[str], subfolder: str,
                     model_class: str) -> tuple[dict[str, Any], Mapping[str, np.ndarray]]:
  """(config, state_dict) of a save_pretrained directory, its pipeline's `subfolder`, or a weights file."""
  config, weights = _read_config(path_or_dir, subfolder, model_class)
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InputError("reading diffusers checkpoints needs the optional dependency safetensors; "
                     "install it with `pip install jaxdiff[convert]` (or `pip install safetensors`).") from e
  return config, load_file(weights)


def load_diffusers_unet(path_or_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a diffusers `UNet2DModel` checkpoint; returns `(unet_kwargs, params)`.

  Args:
    path_or_dir: a directory holding `config.json` and `diffusion_pytorch_model.safetensors`
      (or a pipeline directory with them under `unet/`), or the `.safetensors` file itself
      with `config.json` beside it.

  Returns:
    `UNet(**unet_kwargs)` and its `params` collection.
  """
  config, state_dict = _read_checkpoint(path_or_dir, "unet", "UNet2DModel")
  kwargs = unet_kwargs_from_config(config)
  return kwargs, convert_diffusers_state_dict(state_dict, config)


# DiTTransformer2DModel.__init__ defaults (diffusers 0.42), for keys a config.json leaves out.
_DIT_DEFAULTS = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}


def dit_kwargs_from_config(config: Mapping[str, Any], *, keep_learned_sigma: bool = False) -> dict[str, Any]:
  """Maps a diffusers `DiTTransformer2DModel` config to `DiT(**kwargs)`; InputError if it cannot.

  With `out_channels = 2 * in_channels` (DiT's learned variance) the DiT predicts eps only
  (out_channels = in_channels) unless `keep_learned_sigma`.
  """
  cls = config.get("_class_name", "DiTTransformer2DModel")
  if cls != "DiTTransformer2DModel":
    raise _unsupported("_class_name", cls, "load_diffusers_dit converts DiTTransformer2DModel checkpoints")
  cfg = {**_DIT_DEFAULTS, **config}
  _expect(cfg, "norm_type", ("ada_norm_zero",), "only DiT's adaLN-Zero blocks are supported")
  _expect(cfg, "activation_fn", ("gelu-approximate",), "only the tanh-approximated GELU of DiT is supported")
  _expect(cfg, "attention_bias", (True,), "DiT's attention projections have biases")
  _expect(cfg, "norm_elementwise_affine", (False,), "DiT's layer norms have no parameters")
  if not cfg["num_embeds_ada_norm"]:
    raise _unsupported("num_embeds_ada_norm", cfg["num_embeds_ada_norm"], "a DiT needs its number of classes")
  in_ch = int(cfg["in_channels"])
  out_ch = int(cfg["out_channels"] or in_ch)
  if out_ch == 2 * in_ch and not keep_learned_sigma:
    out_ch = in_ch
  return dict(
      patch_size=int(cfg["patch_size"]),
      hidden_size=int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
      depth=int(cfg["num_layers"]),
      num_heads=int(cfg["num_attention_heads"]),
      mlp_ratio=4.0,
      num_classes=int(cfg["num_embeds_ada_norm"]),
      out_channels=out_ch,
      freq_dim=256,
      flip_sin_to_cos=True,
      freq_shift=1.0,  # diffusers' CombinedTimestepLabelEmbeddings (the DiT paper's code: 0)
      norm_eps=1e-6,
      mlp_norm_eps=float(cfg["norm_eps"]),
  )


def convert_diffusers_dit_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
                                     keep_learned_sigma: bool = False) -> dict[str, Any]:
  """Converts a diffusers `DiTTransformer2DModel` state dict to jaxdiff `DiT` params (float32).

  diffusers keeps a timestep/label embedder in every block; DiT has one, so they must all
  hold the same weights (as in the published checkpoints): an InputError says which differ.
  The learned-variance half of the output layer is dropped unless `keep_learned_sigma`.
  """
  kwargs = dit_kwargs_from_config(config, keep_learned_sigma=keep_learned_sigma)
  sd = _StateDict(state_dict)
  emb = "transformer_blocks.0.norm1.emb"
  params: dict[str, Any] = {
      "patch_embed_kernel": sd.take("pos_embed.proj.weight").transpose(2, 3, 1, 0),
      "patch_embed_bias": sd.take("pos_embed.proj.bias"),
      "time_embed_0": sd.dense(f"{emb}.timestep_embedder.linear_1"),
      "time_embed_1": sd.dense(f"{emb}.timestep_embedder.linear_2"),
      "label_embed": {"embedding": sd.take(f"{emb}.class_embedder.embedding_table.weight")},
  }
  first = {k[len(emb):]: v for k, v in state_dict.items() if k.startswith(emb + ".")}
  for i in range(1, kwargs["depth"]):
    prefix = f"transformer_blocks.{i}.norm1.emb"
    for name, value in first.items():
      other = sd.take(prefix + name)
      if other.shape == value.shape and not np.array_equal(other, np.asarray(value, np.float32)):
        raise InputError(f"state_dict: {prefix}{name} differs from block 0's; jaxdiff's DiT has one timestep/label "
                         f"embedder (as DiT has), so every block's must hold the same weights.")
  for i in range(kwargs["depth"]):
    block = f"transformer_blocks.{i}"
    q, k, v = (sd.dense(f"{block}.attn1.{name}") for name in ("to_q", "to_k", "to_v"))
    params[f"block_{i}"] = {
        "ada_ln": sd.dense(f"{block}.norm1.linear"),
        "qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
        "attn_out": sd.dense(f"{block}.attn1.to_out.0"),
        "mlp_0": sd.dense(f"{block}.ff.net.0.proj"),
        "mlp_1": sd.dense(f"{block}.ff.net.2"),
    }
  params["final_ada_ln"] = sd.dense("proj_out_1")
  final = sd.dense("proj_out_2")
  p, out_ch = kwargs["patch_size"], kwargs["out_channels"]
  if final["kernel"].ndim == 2 and final["kernel"].shape[1] == p * p * 2 * out_ch:  # drop the variance half
    d = final["kernel"].shape[0]
    final = {"kernel": final["kernel"].reshape(d, p, p, 2 * out_ch)[..., :out_ch].reshape(d, p * p * out_ch),
             "bias": final["bias"].reshape(p, p, 2 * out_ch)[..., :out_ch].reshape(-1)}
  params["final_proj"] = final

  cfg = {**_DIT_DEFAULTS, **config}
  size, in_ch = int(cfg["sample_size"]), int(cfg["in_channels"])
  init = lambda x, t, y: DiT(**kwargs).init(jax.random.key(0), x, t, y)  # noqa: E731
  want = jax.eval_shape(init, jax.ShapeDtypeStruct((1, size, size, in_ch), jnp.float32),
                        jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))["params"]
  _check_converted(sd, params, want, "DiT", kwargs)
  return jax.tree.map(jnp.asarray, params)


def load_diffusers_dit(path_or_dir: str | os.PathLike[str], *,
                       keep_learned_sigma: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a diffusers `DiTTransformer2DModel` checkpoint; returns `(dit_kwargs, params)`.

  The published DiT-XL/2 models (facebook/DiT-XL-2-256, -512) work on Stable Diffusion VAE
  latents, [B, 32, 32, 4] (or 64 x 64) NHWC, scaled by 0.18215; labels are ImageNet classes,
  1000 is the null label. Their DDPM schedule is jaxdiff's `ddpm` process (linear betas
  1e-4 .. 0.02, T = 1000) with `prediction='eps'`.

  Args:
    path_or_dir: a directory holding `config.json` and `diffusion_pytorch_model.safetensors`
      (or a pipeline directory with them under `transformer/`), or the `.safetensors` file.
    keep_learned_sigma: keep the output channels of DiT's learned variance (out_channels =
      2 * in_channels, eps first); by default the network predicts eps only, the same numbers.

  Returns:
    `DiT(**dit_kwargs)` and its `params` collection.
  """
  config, state_dict = _read_checkpoint(path_or_dir, "transformer", "DiTTransformer2DModel")
  return (dit_kwargs_from_config(config, keep_learned_sigma=keep_learned_sigma),
          convert_diffusers_dit_state_dict(state_dict, config, keep_learned_sigma=keep_learned_sigma))


# AutoencoderKL.__init__ defaults (diffusers 0.42), for keys a config.json leaves out.
_VAE_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def vae_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Maps a diffusers `AutoencoderKL` config to `AutoencoderKL(**kwargs)`; InputError if it cannot."""
  cls = config.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise _unsupported("_class_name", cls, "load_diffusers_vae converts AutoencoderKL checkpoints")
  cfg = {**_VAE_DEFAULTS, **config}
  levels = len(cfg["block_out_channels"])
  for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    if tuple(cfg[key]) != (block,) * levels:
      raise _unsupported(key, cfg[key], f"only {block} blocks, one per entry of block_out_channels, are supported")
  _expect(cfg, "act_fn", ("silu",), "only SiLU autoencoders are supported")
  if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
    raise _unsupported("latents_mean", cfg.get("latents_mean"),
                       "per-channel latent statistics (SDXL-style normalisation) are not supported; "
                       "use scaling_factor / shift_factor")
  return dict(
      in_channels=int(cfg["in_channels"]),
      out_channels=int(cfg["out_channels"]),
      latent_channels=int(cfg["latent_channels"]),
      block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
      layers_per_block=int(cfg["layers_per_block"]),
      norm_num_groups=int(cfg["norm_num_groups"]),
      norm_eps=1e-6,
      mid_attention=bool(cfg["mid_block_add_attention"]),
      use_quant_conv=bool(cfg["use_quant_conv"]),
      use_post_quant_conv=bool(cfg["use_post_quant_conv"]),
      scaling_factor=float(cfg["scaling_factor"]),
      shift_factor=float(cfg["shift_factor"] or 0.0),
  )


def convert_diffusers_vae_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a diffusers `AutoencoderKL` state dict to jaxdiff `AutoencoderKL` params (float32)."""
  kwargs = vae_kwargs_from_config(config)
  sd = _StateDict(state_dict)
  levels, n = len(kwargs["block_out_channels"]), kwargs["layers_per_block"]

  def mid(prefix: str) -> dict[str, Any]:
    out = {"res_0": sd.resnet(f"{prefix}.resnets.0", temb=False), "res_1": sd.resnet(f"{prefix}.resnets.1", temb=False)}
    if kwargs["mid_attention"]:
      out["attn"] = sd.attention(f"{prefix}.attentions.0")
    return out

  enc: dict[str, Any] = {"conv_in": sd.conv("encoder.conv_in")}
  dec: dict[str, Any] = {"conv_in": sd.conv("decoder.conv_in")}
  for i in range(levels):
    for j in range(n):
      enc[f"down_{i}_res_{j}"] = sd.resnet(f"encoder.down_blocks.{i}.resnets.{j}", temb=False)
    for j in range(n + 1):
      dec[f"up_{i}_res_{j}"] = sd.resnet(f"decoder.up_blocks.{i}.resnets.{j}", temb=False)
    if i < levels - 1:
      enc[f"down_{i}_downsample"] = {"conv": sd.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv")}
      dec[f"up_{i}_upsample"] = {"conv": sd.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv")}
  for part, prefix in ((enc, "encoder"), (dec, "decoder")):
    part["mid"] = mid(f"{prefix}.mid_block")
    part["norm_out"] = sd.norm(f"{prefix}.conv_norm_out")
    part["conv_out"] = sd.conv(f"{prefix}.conv_out")
  params: dict[str, Any] = {"encoder": enc, "decoder": dec}
  if kwargs["use_quant_conv"]:
    params["quant_conv"] = sd.conv("quant_conv")
  if kwargs["use_post_quant_conv"]:
    params["post_quant_conv"] = sd.conv("post_quant_conv")

  f = 2 ** (levels - 1)
  x = jax.ShapeDtypeStruct((1, f, f, kwargs["in_channels"]), jnp.float32)
  want = jax.eval_shape(lambda x: AutoencoderKL(**kwargs).init(jax.random.key(0), x), x)["params"]
  _check_converted(sd, params, want, "AutoencoderKL", kwargs)
  return jax.tree.map(jnp.asarray, params)


def load_diffusers_vae(path_or_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a diffusers `AutoencoderKL` checkpoint; returns `(vae_kwargs, params)`.

  E.g. stabilityai/sd-vae-ft-ema or -mse (the DiT-XL/2 VAEs; 8x downsampling, 4 latent
  channels, scaling_factor 0.18215), or a pipeline directory with a `vae/` subfolder.
  Use it with `autoencoder.encode_latents` / `decode_latents`.

  Args:
    path_or_dir: a directory holding `config.json` and `diffusion_pytorch_model.safetensors`
      (or a pipeline directory with them under `vae/`), or the `.safetensors` file.

  Returns:
    `AutoencoderKL(**vae_kwargs)` and its `params` collection.
  """
  config, state_dict = _read_checkpoint(path_or_dir, "vae", "AutoencoderKL")
  return vae_kwargs_from_config(config), convert_diffusers_vae_state_dict(state_dict, config)


def read_diffusers_vae_kwargs(path_or_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """`load_diffusers_vae`'s `vae_kwargs` from the config alone (the weights are not read)."""
  config, _ = _read_config(path_or_dir, "vae", "AutoencoderKL")
  return vae_kwargs_from_config(config)
