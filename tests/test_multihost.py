"""Multi-host: two local processes (gloo CPU collectives) train, get killed, resume and sample.

The scripts are started as separate processes on 127.0.0.1, each with its own simulated
CPU devices, exactly as on two hosts (`--coordinator_address`, `--num_processes`,
`--process_id`). Their results must equal one process on the same number of devices:
the data pipeline makes the global batches independent of the number of hosts.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from jaxdiff import data as data_lib
from jaxdiff import evaluate, generate, sharding, train
from jaxdiff.errors import ConfigError, DataError

PY = sys.executable
DEVICES = 4  # in all: one process with 4, or two with 2 each
# The tiny config, one U-Net level smaller (compiles in half the time), 6 steps; samples are
# drawn by run_sample.py afterwards.
TINY = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.training.num_steps=6",
        "--config.training.log_every=1", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
        "--config.training.num_final_samples=0"]

# Runs a script with test hooks: SIGKILL itself right after step JAXDIFF_TEST_KILL_AT_STEP (a host
# failing mid-run, an async checkpoint possibly in flight), and record which process writes
# sample files (under JAXDIFF_TEST_RECORD_WRITES).
HOOKED = r"""
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
script = sys.argv[1]
sys.argv = sys.argv[1:]
from jaxdiff import train, viz
import numpy as np
kill_at = int(os.environ.get("JAXDIFF_TEST_KILL_AT_STEP", "0"))
if kill_at:
  add = train._Metrics.add
  def add_then_die(self, step, metrics):
    add(self, step, metrics)
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
  train._Metrics.add = add_then_die
record = os.environ.get("JAXDIFF_TEST_RECORD_WRITES")
if record:
  import jax
  def recorded(fn, what):
    def wrapper(*args, **kwargs):
      with open(os.path.join(record, f"process{jax.process_index()}.txt"), "a") as f:
        f.write(what + "\n")
      return fn(*args, **kwargs)
    return wrapper
  viz.save_image_grid = recorded(viz.save_image_grid, "png")
  np.savez_compressed = recorded(np.savez_compressed, "npz")
runpy.run_path(script, run_name="__main__")
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int, *, compilation_cache: bool = True, **extra) -> dict:
  env = dict(os.environ)
  if not compilation_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  # the least LLVM optimization: the tiny programs compile 2-5x faster (and every process of
  # a comparison uses the same setting)
  flags += [f"--xla_force_host_platform_device_count={devices}", "--xla_backend_optimization_level=0"]
  env.update(XLA_FLAGS=" ".join(flags),
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def start(script, args, *, devices, log, env_extra=None, compilation_cache=True):
  f = open(log, "w")
  env = child_env(devices, compilation_cache=compilation_cache, **(env_extra or {}))
  proc = subprocess.Popen([PY, "-c", HOOKED, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          stdout=f, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def tail(proc, n=3000) -> str:
  with open(proc.log) as f:
    lines = [l for l in f if "[Gloo]" not in l]
  return "".join(lines)[-n:]


def wait_all(procs, timeout=240):
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{p.args[3]} did not finish within {timeout}s:\n{tail(p)}")
  return [p.returncode for p in procs]


def start_pair(script, args, tmp_path, name, *, per_process=(), env_extra=None, timeout_s=60):
  """Two processes of `script`, joined through a coordinator on 127.0.0.1.

  Both compile every program themselves (no persistent cache: only process 0 could read
  it): gloo gives processes 30 s to meet at their first collective, which a process that
  compiles while the other loads from the cache can miss on a busy machine.
  """
  port = free_port()
  procs = []
  for pid in range(2):
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
            f"--distributed_timeout={timeout_s}"]
    extra = list(per_process[pid]) if per_process else []
    procs.append(start(script, [*args, *dist, *extra], devices=DEVICES // 2,
                       log=str(tmp_path / f"{name}{pid}.log"), env_extra=env_extra, compilation_cache=False))
  return procs


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def png_pixels(path):
  from PIL import Image

  with open(path, "rb") as f:
    return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), np.int16)


