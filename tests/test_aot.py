"""Compiled steps saved and loaded without tracing (jaxdiff.aot), alone and in the train loop."""

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxdiff import aot, generate, sharding, train


def entries(cache_dir):
  return sorted(f for f in os.listdir(cache_dir) if f.endswith(".exe"))


def make_step(mesh):
  def step(w, x):
    return w - 0.1 * jnp.mean(x, axis=0), jnp.sum(x * w)

  batch = sharding.batch_sharding(mesh, 2)
  repl = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(repl, batch), out_shardings=(repl, repl), donate_argnums=0), batch, repl


def test_second_compile_is_loaded_and_gives_the_same_numbers(tmp_path):
  mesh = sharding.create_mesh({"data": -1})
  step, batch_sh, repl = make_step(mesh)
  x = jax.device_put(jnp.arange(32.0).reshape(8, 4), batch_sh)
  fresh = lambda: jax.device_put(jnp.ones(4), repl)  # noqa: E731  (donated each call)
  first, loaded = aot.compile_cached(step, fresh(), x, cache_dir=str(tmp_path), fingerprint="f")
  assert not loaded and len(entries(tmp_path)) == 1
  again, loaded = aot.compile_cached(step, fresh(), x, cache_dir=str(tmp_path), fingerprint="f")
  assert loaded and len(entries(tmp_path)) == 1
  for a, b in zip(first(fresh(), x), again(fresh(), x)):
    np.testing.assert_array_equal(a, b)
  w, loss = again(fresh(), x)
  assert w.sharding.is_equivalent_to(repl, 1) and float(loss) == float(jnp.sum(jnp.arange(32.0)))


@pytest.mark.parametrize("change", ["fingerprint", "shape", "dtype", "sharding"])
def test_anything_that_changes_the_program_changes_the_key(change):
  mesh = sharding.create_mesh({"data": -1})
  x = jax.device_put(jnp.zeros((8, 4)), sharding.batch_sharding(mesh, 2))
  base = aot.cache_key("f", (x,))
  other = {
      "fingerprint": lambda: aot.cache_key("g", (x,)),
      "shape": lambda: aot.cache_key("f", (jax.device_put(jnp.zeros((16, 4)), x.sharding),)),
      "dtype": lambda: aot.cache_key("f", (x.astype(jnp.bfloat16),)),
      "sharding": lambda: aot.cache_key("f", (jax.device_put(x, sharding.replicated(mesh)),)),
  }[change]()
  assert other != base
  assert aot.cache_key("f", (x,)) == base  # and nothing else does


def test_source_digest_covers_every_jaxdiff_module(tmp_path, monkeypatch):
  digest = aot.source_digest()
  assert len(digest) == 64
  # the digest is over the package's files: a copy with one byte changed differs
  import shutil

  pkg = os.path.dirname(aot.__file__)
  copy = tmp_path / "jaxdiff"
  shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
  monkeypatch.setattr(aot, "__file__", str(copy / "aot.py"))
  aot.source_digest.cache_clear()
  try:
    assert aot.source_digest() == digest
    with open(copy / "models" / "layers.py", "a") as f:
      f.write("\n# edited\n")
    aot.source_digest.cache_clear()
    assert aot.source_digest() != digest
  finally:
    aot.source_digest.cache_clear()


