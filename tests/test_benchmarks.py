"""The benchmark scripts run (so they cannot rot), and the compilation cache pays off."""

import json
import os
import subprocess
import sys

import pytest

from jaxdiff import cli, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "unet_bench.py")
COMPARE = os.path.join(ROOT, "benchmarks", "compare.py")


def _run(cmd, env=None):
  env = dict(os.environ if env is None else env)
  # One CPU device, as the peer harness, and no inherited test-session compilation cache.
  # conftest's -O0 stays: these tests check the scripts' records and plumbing, not speed, and
  # LLVM's optimisation is most of a cold compile (the cache test: 108 s fully optimized, 60 s).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=ROOT)


def _records(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def test_unet_bench_small_both_modes_and_warm_cache(tmp_path):
  cache = str(tmp_path / "xla-cache")
  out = tmp_path / "bench.jsonl"
  common = [BENCH, "--config", "small", "--batch", "2", "--warmup", "1", "--steps", "1",
            "--cache_dir", cache, "--out", str(out)]
  cold = _records(_run([*common, "--mode", "both"]))
  assert [r["mode"] for r in cold] == ["train", "sample"]
  for r in cold:
    assert r["impl"] == "jaxdiff" and r["config"] == "small" and r["batch"] == 2
    assert r["params"] == 2_245_763 and r["params_match_peer"]
    assert r["img_per_s"] > 0 and r["first_step_s"] > 0 and r["peak_rss_mb"] > 0
    for key in ("dtype", "backend", "device_kind", "jax", "flax", "malloc"):
      assert r[key]
    # the flags in effect: on a jaxlib jaxdiff was tuned on, its default (convolutions off YNNPACK)
    assert ("-individual_convolution" in r["xla_flags"]) == bool(xla_flags.default_flags({})), r["xla_flags"]
    # getrusage over the timed call: this process ran it, so some user time, and no faults < 0
    assert r["cpu_s_per_step"]["user"] > 0 and r["cpu_s_per_step"]["sys"] >= 0, r
    assert r["minor_faults_per_step"] >= 0, r
  assert len(out.read_text().splitlines()) == 2  # --out appends every line
  assert not any(r["executable_loaded"] for r in cold)
  warm = _records(_run([*common, "--mode", "both"]))
  # The second run loads each measured step's executable (no tracing, lowering or compiling)
  # and reads the small programs around it from JAX's persistent cache.
  for w in warm:
    assert w["executable_loaded"] and w["first_step_breakdown_s"]["load_executable"] > 0, w
    assert w["first_step_breakdown_s"]["trace"] < 0.2, w
  assert warm[0]["first_step_s"] * 3 < cold[0]["first_step_s"], (warm[0]["first_step_s"], cold[0]["first_step_s"])


def test_unet_bench_steps_per_call_and_microbatches():
  """The training loop's calls of K steps (train.train_steps): --steps counts train steps; each
  step's gradient over 2 microbatches (config.training.microbatches)."""
  proc = _run([BENCH, "--config", "small", "--mode", "train", "--batch", "2", "--warmup", "1",
               "--steps", "2", "--steps_per_call", "2", "--microbatches", "2"])
  (rec,) = _records(proc)
  assert rec["steps_per_call"] == 2 and rec["microbatches"] == 2 and rec["img_per_s"] > 0
  assert rec["step_s_median"] == rec["step_s_min"]  # 2 steps = one timed call


@pytest.mark.parametrize("args, message", [
    (["--steps_per_call", "0"], "--steps_per_call=0 must be >= 1"),
    (["--microbatches", "0"], "--microbatches=0 must be >= 1"),
    (["--config", "huge"], "--config='huge' is not known"),
    (["--mode", "infer"], "--mode='infer' is not known"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
])
def test_unet_bench_bad_flags(args, message):
  proc = _run([BENCH, *args])
  assert proc.returncode == 2
  assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unet_bench_batch_not_divisible_by_devices():
  env = dict(os.environ)
  proc = subprocess.run([sys.executable, BENCH, "--config", "small", "--mode", "sample", "--batch", "3"],
                        capture_output=True, text=True, cwd=ROOT,
                        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                 JAXDIFF_BENCH_CHILD="1"))
  assert proc.returncode != 0
  assert "--batch=3 is not divisible by the 2 devices" in proc.stderr, proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, BENCH, "--config", "small", "--mode", "train", "--batch", "4",
                         "--microbatches", "3"], capture_output=True, text=True, cwd=ROOT,
                        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                 JAXDIFF_BENCH_CHILD="1"))
  assert proc.returncode != 0
  assert "--microbatches=3 does not divide the 2 examples each of the 2 devices" in proc.stderr, proc.stderr[-2000:]


