"""Steps compiled ahead of their first run, saved to disk and loaded back without tracing.

`AotJit(jax.jit(step), cache_dir=..., fingerprint=...)` compiles `step` at its first call,
before running it, and then hands the heap the compiler freed back to the OS
(`release_host_memory`), so the step's buffers do not come on top of it; the train loop,
`run_sample.py` and the benchmarks run their steps this way.

JAX's persistent compilation cache (`config.compilation_cache_dir`) skips XLA's compile on a
second run, but its key is the lowered program, so every run still traces and lowers the step
first: for the DDPM CIFAR-10 train step on CPU that is ~2 s of a ~8 s warm start. This module
keeps, beside that cache, the serialized executable itself (`jax.experimental.serialize_executable`)
under a key computed *without* tracing:

* `fingerprint`: a string from the caller that determines the program (run_train passes the
  whole config as JSON, the benchmark its flags);
* a digest of jaxdiff's own source files, so editing jaxdiff invalidates every entry;
* jax / jaxlib / flax / optax / numpy versions, `XLA_FLAGS` / `LIBTPU_INIT_ARGS` and JAX's
  config values;
* the devices (`sharding.device_fingerprint`): platform, kinds, ids, process index and count;
* the arguments' tree structure, shapes, dtypes and shardings.

Code outside jaxdiff that changes the step (a monkeypatch, a locally edited flax) is not in the
key: such runs should use a fresh cache directory or `cache_executables=False`. An entry that
cannot be read or loaded is recompiled and rewritten, never fatal. Entries are written to a
temporary file and renamed, so a crash mid-write never leaves a truncated entry.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import tempfile
import time
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable

from jaxdiff import sharding

log = logging.getLogger(__name__)

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """sha256 over jaxdiff's .py files (relative path and contents, in sorted order)."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for name in sorted(f for f in filenames if f.endswith(".py")):
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        h.update(f.read() + b"\0")
  return h.hexdigest()


def _environment() -> str:
  versions = []
  for p in _PACKAGES:
    try:
      versions.append(f"{p}={importlib.metadata.version(p)}")
    except importlib.metadata.PackageNotFoundError:
      versions.append(f"{p}=?")
  env = [f"{k}={os.environ.get(k, '')}" for k in _ENV]
  flags = sorted((k, repr(v)) for k, v in jax.config.values.items())
  return repr((versions, env, flags, sharding.device_fingerprint()))


def _signature(args: tuple) -> str:
  """Tree structure plus shape, dtype, weak type and sharding of every leaf."""
  leaves, treedef = jax.tree.flatten(args)

  def leaf(x):
    sh = getattr(x, "sharding", None)
    return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), repr(sh))

  return repr((str(treedef), [leaf(x) for x in leaves]))


def cache_key(fingerprint: str, args: tuple) -> str:
  h = hashlib.sha256()
  for part in (fingerprint, source_digest(), _environment(), _signature(args)):
    h.update(part.encode() + b"\0")
  return h.hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def use_compilation_cache(cache_dir: str) -> None:
  """Points JAX's persistent compilation cache at `cache_dir` ('' leaves it as it is).

  JAX reads the setting at its first cached compile, so call this before compiling anything.
  """
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)


def _device_ids(compiled: jax.stages.Compiled) -> list[int]:
  """The program's devices in its own order (loading onto all devices would expect more shards)."""
  shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
  return [d.id for d in shardings[0]._device_assignment]


def compile_cached(fn: Callable, *args: Any, cache_dir: str = "", fingerprint: str = "",
                   name: str = "step") -> tuple[jax.stages.Compiled, bool]:
  """`fn.lower(*args).compile()`, or the executable saved by an earlier run with the same key.

  `fn` is a `jax.jit`-wrapped function and `args` example arguments (arrays or
  `jax.ShapeDtypeStruct`s with shardings); `cache_dir=''` compiles without saving. Returns the
  compiled step and whether it was loaded from `cache_dir`. The returned object only accepts
  arguments with exactly these shapes, dtypes and shardings. Either way, the heap memory the
  compiler freed is then returned to the OS (`release_host_memory`).
  """
  compiled, loaded = _load_or_compile(fn, args, cache_dir, fingerprint, name)
  release_host_memory()
  return compiled, loaded


def _load_or_compile(fn, args, cache_dir, fingerprint, name):
  if not cache_dir:
    return fn.lower(*args).compile(), False
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"jaxdiff-{name}-{cache_key(fingerprint, args)}.exe")
  if os.path.exists(path):
    try:
      with open(path, "rb") as f:
        payload, in_tree, out_tree, device_ids = pickle.load(f)
      by_id = {d.id: d for d in jax.devices()}
      compiled = serialize_executable.deserialize_and_load(
          payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
      log.info("Loaded the compiled %s from %s.", name, path)
      return compiled, True
    except Exception as e:  # a corrupt or incompatible entry: compile it again
      log.warning("Could not load the compiled %s from %s (%s: %s); compiling it again.",
                  name, path, type(e).__name__, e)
  compiled = fn.lower(*args).compile()
  try:
    data = pickle.dumps((*serialize_executable.serialize(compiled), _device_ids(compiled)))
  except (ValueError, NotImplementedError, TypeError, pickle.PicklingError) as e:
    log.warning("The compiled %s cannot be serialized (%s); it will be compiled again next run.", name, e)
    return compiled, False
  _write_atomically(path, data)
  return compiled, False


@functools.lru_cache(maxsize=1)
def _release_functions() -> tuple:
  """tcmalloc's release call when it is preloaded (jaxdiff.cli), then glibc's malloc_trim."""
  try:
    process = ctypes.CDLL(None)
  except OSError:
    return ()
  found = []
  for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
    fn = getattr(process, name, None)  # absent: no tcmalloc / not glibc (macOS, musl)
    if fn is not None:
      found.append((fn, args))
  return tuple(found)


def release_host_memory() -> bool:
  """Returns the host heap's free pages to the OS; False where the allocator offers no way.

  XLA's compiler allocates and frees hundreds of MB in small pieces; the allocator keeps those
  pages resident, and a step's buffers are mapped fresh beside them, so without this the
  process holds both at once (small U-Net train step on CPU: peak RSS 2400 -> 1930 MB).
  Calls tcmalloc's `MallocExtension_ReleaseFreeMemory` when tcmalloc is preloaded and glibc's
  `malloc_trim(0)`.
  """
  calls = _release_functions()
  for fn, args in calls:
    fn(*args)
  return bool(calls)


class AotJit:
  """A `jax.jit`-wrapped function compiled ahead of its first execution, at its first call.

  The compile goes through `compile_cached`: from/into `cache_dir` when one is given, and
  followed by `release_host_memory` before the step's own buffers are allocated. Later calls
  must pass arguments with the first call's shapes, dtypes and shardings (a train or sampling
  loop does). `loaded` and `compile_s` say how the first call got its executable.
  """

  def __init__(self, fn: Callable, *, cache_dir: str = "", fingerprint: str = "", name: str = "step"):
    self._fn, self._cache_dir, self._fingerprint, self._name = fn, cache_dir, fingerprint, name
    self._compiled = None
    self.loaded: bool | None = None
    self.compile_s: float | None = None

  def __call__(self, *args):
    if self._compiled is None:
      t0 = time.perf_counter()
      self._compiled, self.loaded = compile_cached(
          self._fn, *args, cache_dir=self._cache_dir, fingerprint=self._fingerprint, name=self._name)
      self.compile_s = time.perf_counter() - t0
    return self._compiled(*args)
