"""Tests of NCSN++ / DDPM++ (`jaxdiff.models.ncsnpp`) and the score_sde converter, on tiny nets.

The CIFAR-10 networks (62.8M / 61.8M parameters) are only shape-evaluated. The tiny
fixtures under tests/fixtures/score_sde_tiny/ hold score_sde_pytorch's own NCSNpp (T<n>.npz)
and score_sde's JAX one (T<n>_flax.npz): weights, an input and its output, for four
combinations of their options; `make_score_sde_fixture.py` and
`make_score_sde_flax_fixture.py` there say how they were made.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import ncsnpp
from jaxdiff.models.convert_score_sde import (convert_score_sde_flax_params, convert_score_sde_state_dict,
                                              ncsnpp_kwargs_from_score_sde, unet_kwargs_from_score_sde)
from jaxdiff.models.ncsnpp import DDPMPP_CIFAR10, NCSNpp

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "score_sde_tiny")
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)


def _num_params(net, shape=(1, 32, 32, 3)):
  init = lambda: net.init(jax.random.key(0), jnp.zeros(shape), jnp.ones(shape[:1]), train=False)  # noqa: E731
  return sum(math.prod(p.shape) for p in jax.tree.leaves(jax.eval_shape(init)))


def test_parameter_counts_match_score_sde_cifar10():
  # score_sde_pytorch's NCSNpp built from configs/ve/cifar10_ncsnpp_continuous.py and
  # configs/vp/cifar10_ddpmpp_continuous.py: sum of p.numel() over model.parameters(), which
  # includes the 128 fixed Fourier frequencies (NCSN++).
  assert _num_params(NCSNpp()) == 62_758_915
  assert _num_params(NCSNpp(**DDPMPP_CIFAR10)) == 61_804_419


def _upfirdn_dense(x, k, up, down, pad):
  """upfirdn2d written directly: zero insertion, padding, a 2-D convolution, decimation (numpy)."""
  b, h, w, c = x.shape
  xu = np.zeros((b, h * up, w * up, c))
  xu[:, ::up, ::up] = x
  xp = np.pad(xu, ((0, 0), pad, pad, (0, 0)))
  kf = k[::-1, ::-1]
  kh = k.shape[0]
  oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kh + 1
  out = np.zeros((b, oh, ow, c))
  for i in range(kh):
    for j in range(kh):
      out += kf[i, j] * xp[:, i:i + oh, j:j + ow]
  return out[:, ::down, ::down]


@pytest.mark.parametrize("fir_kernel", [(1, 3, 3, 1), (1, 2, 5)])
def test_fir_resampling_is_upfirdn(fir_kernel):
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 3))
  k1 = np.asarray(fir_kernel, np.float64)
  k2 = np.outer(k1, k1) / k1.sum() ** 2
  p = len(fir_kernel) - 2
  up = ncsnpp.fir_upsample(jnp.asarray(x, jnp.float32), fir_kernel)
  np.testing.assert_allclose(up, _upfirdn_dense(x, 4 * k2, 2, 1, ((p + 1) // 2 + 1, p // 2)), atol=1e-5)
  down = ncsnpp.fir_downsample(jnp.asarray(x, jnp.float32), fir_kernel)
  np.testing.assert_allclose(down, _upfirdn_dense(x, k2, 1, 2, ((p + 1) // 2, p // 2)), atol=1e-5)
  assert up.shape == (2, 12, 12, 3) and down.shape == (2, 3, 3, 3)
  if fir_kernel == (1, 3, 3, 1):  # both of its phases sum to 1/2: away from the borders a constant stays
    const = ncsnpp.fir_upsample(jnp.ones((1, 8, 8, 1)), fir_kernel)
    np.testing.assert_allclose(const[0, 3:-3, 3:-3, 0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(ncsnpp.naive_downsample(jnp.asarray(x)), x.reshape(2, 3, 2, 3, 2, 3).mean((2, 4)),
                             atol=1e-6)
  np.testing.assert_allclose(ncsnpp.naive_upsample(jnp.asarray(x))[:, ::2, 1::2], x, atol=1e-6)


# (resblock_type, fir, progressive, progressive_input, progressive_combine, resamp_with_conv): every
# value of each option, and every pair of block type x pyramid (the fixtures run four more).
COMBOS = [("biggan", True, "output_skip", "none", "sum", True),
          ("biggan", False, "residual", "input_skip", "cat", True),
          ("biggan", True, "none", "residual", "sum", True),
          ("ddpm", True, "none", "input_skip", "sum", False),
          ("ddpm", False, "output_skip", "residual", "sum", True),
          ("ddpm", False, "residual", "none", "sum", False)]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_option_combinations_build(combo):
  # Shapes only (no compilation), with an output width other than the input's.
  resblock, fir, prog, prog_in, combine, with_conv = combo
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.ones((2,))
  net = NCSNpp(**TINY, resblock_type=resblock, fir=fir, progressive=prog, progressive_input=prog_in,
               progressive_combine=combine, resamp_with_conv=with_conv, out_channels=5)
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, train=False))
  out = jax.eval_shape(lambda p: net.apply(p, x, t, train=True, rngs={"dropout": jax.random.key(1)}), params)
  assert out.shape == (2, 8, 8, 5)


def test_custom_vjp_and_remat_give_the_same_values_and_gradients():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  t = jnp.array([0.3, 7.0])
  kw = dict(TINY, resblock_type="ddpm", progressive="residual", progressive_input="input_skip",
            init_scale=1.0)
  shapes = jax.eval_shape(lambda: NCSNpp(**kw).init(jax.random.key(0), x, t, train=False))["params"]
  rng = np.random.default_rng(0)  # drawn on the host: init's RNG ops take seconds to compile
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)
  key = jax.random.key(5)

  def loss(params, custom_vjp, remat):
    out = NCSNpp(**kw, custom_vjp=custom_vjp, remat=remat).apply(
        {"params": params}, x, t, train=True, rngs={"dropout": key})
    return jnp.mean(jnp.square(out)), out

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=(1, 2))
  (g0, out0), (g1, out1) = grad_fn(params, True, False), grad_fn(params, False, True)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The Fourier frequencies are fixed: no gradient reaches them.
  assert not np.any(np.asarray(g0["fourier_freqs"]))
  assert float(jnp.max(jnp.abs(out0))) > 0.0


def test_bad_config_and_inputs_raise():
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.ones((2,))
  for bad, match in ((dict(resblock_type="resnet"), "resblock_type"), (dict(progressive="skip"), "progressive"),
                     (dict(embedding_type="learned"), "embedding_type"), (dict(fir_kernel=()), "fir_kernel"),
                     (dict(num_res_blocks=0), "num_res_blocks")):
    with pytest.raises(ConfigError, match=match):
      jax.eval_shape(lambda: NCSNpp(**{**TINY, **bad}).init(jax.random.key(0), x, t, train=False))
  net = NCSNpp(**TINY)
  with pytest.raises(InputError, match="rank 4"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x[0], t, train=False))
  with pytest.raises(InputError, match="divisible by 2"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((2, 7, 8, 3)), t, train=False))
  with pytest.raises(InputError, match="num_classes=0"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, jnp.zeros((2,), jnp.int32), train=False))


def _fixture(case):
  with open(os.path.join(FIXTURES, f"{case}.json")) as f:
    cfg = json.load(f)
  arrays = np.load(os.path.join(FIXTURES, f"{case}.npz"))
  state = {k[len("param/"):]: arrays[k] for k in arrays.files if k.startswith("param/")}
  return cfg, arrays, state


def _flax_fixture(case):
  """score_sde's (JAX) own NCSNpp on the same case: its params tree, x, t and output (NHWC)."""
  arrays = np.load(os.path.join(FIXTURES, f"{case}_flax.npz"))
  flat = {tuple(k[len("param/"):].split("/")): arrays[k] for k in arrays.files if k.startswith("param/")}
  return traverse_util.unflatten_dict(flat), arrays