def test_two_processes_train_killed_resume_and_sample_like_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  rec = tmp_path / "writes"  # which process wrote sample files
  rec.mkdir()

  # the reference: one process with all the devices, uninterrupted
  ref = start("run_train.py", [*TINY, f"--workdir={one}"], devices=DEVICES, log=str(tmp_path / "one.log"))
  assert wait_all([ref]) == [0], tail(ref)

  # two processes with half the devices each; both die (SIGKILL) right after step 5 of 6
  procs = start_pair("run_train.py", [*TINY, f"--workdir={two}"], tmp_path, "killed",
                     env_extra={"JAXDIFF_TEST_KILL_AT_STEP": 5})
  rcs = wait_all(procs)
  assert all(rc != 0 for rc in rcs), [tail(p) for p in procs]
  steps = sorted(int(s) for s in os.listdir(two / "checkpoints") if s.isdigit())
  assert 6 not in steps and steps and steps[-1] in (2, 4), steps  # 4 unless its async save was cut short

  # the same command again: both resume from the last complete checkpoint and finish
  procs = start_pair("run_train.py", [*TINY, f"--workdir={two}"], tmp_path, "resumed")
  assert wait_all(procs) == [0, 0], [tail(p) for p in procs]
  assert "Resumed from" in tail(procs[0]) and "step 6/6" in tail(procs[1])

  # same losses at every step (before and after the kill) as the one-process run
  l1, l2 = losses(one), losses(two)
  assert sorted(l1) == sorted(l2) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([l2[s] for s in range(1, 7)], [l1[s] for s in range(1, 7)], rtol=2e-5)

  # same final (EMA) parameters
  config = generate.load_config(str(one))
  exp = train.build_experiment(config)
  mesh = sharding.create_mesh({"data": -1})
  s1, p1 = evaluate.restore_ema_params(config, str(one), exp, mesh)
  s2, p2 = evaluate.restore_ema_params(config, str(two), exp, mesh)
  assert s1 == s2 == 6
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)

  # run_sample.py over both processes (each draws its shard, process 0 gathers and writes),
  # alongside one process on the reference run
  sample = ["--sampler=ddim", "--steps=4", "--num_samples=12", "--seed=3"]
  procs = start_pair("run_sample.py", [f"--workdir={two}", *sample, f"--out_dir={tmp_path / 's2'}"], tmp_path,
                     "sample", env_extra={"JAXDIFF_TEST_RECORD_WRITES": rec})
  ref = start("run_sample.py", [f"--workdir={one}", *sample, f"--out_dir={tmp_path / 's1'}"], devices=DEVICES,
              log=str(tmp_path / "sample_one.log"))
  assert wait_all([*procs, ref]) == [0, 0, 0], [tail(p) for p in (*procs, ref)]
  assert os.listdir(rec) == ["process0.txt"]  # the files were written once, by process 0
  assert sorted(open(rec / "process0.txt").read().split()) == ["npz", "png"]
  name = "ddim_4nfe_step6_seed3"
  x1, x2 = (np.load(tmp_path / d / f"{name}.npz")["images"].astype(np.int16) for d in ("s1", "s2"))
  assert x2.shape == (12, 8, 8, 3)
  assert np.abs(x2 - x1).max() <= 1  # uint8 pixels: rounding of float noise at most
  assert np.abs(png_pixels(tmp_path / "s2" / f"{name}.png") - png_pixels(tmp_path / "s1" / f"{name}.png")).max() <= 1


def test_processes_with_different_configs_are_stopped(tmp_path):
  procs = start_pair("run_train.py", [*TINY, f"--workdir={tmp_path / 'w'}"], tmp_path, "mismatch",
                     per_process=[[], ["--config.training.num_steps=7", "--config.seed=1"]])
  assert wait_all(procs, timeout=120) == [1, 1], [tail(p) for p in procs]
  for p in procs:
    err = [l for l in tail(p).splitlines() if l.startswith("error:")]
    assert len(err) == 1, tail(p)
    assert "different configs" in err[0] and "process 1 has" in err[0], err[0]
    assert "seed=1 (process 0: 0)" in err[0] and "training.num_steps=7 (process 0: 6)" in err[0], err[0]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")  # stopped before anything was written


