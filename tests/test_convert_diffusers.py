"""The diffusers `UNet2DModel` converter against outputs of diffusers itself.

The fixtures under tests/fixtures/ hold tiny random diffusers checkpoints with an input,
timesteps and diffusers' output; `tests/fixtures/make_diffusers_fixture.py` made them.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import InputError
from jaxdiff.models import convert_diffusers
from jaxdiff.models.unet import UNet

safetensors_numpy = pytest.importorskip("safetensors.numpy")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _fixture(name):
  path = os.path.join(FIXTURES, name)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  state_dict = safetensors_numpy.load_file(os.path.join(path, convert_diffusers.WEIGHTS_NAME))
  return path, config, state_dict, dict(np.load(os.path.join(path, "io.npz")))


@pytest.mark.parametrize("name", ["diffusers_tiny", "diffusers_tiny_heads"])
def test_matches_diffusers_output(name):
  path, _, _, io = _fixture(name)
  kwargs, params = convert_diffusers.load_diffusers_unet(path)
  x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  out = UNet(**kwargs).apply({"params": params}, x, jnp.asarray(io["t"], jnp.float32), train=False)
  err = np.max(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - io["out"]))
  assert err < 1e-4, err


def test_config_mapping_and_file_path():
  path, _, _, _ = _fixture("diffusers_tiny")
  kwargs, params = convert_diffusers.load_diffusers_unet(os.path.join(path, convert_diffusers.WEIGHTS_NAME))
  assert kwargs == dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
                        out_channels=3, num_groups=4, norm_eps=1e-6, num_heads=1, flip_sin_to_cos=False,
                        freq_shift=1.0)
  assert params["conv_in"]["kernel"].shape == (3, 3, 3, 8)  # HWIO
  assert params["down_1_attn_0"]["qkv"]["kernel"].shape == (16, 48)
  assert _fixture("diffusers_tiny_heads")[1]["attention_head_dim"] == 8
  assert convert_diffusers.unet_kwargs_from_config(_fixture("diffusers_tiny_heads")[1])["num_heads"] == 2


def test_deprecated_attention_names():
  _, config, state_dict, _ = _fixture("diffusers_tiny")
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in state_dict.items():
    for new_name, old_name in renames.items():
      key = key.replace(f".{new_name}.", f".{old_name}.")
    old[key] = value
  assert any(".proj_attn." in k for k in old)
  want = convert_diffusers.convert_diffusers_state_dict(state_dict, config)
  got = convert_diffusers.convert_diffusers_state_dict(old, config)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("change,match", [
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "up_block_types"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"block_out_channels": [8, 12]}, "block_out_channels"),
    ({"attention_head_dim": 3}, "attention_head_dim"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
])
def test_unsupported_config_raises(change, match):
  _, config, state_dict, _ = _fixture("diffusers_tiny")
  with pytest.raises(InputError, match=match):
    convert_diffusers.convert_diffusers_state_dict(state_dict, {**config, **change})


def test_mismatched_state_dict_raises():
  _, config, state_dict, _ = _fixture("diffusers_tiny")
  missing = {k: v for k, v in state_dict.items() if k != "conv_out.bias"}
  with pytest.raises(InputError, match="lacks 1 tensors"):
    convert_diffusers.convert_diffusers_state_dict(missing, config)
  extra = {**state_dict, "class_embedding.weight": np.zeros((4, 32), np.float32)}
  with pytest.raises(InputError, match="no place for"):
    convert_diffusers.convert_diffusers_state_dict(extra, config)
  with pytest.raises(InputError, match="do not fit"):
    convert_diffusers.convert_diffusers_state_dict(state_dict, {**config, "norm_num_groups": 2, "in_channels": 4})


def test_missing_directory_raises(tmp_path):
  with pytest.raises(InputError, match="does not exist"):
    convert_diffusers.load_diffusers_unet(tmp_path)
