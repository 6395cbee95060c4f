"""DiT: diffusers' DiTTransformer2DModel output, adaLN-Zero init, gradients, positions, errors.

The fixture tests/fixtures/diffusers_dit_tiny holds a tiny random diffusers DiT with an input,
timesteps, labels and diffusers' output; tests/fixtures/make_diffusers_dit_fixture.py made it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import configs as config_lib
from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import DiT, create_model, dit_size
from jaxdiff.models import convert_diffusers
from jaxdiff.models.dit import sincos_pos_embed_2d

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "diffusers_dit_tiny")
TINY = dict(patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3)


@pytest.mark.parametrize("keep_learned_sigma", [False, True])
def test_matches_diffusers_dit(keep_learned_sigma):
  pytest.importorskip("safetensors.numpy")
  io = dict(np.load(os.path.join(FIXTURE, "io.npz")))
  path = FIXTURE if keep_learned_sigma else os.path.join(FIXTURE, convert_diffusers.WEIGHTS_NAME)
  kwargs, params = convert_diffusers.load_diffusers_dit(path, keep_learned_sigma=keep_learned_sigma)
  assert kwargs["out_channels"] == (8 if keep_learned_sigma else 4)
  assert (kwargs["hidden_size"], kwargs["depth"], kwargs["num_classes"], kwargs["mlp_norm_eps"]) == (16, 2, 10, 1e-5)
  out = jax.jit(DiT(**kwargs).apply)({"params": params}, jnp.asarray(io["x"].transpose(0, 2, 3, 1)),
                            jnp.asarray(io["t"], jnp.float32), jnp.asarray(io["y"], jnp.int32))
  want = io["out"].transpose(0, 2, 3, 1)[..., :kwargs["out_channels"]]  # eps first, then the variance
  assert np.max(np.abs(np.asarray(out) - want)) < 1e-4


def test_converter_refuses_what_dit_cannot_hold():
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = json.load(f)
  sd = safetensors_numpy.load_file(os.path.join(FIXTURE, convert_diffusers.WEIGHTS_NAME))
  key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
  with pytest.raises(InputError, match="linear_1.weight differs from block 0"):
    convert_diffusers.convert_diffusers_dit_state_dict({**sd, key: sd[key] + 1}, config)
  with pytest.raises(InputError, match="activation_fn='gelu'"):
    convert_diffusers.dit_kwargs_from_config({**config, "activation_fn": "gelu"})
  with pytest.raises(InputError, match="lacks 1 tensors.*attn1.to_k.bias"):
    convert_diffusers.convert_diffusers_dit_state_dict(
        {k: v for k, v in sd.items() if k != "transformer_blocks.0.attn1.to_k.bias"}, config)
  with pytest.raises(InputError, match="does not exist"):
    convert_diffusers.load_diffusers_dit(os.path.dirname(FIXTURE))


def test_init_from_a_diffusers_dit():
  pytest.importorskip("safetensors.numpy")
  from jaxdiff.models import pretrained

  kwargs, want = convert_diffusers.load_diffusers_dit(FIXTURE)
  init_from = "diffusers:" + FIXTURE
  pretrained.validate_init_from(init_from, "dit", "eps")
  params = pretrained.load_pretrained(init_from, DiT(**{**kwargs, "out_channels": None}), (1, 8, 8, 4))
  np.testing.assert_array_equal(params["block_1"]["qkv"]["kernel"], want["block_1"]["qkv"]["kernel"])
  with pytest.raises(ConfigError, match=r"is a DiT\(freq_shift=1.0\) but config.model differs there; set "
                                        r"--config.model.freq_shift=1.0"):
    pretrained.load_pretrained(init_from, DiT(**{**kwargs, "freq_shift": 0.0}), (1, 8, 8, 4))


def _inputs(b=2, size=8, ch=3):
  k1, k2 = jax.random.split(jax.random.key(1))
  return (jax.random.normal(k1, (b, size, size, ch)), jax.random.uniform(k2, (b,)) * 999,
          jnp.array([0, 3][:b], jnp.int32))


def test_adaln_zero_init_and_gradients():
  x, t, y = _inputs()
  net = DiT(**TINY)
  params = jax.jit(net.init)(jax.random.key(0), x, t, y)["params"]
  assert not np.any(np.asarray(jax.jit(net.apply)({"params": params}, x, t, y)))  # the zero function at init
  # 2 x 2 patches of 3 channels -> 12 outputs per token from final_proj (no variance channels)
  assert params["final_proj"]["kernel"].shape == (16, 12)
  assert params["label_embed"]["embedding"].shape == (4, 16)  # 3 classes + the null label
  # Perturb the zero-initialised layers so that every path carries signal, then compare the
  # hand-written attention gradient, remat and JAX's own derivatives, and forward mode (the
  # likelihood ODE's Jacobian products) with custom_vjp=False against finite differences.
  plain = DiT(**TINY, custom_vjp=False)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  p = jax.jit(lambda f: unravel(f + 0.05 * jax.random.normal(jax.random.key(2), f.shape)))(flat)
  loss = lambda p, model: jnp.mean(model.apply({"params": p}, x, t, y) ** 2)  # noqa: E731
  (l0, g0), *others = jax.jit(lambda p: [jax.value_and_grad(loss)(p, m) for m in
                                         (net, plain, DiT(**TINY, remat=True))])(p)
  f = lambda z: plain.apply({"params": p}, z, t, y)  # noqa: E731
  v = jnp.ones_like(x)
  jvp, fd = jax.jit(lambda: (jax.jvp(f, (x,), (v,))[1], (f(x + 1e-2 * v) - f(x - 1e-2 * v)) / 2e-2))()
  for l1, g1 in others:
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), g1, g0)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g0))
  np.testing.assert_allclose(jvp, fd, rtol=2e-2, atol=2e-3)


def test_positions_closed_form():
  d, gh, gw = 8, 3, 5
  pos = sincos_pos_embed_2d(d, gh, gw)
  w = 1.0 / 10000 ** (np.arange(2) / 2)
  i, j = 2, 4  # token row 2, column 4 -> index 2 * 5 + 4
  np.testing.assert_allclose(pos[i * gw + j], np.concatenate([np.sin(j * w), np.cos(j * w),
                                                              np.sin(i * w), np.cos(i * w)]), rtol=1e-6)
  with pytest.raises(ConfigError, match="multiple of 4"):
    sincos_pos_embed_2d(6, 2, 2)


def test_sizes_and_errors():
  assert dit_size("XL/2") == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
  assert dit_size("S/4") == dict(hidden_size=384, depth=12, num_heads=6, patch_size=4)
  with pytest.raises(ConfigError, match="'M/2'"):
    dit_size("M/2")
  x, t, y = _inputs()
  with pytest.raises(ConfigError, match="hidden_size=16 is not divisible by num_heads=3"):
    DiT(**{**TINY, "num_heads": 3}).init(jax.random.key(0), x, t, y)
  with pytest.raises(InputError, match="multiples of patch_size=3"):
    DiT(**{**TINY, "patch_size": 3}).init(jax.random.key(0), x, t, y)
  with pytest.raises(InputError, match="num_classes=0"):
    DiT(**{**TINY, "num_classes": 0}).init(jax.random.key(0), x, t, y)
  # non-square input, unconditional, super-resolution-style 2C in / C out
  net = create_model("dit", patch_size=2, hidden_size=16, depth=1, num_heads=2, out_channels=3)
  z = jnp.zeros((1, 4, 6, 6))
  out = jax.eval_shape(lambda: net.apply(net.init(jax.random.key(0), z, t[:1]), z, t[:1]))
  assert out.shape == (1, 4, 6, 3)


def test_mnist_dit_configs():
  from configs import mnist_dit

  c = mnist_dit.get_config()
  assert (c.model.name, c.model.hidden_size, c.model.depth, c.model.patch_size) == ("dit", 384, 12, 2)
  params = jax.eval_shape(lambda: create_model(**c.model.to_dict()).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))["params"]
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert n == 32_469_508, n  # DiT-S/2 with 1 channel and 11 label rows: counted by hand
  config_lib.validate(mnist_dit.get_config("runlocal"))
  bad = mnist_dit.get_config("runlocal")
  bad.model.patch_size = 3
  with pytest.raises(ConfigError, match="resolution=28 is not a multiple of config.model.patch_size=3"):
    config_lib.validate(bad)