def _unscale(cfg, ref, t, sigmas):
  """score_sde's output before its `scale_by_sigma` division (sigmas[t] for the positional embedding)."""
  if not cfg["scale_by_sigma"]:
    return ref
  sigma = t if cfg["embedding_type"] == "fourier" else sigmas[t.astype(np.int64)]
  return ref * sigma[:, None, None, None]


@pytest.mark.parametrize("case", ["T1", "T2", "T3", "T4"])
def test_matches_score_sde_ncsnpp_pytorch_and_jax(case):
  # T1 biggan + FIR + output_skip + input_skip (Fourier); T2 ddpm blocks + FIR convs + residual
  # pyramids (positional, no skip rescale); T3 ddpm blocks, nearest/avg-pool convs, input_skip
  # 'cat', data in [0, 1]; T4 biggan without FIR + residual input pyramid (Fourier). Each case
  # against score_sde_pytorch's NCSNpp and against score_sde's own (JAX / flax) NCSNpp.
  cfg, arrays, state = _fixture(case)
  net = NCSNpp(**ncsnpp_kwargs_from_score_sde(cfg, {"centered": cfg["centered"]}))
  shape = (cfg["image_size"], cfg["image_size"], cfg["num_channels"])
  apply = jax.jit(lambda p, x, t: net.apply({"params": p}, x, t, train=False))
  sigmas = np.exp(np.linspace(np.log(cfg["sigma_max"]), np.log(cfg["sigma_min"]), cfg["num_scales"]))

  params = convert_score_sde_state_dict(state, net, shape)
  x, t = arrays["x"].transpose(0, 2, 3, 1), arrays["t"]
  out = apply(params, x, t)
  ref = _unscale(cfg, arrays["out"].transpose(0, 2, 3, 1), t, arrays["param/sigmas"])
  np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)
  if case == "T1":  # a VE model's output is sigma * score = -eps: negate_output makes it eps
    neg = convert_score_sde_state_dict(state, net, shape, negate_output=True)
    np.testing.assert_allclose(apply(neg, x, t), -out, atol=1e-5)

  flax_params, flax_arrays = _flax_fixture(case)
  params = convert_score_sde_flax_params(flax_params, net, shape)
  ref = _unscale(cfg, flax_arrays["out"], flax_arrays["t"], sigmas)
  np.testing.assert_allclose(apply(params, flax_arrays["x"], flax_arrays["t"]), ref,
                             atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)


