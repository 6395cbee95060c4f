"""Tests of the DDPM U-Net (`jaxdiff.models.unet`) and its layers, on tiny configs.

The 35.7M-parameter network is only ever shape-evaluated (`jax.eval_shape`), never run.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import layers
from jaxdiff.models.unet import UNet

# Two levels (8x8 and 4x4), attention at 4x4, a 1x1 shortcut, both resamplers, dropout.
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.1)
# One level with attention and dropout: for the tests that compile more than one program
# (XLA's CPU compile time, not the run time, dominates these tests).
ONE_LEVEL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_groups=4, dropout=0.1)


def _inputs(batch=2, size=8, channels=3):
  kx, _ = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
  t = jnp.array([3.0, 871.0][:batch], jnp.float32)
  return x, t


def _random_params(net, x, t, scale=0.2):
  """Random parameters with the structure `net.init` gives, drawn on the host.

  Cheaper than `init` (whose many RNG calls take seconds to compile on CPU), and unlike the
  DDPM init it does not zero each residual branch's last layer, which would hide dropout
  and most gradients.
  """
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, train=False))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _num_params(net, shape=(1, 32, 32, 3)):
  init = lambda: net.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]), train=False)  # noqa: E731
  return sum(math.prod(p.shape) for p in jax.tree.leaves(jax.eval_shape(init)))


def test_parameter_counts_match_diffusers_ddpm_cifar10():
  assert _num_params(UNet(dropout=0.1)) == 35_746_307
  assert _num_params(UNet(ch=32, dropout=0.1)) == 2_245_763


def test_param_structure_and_output_shapes():
  x, t = _inputs()
  one_level = UNet(**ONE_LEVEL)
  params = jax.eval_shape(lambda: one_level.init(jax.random.key(0), x, t, train=False))["params"]
  assert set(params) == {"conv_in", "time_embed", "down_0_res_0", "down_0_attn_0", "mid_res_0", "mid_attn",
                         "mid_res_1", "up_0_res_0", "up_0_attn_0", "up_0_res_1", "up_0_attn_1", "norm_out",
                         "conv_out"}
  net5 = UNet(**TINY, out_channels=5)
  params5 = _random_params(net5, x, t)
  assert jax.eval_shape(lambda: net5.apply({"params": params5}, x, t, train=False)).shape == (2, 8, 8, 5)
  # a scalar t is broadcast over the batch
  assert jax.eval_shape(lambda: net5.apply({"params": params5}, x, 3.0, train=False)).shape == (2, 8, 8, 5)


def test_dropout_only_in_train_mode():
  x, t = _inputs()
  net = UNet(**ONE_LEVEL)
  params = _random_params(net, x, t)
  apply = jax.jit(lambda key, train: net.apply({"params": params}, x, t, train=train, rngs={"dropout": key}),
                  static_argnums=1)
  k1, k2 = jax.random.key(10), jax.random.key(11)
  train1, train2 = apply(k1, True), apply(k2, True)
  assert float(jnp.max(jnp.abs(train1 - train2))) > 1e-3
  np.testing.assert_array_equal(apply(k1, False), apply(k2, False))
  np.testing.assert_array_equal(apply(k1, True), train1)


def test_bad_inputs_raise():
  x, t = _inputs()
  net = UNet(**TINY)
  params = _random_params(net, x, t)
  with pytest.raises(InputError, match="rank 4"):
    net.apply({"params": params}, x[0], t, train=False)
  with pytest.raises(InputError, match="divisible by 2"):
    net.apply({"params": params}, jnp.zeros((2, 7, 8, 3)), t, train=False)
  with pytest.raises(InputError, match="t.shape"):
    net.apply({"params": params}, x, jnp.zeros((3,)), train=False)
  with pytest.raises(ConfigError, match="num_groups"):
    jax.eval_shape(lambda: UNet(**{**TINY, "ch": 6}).init(jax.random.key(0), x, t, train=False))


def test_output_float32_and_bfloat16_compute():
  x, t = _inputs()
  params = _random_params(UNet(**TINY), x, t)
  out32 = jax.jit(lambda p: UNet(**TINY).apply({"params": p}, x, t, train=False))(params)
  assert out32.shape == x.shape and out32.dtype == jnp.float32
  out16 = jax.jit(lambda p: UNet(**TINY, dtype=jnp.bfloat16).apply({"params": p}, x, t, train=False))(params)
  assert out16.shape == x.shape and out16.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32)))
  assert err < 0.05 * float(jnp.max(jnp.abs(out32))), err


def test_remat_same_output_and_gradients():
  x, t = _inputs()
  params = _random_params(UNet(**ONE_LEVEL), x, t)
  key = jax.random.key(5)

  def loss(params, remat):
    out = UNet(**ONE_LEVEL, remat=remat).apply({"params": params}, x, t, train=True, rngs={"dropout": key})
    return jnp.mean(jnp.square(out)), out

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (g0, out0), (g1, out1) = grad_fn(params, False), grad_fn(params, True)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)


@pytest.mark.parametrize("dim,flip,shift", [(16, False, 1.0), (16, True, 0.0), (7, False, 1.0)])
def test_timestep_embedding_formula(dim, flip, shift):
  t = np.array([0.0, 1.0, 500.0, 999.0])
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
  args = t[:, None] * freqs[None]
  want = np.concatenate([np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    want = np.pad(want, ((0, 0), (0, 1)))
  got = layers.timestep_embedding(jnp.asarray(t, jnp.float32), dim, flip_sin_to_cos=flip, freq_shift=shift)
  assert got.shape == (4, dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-4)
  with pytest.raises(InputError, match="t.shape"):
    layers.timestep_embedding(jnp.zeros((2, 1)), dim)


def test_group_norm_matches_flax_reference():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  ours = layers.GroupNorm(num_groups=4, epsilon=1e-6, act=True)
  ref = nn.GroupNorm(num_groups=4, epsilon=1e-6)
  variables = jax.eval_shape(lambda: ours.init(jax.random.key(1), x))
  scale = 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (16,))
  bias = 0.1 * jax.random.normal(jax.random.key(3), (16,))
  both = jax.jit(lambda p: (ours.apply({"params": p}, x), nn.silu(ref.apply({"params": p}, x))))
  got, want = both({"scale": scale, "bias": bias})
  assert jax.tree.map(jnp.shape, variables["params"]) == {"scale": (16,), "bias": (16,)}
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_time_embedding_mlp_shapes():
  emb = layers.timestep_embedding(jnp.arange(3.0), 32)
  mlp = layers.TimeEmbedding(128)
  variables = jax.eval_shape(lambda: mlp.init(jax.random.key(0), emb))
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      "dense_0": {"kernel": (32, 128), "bias": (128,)}, "dense_1": {"kernel": (128, 128), "bias": (128,)}}
  assert jax.eval_shape(mlp.apply, variables, emb).shape == (3, 128)


def test_blocks_start_as_identity():
  """DDPM init: the last layer of every residual branch is zero, the others are not."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  temb = jnp.ones((2, 32))
  resnet, attn = layers.ResnetBlock(8, num_groups=4), layers.AttentionBlock(num_groups=4)

  @jax.jit
  def init_and_apply(key):
    p_res = resnet.init(key, x, temb, False)
    p_attn = attn.init(key, x)
    return p_res, p_attn, resnet.apply(p_res, x, temb, False), attn.apply(p_attn, x)

  p_res, p_attn, y_res, y_attn = init_and_apply(jax.random.key(1))
  assert not np.any(p_res["params"]["conv_1"]["kernel"]) and not np.any(p_attn["params"]["out_proj"]["kernel"])
  assert float(jnp.std(p_res["params"]["conv_0"]["kernel"])) > 0.01
  np.testing.assert_array_equal(y_res, x)
  np.testing.assert_array_equal(y_attn, x)


def test_dtype_names_and_auto():
  """Config dtype strings resolve; 'auto' is float32 on CPU; param_dtype='auto' is refused."""
  from jaxdiff.models import create_model
  from jaxdiff.errors import ConfigError
  assert jax.default_backend() == "cpu"
  assert create_model("unet", **TINY, dtype="auto").dtype == jnp.float32
  assert create_model("unet", **TINY, dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ConfigError, match=r"config.model.dtype='fp8' is not supported; use one of float32"):
    create_model("unet", **TINY, dtype="fp8")
  with pytest.raises(ConfigError, match=r"config.model.param_dtype='auto' is not supported"):
    create_model("unet", **TINY, param_dtype="auto")
