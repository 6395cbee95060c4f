"""run_train.py and run_sample.py end to end, killed and resumed, and their one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

PY = sys.executable


def run(script, *args, check=True, timeout=300):
  proc = subprocess.run([PY, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


TINY = ["--config", os.path.join(ROOT, "configs", "tiny.py")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  proc = run("run_train.py", *TINY, "--workdir", workdir, "--config.training.num_steps=6")
  assert "step 6/6" in proc.stderr and "loss" in proc.stderr  # progress on the console
  return workdir


def test_train_then_sample(trained, tmp_path):
  assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["4", "6"]  # keep_checkpoints=2
  proc = run("run_sample.py", "--workdir", trained, "--sampler", "ddim", "--steps", "3", "--num_samples", "10",
             "--seed", "1", "--out_dir", str(tmp_path), "--sampler_options", "eta=0.5")
  assert "3 NFE" in proc.stderr
  files = sorted(os.listdir(tmp_path))
  assert files == ["ddim_3nfe_step6_seed1.npz", "ddim_3nfe_step6_seed1.png"]
  imgs = np.load(tmp_path / files[0])["images"]
  assert imgs.shape == (10, 8, 8, 3)


def test_killed_run_resumes_to_the_same_result(trained, tmp_path):
  """SIGKILL after the first checkpoint, restart the same command: same losses as one run."""
  workdir = str(tmp_path)
  args = [PY, os.path.join(ROOT, "run_train.py"), *TINY, "--workdir", workdir, "--config.training.num_steps=6"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt2 = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 240
  while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  run("run_train.py", *TINY, "--workdir", workdir, "--config.training.num_steps=6")
  assert losses(workdir) == losses(trained)


def test_one_line_errors(trained, tmp_path):
  cases = [
      (["run_train.py", *TINY, "--workdir", str(tmp_path), "--config.training.batch_sze=3"], "batch_size"),
      (["run_train.py", *TINY, "--workdir", str(tmp_path), "--config.training.batch_size=12"],
       "not divisible by the 8 devices"),
      (["run_train.py", *TINY, "--workdir", trained, "--config.model.ch=16"], "does not match the config"),
      (["run_sample.py", "--workdir", trained, "--step", "5"], "step=5 does not exist"),
      (["run_sample.py", "--workdir", trained, "--sampler", "dpm"], "valid samplers"),
      (["run_sample.py", "--workdir", str(tmp_path / "nothing")], "holds no training run"),
      (["run_sample.py", "--workdir", trained, "--task", "sdedit", "--input", "x.png", "--classifier_workdir",
        trained], "does not take classifier guidance"),
      (["run_sample.py", "--workdir", trained, "--mode", "fid", "--inception", "nope.pth"],
       "FID Inception weights 'nope.pth' are not a file; download pytorch-fid's"),
      (["run_sample.py", "--workdir", trained, "--mode", "fid", "--inception", "w.pth", "--step", "2",
        "--fid_steps", "all"], "--step=2 and --fid_steps=all both pick checkpoints; give one."),
      (["run_sample.py", "--workdir", trained, "--fid_metrics", "kid"], "--fid_metrics is for --mode=fid only"),
  ]
  for argv, needle in cases:
    proc = run(*argv, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, argv
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (argv, proc.stderr[-2000:])


def test_tcmalloc_env():
  from jaxdiff import cli

  found = lambda name: "libtcmalloc_minimal.so.4" if name == "tcmalloc_minimal" else None  # noqa: E731
  on = {"JAXDIFF_TCMALLOC": "1"}
  env = cli.tcmalloc_env({**on, "LD_PRELOAD": "libfoo.so"}, find_library=found)
  assert env["LD_PRELOAD"] == "libfoo.so libtcmalloc_minimal.so.4"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no "large alloc" lines
  assert cli.tcmalloc_env(on, find_library=found)["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
  assert cli.tcmalloc_env({**on, "LD_PRELOAD": "/x/libtcmalloc.so.4"}, find_library=found) is None  # already
  assert cli.tcmalloc_env({}, find_library=found) is None  # opt-in: off by default
  assert cli.tcmalloc_env({"JAXDIFF_TCMALLOC": "0"}, find_library=found) is None
  assert cli.tcmalloc_env(on, find_library=lambda name: None) is None  # not installed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_scripts_restart_once_with_tcmalloc_when_asked():
  import ctypes.util

  if not any(ctypes.util.find_library(n) for n in ("tcmalloc_minimal", "tcmalloc")):
    pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
  # and, under tcmalloc, aot.release_host_memory() hands tcmalloc's free pages back too
  code = ("from jaxdiff import aot, cli; cli.restart_with_tcmalloc(); "
          "print('tcmalloc' in open('/proc/self/maps').read(), "
          "'MallocExtension_ReleaseFreeMemory' in [f.__name__ for f, _ in aot._release_functions()])")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JAXDIFF_TCMALLOC")}
  proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(env, JAXDIFF_TCMALLOC="1"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["True", "True"]  # restarted once, with tcmalloc mapped
  off = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert off.stdout.split() == ["False", "False"]  # the default: glibc
