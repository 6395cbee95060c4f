"""Meshes, FSDP, device-count-invariant sampling, and a transfer-guarded training loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxdiff import aot, generate, sharding, train
from jaxdiff.errors import ConfigError


def test_create_mesh_shapes_and_errors():
  m = sharding.create_mesh({"data": -1})
  assert dict(m.shape) == {"data": 8, "fsdp": 1}
  m = sharding.create_mesh({"data": 2, "fsdp": -1})
  assert dict(m.shape) == {"data": 2, "fsdp": 4} and sharding.num_data_shards(m) == 8
  with pytest.raises(ConfigError, match="needs a multiple of 3 devices"):
    sharding.create_mesh({"data": 3, "fsdp": 1})
  with pytest.raises(ConfigError, match="uses 4 devices, but there are 8"):
    sharding.create_mesh({"data": 4})
  with pytest.raises(ConfigError, match="unknown axes"):
    sharding.create_mesh({"model": 8})
  with pytest.raises(ConfigError, match="only one axis may be -1"):
    sharding.create_mesh({"data": -1, "fsdp": -1})


def fsdp_config():
  c = load_config("tiny")
  c.data.resolution = 16
  c.model.update(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), num_groups=8)
  return c


def build(c, mesh):
  exp = train.build_experiment(c)
  opt = train.make_optimizer(**c.optimizer.to_dict())
  init, abstract, state_sh = train.abstract_train_state(c, exp, opt, mesh)
  step = jax.jit(functools.partial(train.train_step, model=exp.model, loss_fn=train.make_loss(c, exp.process),
                                   optimizer=opt, ema_decay=c.training.ema_decay),
                 in_shardings=(state_sh, {"x": sharding.batch_sharding(mesh, 4)}, sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  return init, abstract, state_sh, step


def per_device_bytes(tree):
  dev0 = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      if s.device == dev0:
        total += s.data.size * s.data.dtype.itemsize
  return total


def test_fsdp_state_is_sharded_and_steps_like_one_device():
  c = fsdp_config()
  mesh1 = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  mesh_fsdp = sharding.create_mesh({"data": 1, "fsdp": 8})
  init1, _, sh1, step1 = build(c, mesh1)
  _, abstract, sh8, step8 = build(c, mesh_fsdp)
  state8 = jax.jit(init1, out_shardings=sh8)(jax.random.key(0))  # initialised sharded
  state1 = jax.device_put(state8, sh1)

  kernel = state8.params["up_0_res_0"]["conv_0"]["kernel"]  # [3, 3, 96, 32]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (3, 3, 12, 32)
  mu = state8.opt_state[1][0].mu["up_0_res_0"]["conv_0"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (3, 3, 12, 32)  # optimizer state sharded too
  full = per_device_bytes(state1)
  assert per_device_bytes(state8) < 0.2 * full  # ~1/8 for everything but the small arrays

  batch = {"x": jax.random.normal(jax.random.key(1), (8, 16, 16, 3))}
  key = jax.random.key(2)
  s1, m1 = step1(state1, batch, key)
  s8, m8 = step8(state8, batch, key)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert s8.params["up_0_res_0"]["conv_0"]["kernel"].sharding.spec == kernel.sharding.spec


def test_sampling_is_the_same_on_one_and_eight_devices():
  c = load_config("tiny")
  exp = train.build_experiment(c)
  @jax.jit  # (eager init compiles op by op)
  def init(key):
    params = exp.model.init(key, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), train=False)["params"]
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)

  params = init(jax.random.key(0))
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.create_mesh({"data": len(devices)}, devices=devices)
    fn = generate.make_sampler(exp, c, batch_size=16, mesh=mesh, method="ancestral", num_steps=6)
    x, nfe = fn(jax.device_put(params, sharding.replicated(mesh)), jax.random.key(7))
    assert len(x.sharding.device_set) == len(devices) and int(nfe) == 6
    out.append(np.asarray(x))
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_training_loop_under_transfer_guard_compiles_once(tmp_path, monkeypatch):
  """No implicit host<->device transfer inside the loop, and one compilation of the step."""
  compiled = []
  real_jit = jax.jit

  def spy_jit(fn, *a, **kw):
    jitted = real_jit(fn, *a, **kw)
    step_fn = fn.keywords.get("step_fn") if isinstance(fn, functools.partial) and fn.func is train.run_steps else None
    if step_fn is not None and step_fn.func is train.train_step:
      compiled.append(jitted)
    return jitted

  # The loop runs the step compiled ahead (jaxdiff.aot): compiled once, and a call with other
  # shapes or shardings would raise instead of recompiling.
  real_compile = aot.compile_cached
  compiles = []

  def spy_compile(fn, *args, **kw):
    compiles.append(kw["name"])
    return real_compile(fn, *args, **kw)

  monkeypatch.setattr(train.jax, "jit", spy_jit)
  monkeypatch.setattr(aot, "compile_cached", spy_compile)
  c = load_config("tiny")
  c.training.update(transfer_guard="disallow", num_steps=4, log_every=1)
  train.train_and_evaluate(c, str(tmp_path))
  assert len(compiled) == 1 and compiles.count("train_step") == 1
