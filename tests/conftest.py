"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os
import sys

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The tests check numbers, not speed, and most of their time is XLA:CPU compiling many small
# programs: LLVM at -O0 halves that (the suite: 10m10s -> ~7m on 2 cores). HLO optimization and
# fusion are unchanged. XLA_FLAGS=--xla_backend_optimization_level=3 runs the suite fully
# optimized (the benchmark scripts' tests keep -O0 too: they check records, not speed).
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session (inherited by the scripts the tests
# start): the tiny configs compile the same programs many times over.
# The process that makes it (pytest's controller under xdist) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdiff-test-jit-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TFDS = os.path.abspath(os.path.join(ROOT, "..", "shared", "tfds"))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tfds_dir():
  """The offline TFDS data_dir with MNIST (../shared/tfds); skips if absent."""
  if not os.path.isdir(os.path.join(SHARED_TFDS, "mnist")):
    msg = f"MNIST array_record data not found at {SHARED_TFDS}"
    if os.environ.get("JAXDIFF_REQUIRE_SHARED"):  # CI: missing data is a failure, not a skip
      pytest.fail(msg)
    pytest.skip(msg)
  return SHARED_TFDS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(config, workdir) of configs/tiny.py trained for 2 steps (checkpoints at steps 1 and 2), shared
  by the evaluation tests (likelihood, FID) that run in one worker."""
  from jaxdiff import train

  config = load_config("tiny")
  config.training.update(num_steps=2, checkpoint_every=1, num_final_samples=0)
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def load_config(name: str, arg: str | None = None):
  """Loads configs/<name>.py's get_config (unlocked, for tests to edit)."""
  import importlib.util

  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg is not None else mod.get_config()