def test_a_corrupt_entry_is_recompiled_and_rewritten(tmp_path, caplog):
  step = jax.jit(lambda x: 2 * x)
  x = jnp.ones(3)
  aot.compile_cached(step, x, cache_dir=str(tmp_path), fingerprint="f")
  (path,) = entries(tmp_path)
  with open(tmp_path / path, "r+b") as f:
    f.truncate(100)
  with caplog.at_level(logging.WARNING, logger="jaxdiff.aot"):
    compiled, loaded = aot.compile_cached(step, x, cache_dir=str(tmp_path), fingerprint="f")
  assert not loaded and "compiling it again" in caplog.text
  np.testing.assert_array_equal(compiled(x), 2 * x)
  assert aot.compile_cached(step, x, cache_dir=str(tmp_path), fingerprint="f")[1]  # rewritten whole
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_an_unserializable_executable_still_runs(tmp_path, monkeypatch, caplog):
  def refuse(compiled):
    raise NotImplementedError("serialize_executables with const_args")

  monkeypatch.setattr(aot.serialize_executable, "serialize", refuse)
  with caplog.at_level(logging.WARNING, logger="jaxdiff.aot"):
    compiled, loaded = aot.compile_cached(jax.jit(jnp.sin), jnp.zeros(2), cache_dir=str(tmp_path),
                                          fingerprint="f")
  assert not loaded and entries(tmp_path) == [] and "cannot be serialized" in caplog.text
  np.testing.assert_array_equal(compiled(jnp.zeros(2)), 0.0)


def test_cached_jit_compiles_at_its_first_call(tmp_path):
  calls = []

  def f(x):
    calls.append(1)  # counts traces
    return x + 1

  for expect_loaded in (False, True):
    fn = aot.AotJit(jax.jit(f), cache_dir=str(tmp_path), fingerprint="f", name="plus")
    assert fn.loaded is None
    np.testing.assert_array_equal(fn(jnp.zeros(2)), 1.0)
    np.testing.assert_array_equal(fn(jnp.ones(2)), 2.0)
    assert fn.loaded is expect_loaded and fn.compile_s > 0
  assert len(calls) == 1  # the second process-equivalent never traced
  assert entries(tmp_path)[0].startswith("jaxdiff-plus-")


@pytest.fixture
def restore_jax_cache_dir():
  before = jax.config.values["jax_compilation_cache_dir"]
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_a_second_training_run_loads_the_step_and_trains_identically(tmp_path, caplog, monkeypatch,
                                                                    restore_jax_cache_dir):
  losses = []
  for run in range(2):
    c = load_config("tiny")
    c.compilation_cache_dir = str(tmp_path / "cache")
    workdir = str(tmp_path / f"run{run}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxdiff.aot"):
      train.train_and_evaluate(c, workdir)
    assert ("Loaded the compiled train_step" in caplog.text) == (run == 1)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      losses.append([json.loads(line)["loss"] for line in f])
  assert losses[0] == losses[1] and len(losses[0]) == 2
  assert len(entries(tmp_path / "cache")) == 1
  # run_sample on that run uses the training run's compilation cache
  jax.config.update("jax_compilation_cache_dir", None)
  workdir = str(tmp_path / "run0")
  generate.generate(generate.load_config(workdir), workdir, method="ddim", num_steps=2, num_samples=8,
                    out_dir=str(tmp_path / "samples"))
  assert jax.config.values["jax_compilation_cache_dir"] == str(tmp_path / "cache")
  # cache_executables=False: only JAX's own cache, no entry is read or written
  asked = []
  compile_cached = aot.compile_cached

  def spy(*args, **kw):
    asked.append((kw["name"], kw["cache_dir"]))
    return compile_cached(*args, **kw)

  monkeypatch.setattr(aot, "compile_cached", spy)
  c = load_config("tiny")
  c.compilation_cache_dir, c.cache_executables = str(tmp_path / "cache"), False
  train.train_and_evaluate(c, str(tmp_path / "run2"))
  assert asked == [("init", ""), ("train_step", "")]


def test_compiling_returns_the_freed_heap_to_the_os(monkeypatch):
  assert aot.release_host_memory() is (sys.platform == "linux")  # glibc's malloc_trim
  released = []
  monkeypatch.setattr(aot, "release_host_memory", lambda: released.append(1))
  fn = aot.AotJit(jax.jit(jnp.cos))  # no cache dir: compiled ahead, not saved
  np.testing.assert_array_equal(fn(jnp.zeros(2)), 1.0)
  fn(jnp.zeros(2))
  assert released == [1] and fn.loaded is False