def test_coordinator_unreachable_and_missing_peers_fail_in_one_line(tmp_path):
  port = free_port()  # nothing listens here
  common = [*TINY, f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--distributed_timeout=2"]
  t0 = time.time()
  procs = [
      # process 1 of 2: nothing listens at the coordinator's address
      start("run_train.py", [*common, f"--coordinator_address=127.0.0.1:{port}", "--process_id=1"],
            devices=2, log=str(tmp_path / "unreachable.log")),
      # process 0 of 2 serves the coordinator, but process 1 never comes
      start("run_train.py", [*common, f"--coordinator_address=127.0.0.1:{free_port()}", "--process_id=0"],
            devices=2, log=str(tmp_path / "alone.log")),
      # auto-detection with no cluster around
      start("run_sample.py", [f"--workdir={tmp_path}", "--distributed=auto"], devices=2,
            log=str(tmp_path / "auto.log")),
      # contradictory flags
      start("run_sample.py", [f"--workdir={tmp_path}", "--distributed=off", "--process_id=1"], devices=2,
            log=str(tmp_path / "off.log")),
  ]
  assert wait_all(procs, timeout=60) == [1, 1, 1, 1], [tail(p) for p in procs]
  assert time.time() - t0 < 45  # failed after the 2 s timeout (plus start-up), did not hang
  errors = []
  for p in procs:
    out = tail(p)
    lines = [l for l in out.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: ConfigError: "), out
    assert "Traceback" not in out and "Check failure" not in out, out
    errors.append(lines[-1])
  assert f"--coordinator_address=127.0.0.1:{port} cannot be reached from process 1 of 2" in errors[0]
  assert "--distributed_timeout=2s" in errors[0]
  assert "did not start within --distributed_timeout=2s on process 0 of 2" in errors[1]
  assert "--distributed=auto found no Cloud TPU, SLURM or Open MPI environment" in errors[2]
  assert "--process_id is set but --distributed=off" in errors[3]


# ------------------------------------------------------------------------------------
# In-process pieces (no second process needed)
# ------------------------------------------------------------------------------------


def shapes(batch_size, **kw):
  kw = dict(dataset="shapes", resolution=8, num_channels=3, num_examples=40, random_flip=True,
            uniform_dequantization=True, num_threads=1, seed=7, **kw)
  return data_lib.create_dataset(batch_size=batch_size, **kw)


@pytest.mark.parametrize("rows", [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]])
def test_hosts_reading_their_rows_make_the_one_host_batches(rows):
  """Two hosts' local batches, put in their rows, are the one-host global batches (flips and
  dequantization noise included), across epochs (40 records, 8 a batch: 3 epochs in 15)."""
  one = shapes(8, batch_rows=range(8))
  hosts = [shapes(4, batch_rows=r, shard_index=i, shard_count=2) for i, r in enumerate(rows)]
  for _ in range(15):
    want = next(one)
    got = np.zeros_like(want["x"])
    for it, r in zip(hosts, rows):
      got[r] = next(it)["x"]
    np.testing.assert_array_equal(got, want["x"])


def test_batch_rows_cover_one_epoch_once_and_check_their_input():
  # 40 records, global batch 12: 3 full batches and 4 records left, which host 0's rows hold
  parts = [list(shapes(6, batch_rows=range(i * 6, i * 6 + 6), shard_index=i, shard_count=2, num_epochs=1,
                       shuffle=False, drop_remainder=False)) for i in range(2)]
  counts = [sum(len(b["x"]) for b in p) for p in parts]
  assert counts == [22, 18]
  one = list(shapes(12, batch_rows=range(12), num_epochs=1, shuffle=False, drop_remainder=False))
  records = lambda batches: sorted(x.tobytes() for b in batches for x in b["x"])
  assert records(parts[0] + parts[1]) == records(one)  # every record once, with the same noise
  assert len(set(records(one))) == 40
  with pytest.raises(DataError, match=r"batch_rows=.*must be 4 distinct rows"):
    shapes(4, batch_rows=[0, 1, 2, 9], shard_index=0, shard_count=2)


def test_local_batch_rows_and_replicate_on_one_process():
  mesh = sharding.create_mesh({"data": 4, "fsdp": 2})
  np.testing.assert_array_equal(sharding.local_batch_rows(mesh, 16), np.arange(16))
  key = sharding.replicate(jax.random.key(3), mesh)
  assert key.sharding.is_fully_replicated and len(key.sharding.device_set) == 8
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
  sharding.check_same_config(ml_collections.ConfigDict({"a": 1}))  # one process: nothing to compare


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "needs all of --coordinator_address"),
    (dict(coordinator_address="nohostport", num_processes=2, process_id=0), "must look like host:port"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"--process_id=2 must be in"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1, timeout_s=0), "must be > 0"),
])
def test_initialize_distributed_rejects_bad_flags(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    sharding.initialize_distributed(**kwargs)


def test_unreachable_coordinator_raises_within_the_timeout():
  port = free_port()
  t0 = time.time()
  with pytest.raises(ConfigError, match=f"127.0.0.1:{port} cannot be reached from process 1 of 2"):
    sharding.initialize_distributed(f"127.0.0.1:{port}", 2, 1, timeout_s=0.5)
  assert time.time() - t0 < 5
  assert not jax.distributed.is_initialized()