def test_compare_says_how_to_make_a_missing_peer(tmp_path):
  proc = _run([COMPARE, "--peer_python", str(tmp_path / "nope" / "python"), "--rounds", "1"])
  assert proc.returncode == 2
  assert "does not exist; make the peer venv with: python3 -m venv" in proc.stderr
  bad = _run([COMPARE, "--peer_python", sys.executable, "--peer_script", COMPARE, "--rounds", "1"])
  assert bad.returncode == 2 and "cannot import torch and diffusers" in bad.stderr
  wl = _run([COMPARE, "--workloads", "big:eval:16"])
  assert wl.returncode == 2 and "config:mode:batch" in wl.stderr


GPU_SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")


def test_gpu_suite_smoke_records_and_mfu(tmp_path):
  # The GPU suite's jaxdiff jobs at tiny sizes on the CPU: records, MFU against a given peak,
  # the sampling wall time.
  proc = _run([GPU_SUITE, "--out", str(tmp_path), "--smoke", "--peak_tflops", "2,1",
               "--jobs", "jax_train_bf16,jax_sample_fp32"])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  recs = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["job"] for r in recs] == ["jax_train_bf16", "jax_sample_fp32"]
  train, sample = recs
  assert train["dtype"] == "bfloat16" and train["mode"] == "train" and sample["sample_chunk"] == 2
  summary = (tmp_path / "summary.md").read_text()
  mfu = 100 * train["img_per_s"] * 2.528e9 / 2e12  # small U-Net train FLOPs / the bf16 peak given
  assert f"| {mfu:.1f}% |" in summary, summary
  assert f"{2 * 2 / sample['img_per_s']:.2f} (2 x 2)" in summary, summary


def test_gpu_suite_bad_flags(tmp_path):
  unknown = _run([GPU_SUITE, "--out", str(tmp_path), "--jobs", "jax_train_fp64"])
  assert unknown.returncode == 2 and "unknown job 'jax_train_fp64'" in unknown.stderr
  peer = _run([GPU_SUITE, "--out", str(tmp_path), "--jobs", "peer_train_fp32_eager",
               "--peer_script", str(tmp_path / "nope.py")])
  assert peer.returncode == 2 and "nope.py' does not exist" in peer.stderr
  peak = _run([GPU_SUITE, "--out", str(tmp_path), "--peak_tflops", "fast", "--no_peer"])
  assert peak.returncode == 2 and "--peak_tflops='fast' is not 'BF16,TF32'" in peak.stderr


def _bench_module(name):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