def test_score_sde_ddpm_loads_into_the_unet():
  # score_sde's (JAX) `ddpm` network is the DDPM U-Net with attention once per level going up:
  # UNet(up_attn_every_block=False). Its CIFAR-10 config (nf 128, (1, 2, 2, 2), 2 blocks,
  # attention at 16) has 35,218,947 parameters, counted from score_sde's own module; the
  # diffusers / Ho network, with attention after every up block, 35,746,307.
  from jaxdiff.models import UNet

  cifar = unet_kwargs_from_score_sde(dict(name="ddpm", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                          attn_resolutions=(16,), dropout=0.1), {"centered": True})
  assert _num_params(UNet(**cifar)) == 35_218_947
  assert _num_params(UNet(**{**cifar, "up_attn_every_block": True})) == 35_746_307

  with open(os.path.join(FIXTURES, "D1.json")) as f:
    cfg = json.load(f)
  net = UNet(**unet_kwargs_from_score_sde(cfg, {"centered": cfg["centered"]}))
  flax_params, arrays = _flax_fixture("D1")
  params = convert_score_sde_flax_params(flax_params, net, (8, 8, 3))
  out = jax.jit(lambda p: net.apply({"params": p}, arrays["x"], arrays["t"], train=False))(params)
  ref = arrays["out"]
  np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=0)

  with pytest.raises(InputError, match="attends once per level going up"):
    convert_score_sde_flax_params(flax_params, UNet(**{**cifar, "ch": 32, "up_attn_every_block": True}), (8, 8, 3))
  with pytest.raises(InputError, match="centered=False"):
    unet_kwargs_from_score_sde(cfg, {"centered": False})
  with pytest.raises(InputError, match="NCSNpp"):  # the PyTorch path is for NCSN++ only
    convert_score_sde_state_dict({}, net, (8, 8, 3))


def test_converter_rejects_a_mismatched_checkpoint():
  cfg, _, state = _fixture("T1")
  kwargs = ncsnpp_kwargs_from_score_sde(cfg, {"centered": True})
  with pytest.raises(InputError, match="modules with parameters"):  # one more residual block per level
    convert_score_sde_state_dict(state, NCSNpp(**{**kwargs, "num_res_blocks": 2}), (8, 8, 3))
  with pytest.raises(InputError, match="shapes"):  # another width
    convert_score_sde_state_dict(state, NCSNpp(**{**kwargs, "ch": 16}), (8, 8, 3))
  with pytest.raises(InputError, match="all_modules"):
    convert_score_sde_state_dict({"encoder.weight": np.zeros(3)}, NCSNpp(**kwargs), (8, 8, 3))
  with pytest.raises(InputError, match="nonlinearity"):
    ncsnpp_kwargs_from_score_sde({**cfg, "nonlinearity": "elu"})

  flax_params, _ = _flax_fixture("T1")
  # One more residual block per level; another width.
  with pytest.raises(InputError, match=r"needs \['AttnBlockpp_3', 'ResnetBlockBigGANpp_10'"):
    convert_score_sde_flax_params(flax_params, NCSNpp(**{**kwargs, "num_res_blocks": 2}), (8, 8, 3))
  with pytest.raises(InputError, match=r"GaussianFourierProjection_0 has shapes \(8,\) where NCSNpp's fourier_freqs"):
    convert_score_sde_flax_params(flax_params, NCSNpp(**{**kwargs, "ch": 16}), (8, 8, 3))
  # score_sde's T1 network with a conv in the input pyramid (T1 has none): a Downsample it lacks.
  with pytest.raises(InputError, match=r"needs \['Downsample_0'\]"):
    convert_score_sde_flax_params(flax_params, NCSNpp(**{**kwargs, "progressive_input": "residual"}), (8, 8, 3))
  with pytest.raises(InputError, match="Combine_0"):  # a module of another kind in its place
    convert_score_sde_flax_params({**flax_params, "Combine_0": flax_params["Dense_0"]}, NCSNpp(**kwargs),
                                  (8, 8, 3))