def test_dit_model_flops_match_xla_and_the_paper():
  """dit_bench's analytic FLOPs (gpu_suite's DiT MFU) against XLA's count of the compiled forward
  (which adds the element-wise ops: within 2%) and DiT-XL/2's 118.6 G multiply-adds (Peebles & Xie)."""
  import jax
  import jax.numpy as jnp

  from jaxdiff.models import DiT, dit_size

  dit_bench = _bench_module("dit_bench")
  model = DiT(**dit_size("S/8"), num_classes=dit_bench.NUM_CLASSES)
  x, t, y = jnp.zeros((1, 32, 32, 4)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  xla = jax.jit(lambda p: model.apply(p, x, t, y)).lower(params).compile().cost_analysis()["flops"]
  assert dit_bench.forward_flops_per_img("S/8") == pytest.approx(xla, rel=0.02)
  assert dit_bench.forward_flops_per_img("XL/2") == pytest.approx(2 * 118.6e9, rel=1e-3)
  assert dit_bench.train_flops_per_img("XL/2") == 3 * dit_bench.forward_flops_per_img("XL/2")


def test_gpu_suite_dit_jobs_parse_and_report_mfu():
  """The DiT jobs' flags are dit_bench's, and the summary's MFU uses the DiT's FLOPs."""
  gpu_suite, dit_bench = _bench_module("gpu_suite"), _bench_module("dit_bench")
  table = gpu_suite.jobs(smoke=False)
  for name in ("dit_train_bf16", "dit_train_fp32", "dit_peer_train_bf16_eager", "dit_peer_train_bf16_compile"):
    args = dit_bench.parse_args(table[name][1])
    assert args.size == "XL/2" and args.batch == 64 and args.modes == "train"
  assert dit_bench.parse_args(table["dit_peer_train_bf16_compile"][1]).compile == "on"
  assert dit_bench.parse_args(table["dit_train_bf16"][1]).dtype == "bfloat16"
  rec = {"impl": "jaxdiff", "size": "XL/2", "mode": "train", "batch": 128, "dtype": "bfloat16",
         "device_kind": "NVIDIA H100 80GB HBM3", "img_per_s": 400.0, "first_step_s": 60.0}
  summary = gpu_suite.summarize({"dit_train_bf16": rec}, {}, None)
  assert f"| {100 * 400.0 * 3 * 2 * 118.6e9 / 989.4e12:.1f}% |" in summary, summary  # 28.8%


def test_dit_bench_runs_and_rejects_bad_flags():
  bench = os.path.join(ROOT, "benchmarks", "dit_bench.py")
  recs = _records(_run([bench, "--size", "S/8", "--batch", "1", "--warmup", "1", "--steps", "1"]))
  assert [(r["impl"], r["mode"]) for r in recs] == [("jaxdiff", "train"), ("jaxdiff", "forward")]
  for r in recs:
    assert r["size"] == "S/8" and r["batch"] == 1 and r["img_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["malloc"] == ("tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default")
  assert recs[0]["params"] == recs[1]["params"] > 30_000_000  # DiT-S, 1000 classes
  for flags, msg in ((["--size", "M/2"], "--size='M/2'"), (["--modes", "sample"], "'sample' is not train"),
                     (["--ref_python", "/nope/python"], "does not exist")):
    proc = _run([bench, *flags])
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr


def test_ncsnpp_bench_runs_and_rejects_bad_flags(tmp_path):
  bench = os.path.join(ROOT, "benchmarks", "ncsnpp_bench.py")
  # JAXDIFF_TCMALLOC=1: jaxdiff's measuring process restarts with tcmalloc (where installed)
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  malloc = "tcmalloc" if cli.tcmalloc_env({"JAXDIFF_TCMALLOC": "1"}) else "default"
  recs = _records(_run([bench, "--net", "ncsnpp", "--ch", "8", "--num_res_blocks", "1", "--batch", "2",
                        "--warmup", "1", "--steps", "1"], env=dict(env, JAXDIFF_TCMALLOC="1")))
  assert [(r["impl"], r["mode"]) for r in recs] == [("jaxdiff", "train"), ("jaxdiff", "forward")]
  for r in recs:
    assert r["net"] == "ncsnpp" and r["batch"] == 2 and r["img_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["malloc"] == malloc
  assert recs[0]["params"] == recs[1]["params"] > 0
  for flags, msg in ((["--net", "unet"], "--net='unet'"),
                     (["--score_sde_pytorch", str(tmp_path), "--ref_python", sys.executable], "models/ncsnpp.py"),
                     (["--ref_python", sys.executable], "go together")):
    proc = _run([bench, *flags])
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