def test_load_score_sde_jax_checkpoint(tmp_path):
  # score_sde's run_lib saves flax's msgpack of its State (step, optimizer {target, state}, lr,
  # model_state, ema_rate, params_ema, rng) as <workdir>/checkpoints/checkpoint_<n>.
  from jaxdiff.models.convert_score_sde import load_score_sde_checkpoint

  ema, _ = _flax_fixture("T3")
  target = jax.tree.map(lambda a: 0.5 * a.astype(np.float32), ema)
  adam = {"step": np.int32(7), "param_states": jax.tree.map(lambda a: {"grad_ema": 0 * a, "grad_sq_ema": 0 * a},
                                                            target)}
  state = dict(step=np.int32(7), optimizer={"target": target, "state": adam}, lr=np.float32(2e-4),
               model_state={}, ema_rate=np.float32(0.999), params_ema=ema,
               rng=np.zeros((2,), np.uint32))
  ckpt = tmp_path / "checkpoints"
  ckpt.mkdir()
  (ckpt / "checkpoint_12").write_bytes(serialization.msgpack_serialize(state))
  (ckpt / "checkpoint_3").write_bytes(serialization.msgpack_serialize({**state, "params_ema": target}))
  (ckpt / "checkpoint_x").write_bytes(b"not one of score_sde's")

  loaded = load_score_sde_checkpoint(ckpt)  # the latest (12, not 3) and its EMA weights
  np.testing.assert_array_equal(loaded["Conv_0"]["kernel"], ema["Conv_0"]["kernel"])
  assert loaded["Conv_0"]["kernel"].dtype == np.float32
  raw = load_score_sde_checkpoint(ckpt / "checkpoint_12", ema=False)
  np.testing.assert_array_equal(raw["Conv_0"]["kernel"], target["Conv_0"]["kernel"])
  cfg = _fixture("T3")[0]
  net = NCSNpp(**ncsnpp_kwargs_from_score_sde(cfg, {"centered": cfg["centered"]}))
  # {"params": ...} (a variables dict) works too; the result has NCSNpp's structure.
  params = convert_score_sde_flax_params({"params": loaded}, net, (8, 8, 3))
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)),
                                      train=False))["params"])

  with pytest.raises(InputError, match="does not exist"):
    load_score_sde_checkpoint(ckpt / "checkpoint_99")
  with pytest.raises(InputError, match="not a flax msgpack checkpoint"):
    load_score_sde_checkpoint(ckpt / "checkpoint_x")
  (tmp_path / "other").write_bytes(serialization.msgpack_serialize({"params": ema}))
  with pytest.raises(InputError, match=r"holds \['params'\], not score_sde's training state"):
    load_score_sde_checkpoint(tmp_path / "other")
  with pytest.raises(InputError, match="no checkpoint_<n> file"):
    load_score_sde_checkpoint(tmp_path)


def test_model_section_builds_the_network_and_names_the_fix():
  from jaxdiff import configs, models

  section = configs.model_section("ncsnpp", ch=32, dtype="auto")
  assert (section.name, section.ch, section.fir, section.param_dtype) == ("ncsnpp", 32, True, "float32")
  assert "out_channels" not in section  # filled in by jaxdiff (super-resolution)
  net = models.create_model(**section.to_dict())
  assert isinstance(net, NCSNpp) and net.ch == 32 and net.fir_kernel == (1, 3, 3, 1)
  with pytest.raises(ConfigError, match="not fields of NCSNpp"):
    configs.model_section("ncsnpp", num_groups=8)
  # The U-Net's section with name='ncsnpp' (a command-line override) says how to switch networks.
  with pytest.raises(ConfigError, match=r"\['num_groups'\].*model_section\('ncsnpp'"):
    models.create_model(**{**configs.base_config().model.to_dict(), "name": "ncsnpp"})


def test_adamw_weight_decay_leaves_the_fixed_fourier_frequencies_alone():
  from jaxdiff import train

  params = {"fourier_freqs": jnp.ones((4,)), "conv_in": {"kernel": jnp.ones((3, 3, 1, 2))}}
  grads = {"fourier_freqs": jnp.zeros((4,)), "conv_in": {"kernel": jnp.zeros((3, 3, 1, 2))}}
  opt = train.make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.5)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_array_equal(updates["fourier_freqs"], 0.0)
  np.testing.assert_allclose(updates["conv_in"]["kernel"], -0.1 * 0.5, rtol=1e-6)  # decayed
