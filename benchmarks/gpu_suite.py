r"""Every GPU number of the performance issue in one command: jaxdiff and the peer, MFU, 256x1000.

  python benchmarks/gpu_suite.py --out results/ --peer_script PATH/torch_unet_bench.py
  python benchmarks/gpu_suite.py --out results/ --jobs jax_train_bf16,jax_train_fp32   # a subset
  python benchmarks/gpu_suite.py --out /tmp/smoke --smoke --no_peer                     # CPU check

Jobs, each in its own process (`unet_bench.py` for jaxdiff, `torch_peer_gpu.py` for the
peer; the same workloads, see both):

  jax_train_{bf16,fp32}     big U-Net train step, B=128 (`--dtype bfloat16`: bf16 compute,
                            fp32 parameters, optimizer state and loss)
  jax_sample_{fp32,bf16}    256 images x 1000 DDPM ancestral steps in one jitted call
  peer_train_{fp32,bf16}_{eager,compile}   the peer at B=128, eager and `torch.compile`
  peer_sample_bf16_eager    the peer's 256 x 1000 steps
  dit_train_{bf16,fp32}     DiT-XL/2 train step on 32x32x4 latents (DiT-XL/2-256's), B=64
                            (`dit_bench.py --impl jaxdiff`; 128 would need ~80 GB of fp32
                            activations without remat)
  dit_peer_train_bf16_{eager,compile}   diffusers' DiTTransformer2DModel, the same step on
                            the GPU (`dit_bench.py --impl diffusers --device cuda`)

It writes `results.jsonl` (every record) and `summary.md` (the table RESULTS.md takes) to
`--out`, and prints the summary. MFU = img/s x 37.32 GFLOP/img (the peer's count for a
train step of the big U-Net; DiT-XL/2: 711.7, `dit_bench.train_flops_per_img`) / the
device's dense peak: bf16 tensor-core peak for bf16, the
TF32 tensor-core peak for fp32 (XLA and, with `allow_tf32`, the peer run fp32 convolutions
and matmuls in TF32 on Ampere and later). Known peaks are in `PEAK_TFLOPS`; `--peak_tflops
BF16,TF32` overrides them. `--smoke` runs the jaxdiff jobs on the small U-Net with tiny
sizes (any backend), so the script can be tested without a GPU.

On a machine without the test extras (the GPU image lacks ml_collections, grain,
array_record and portpicker; diffusers and importlib_metadata for the peer), carry wheels:
see benchmarks/RESULTS.md, "GPU / TPU".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_BENCH = os.path.join(ROOT, "benchmarks", "unet_bench.py")
DIT_BENCH = os.path.join(ROOT, "benchmarks", "dit_bench.py")
PEER_GPU = os.path.join(ROOT, "benchmarks", "torch_peer_gpu.py")
DEFAULT_PEER_SCRIPT = os.path.join(ROOT, "..", "shared", "bench", "torch_unet_bench.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from dit_bench import train_flops_per_img as dit_train_flops  # noqa: E402
from unet_bench import TRAIN_FLOPS_PER_IMG  # noqa: E402  (the peer's counts: big 37.32 GFLOP/img)
# Dense peaks in TFLOP/s: (bf16 tensor core, TF32 tensor core), SXM parts.
PEAK_TFLOPS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0),
               "L4": (121.0, 60.0)}


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def jobs(smoke: bool) -> dict[str, tuple[str, list[str]]]:
  """name -> (impl, argv): impl 'jax' and 'peer' run unet_bench.py and torch_peer_gpu.py,
  'dit' and 'dit_peer' dit_bench.py's jaxdiff and diffusers measurements."""
  gpu_train = ["--config", "big", "--mode", "train", "--batch", "128", "--warmup", "3", "--steps", "20"]
  dit_gpu = ["--size", "XL/2", "--batch", "64", "--modes", "train", "--warmup", "3", "--steps", "20"]
  if smoke:
    train = ["--config", "small", "--mode", "train", "--batch", "2", "--warmup", "1", "--steps", "1"]
    sample = ["--config", "small", "--mode", "sample", "--batch", "2", "--sample_chunk", "2",
              "--warmup", "1", "--steps", "1"]
    dit = ["--size", "S/8", "--batch", "2", "--modes", "train", "--warmup", "1", "--steps", "1"]
  else:
    train = gpu_train
    sample = ["--config", "big", "--mode", "sample", "--batch", "256", "--sample_chunk", "1000",
              "--warmup", "1", "--steps", "1"]
    dit = dit_gpu
  out = {}
  for dtype in ("bf16", "fp32"):
    out[f"jax_train_{dtype}"] = ("jax", train + ["--dtype", DTYPES[dtype]])
  for dtype in ("fp32", "bf16"):
    out[f"jax_sample_{dtype}"] = ("jax", sample + ["--dtype", DTYPES[dtype]])
  for dtype in ("fp32", "bf16"):
    for comp in ("eager", "compile"):
      out[f"peer_train_{dtype}_{comp}"] = ("peer", gpu_train + [
          "--dtype", DTYPES[dtype], "--compile", "on" if comp == "compile" else "off"])
  out["peer_sample_bf16_eager"] = ("peer", ["--config", "big", "--mode", "sample", "--batch", "256",
                                            "--sample_steps", "1000", "--warmup", "1", "--steps", "1",
                                            "--dtype", "bfloat16"])
  for dtype in ("bf16", "fp32"):
    out[f"dit_train_{dtype}"] = ("dit", dit + ["--impl", "jaxdiff", "--dtype", DTYPES[dtype]])
  for comp, flag in (("eager", "off"), ("compile", "on")):
    out[f"dit_peer_train_bf16_{comp}"] = ("dit_peer", dit_gpu + [
        "--impl", "diffusers", "--device", "cuda", "--dtype", "bfloat16", "--compile", flag])
  return out


def train_flops(rec: dict) -> float:
  """Model FLOPs per image of a train record: a U-Net's (`config`) or a DiT's (`size`)."""
  return dit_train_flops(rec["size"]) if "size" in rec else TRAIN_FLOPS_PER_IMG[rec["config"]]


def peak_for(device_kind: str, override: str | None) -> tuple[float, float] | None:
  if override:
    bf16, tf32 = (float(v) for v in override.split(","))
    return bf16, tf32
  for key, peaks in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return peaks
  return None


def run(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout:.0f} s"
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return None, f"exit {proc.returncode}: {tail}"
  return json.loads(lines[-1]), ""


def summarize(records: dict[str, dict], errors: dict[str, str], peak_override: str | None) -> str:
  rows = ["| job | device | img/s | MFU | 256 x 1000 steps s | first call s |", "|---|---|---|---|---|---|"]
  for name, rec in records.items():
    dev = rec.get("device_kind", "?")
    mfu, wall = "", ""
    if rec["mode"] == "train":
      peaks = peak_for(dev, peak_override)
      if peaks:
        peak = peaks[0] if rec.get("dtype") == "bfloat16" else peaks[1]
        mfu = f"{100 * rec['img_per_s'] * train_flops(rec) / (peak * 1e12):.1f}%"
    if rec["mode"] == "sample":
      steps = rec.get("sample_chunk") or rec.get("sample_steps") or 1
      wall = f"{rec['batch'] * steps / rec['img_per_s']:.2f} ({rec['batch']} x {steps})"
    rows.append(f"| {name} | {dev} | {rec['img_per_s']:.1f} | {mfu} | {wall} | {rec.get('first_step_s', '')} |")
  for name, err in errors.items():
    rows.append(f"| {name} | failed: {err[:160]} | | | | |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for results.jsonl and summary.md")
  p.add_argument("--jobs", default="", help="comma list of job names (default: all)")
  p.add_argument("--peer_script", default=DEFAULT_PEER_SCRIPT, help="the peer's torch_unet_bench.py")
  p.add_argument("--no_peer", action="store_true", help="skip the peer's jobs")
  p.add_argument("--smoke", action="store_true", help="tiny sizes on the small U-Net (any backend)")
  p.add_argument("--peak_tflops", default=None, help="'BF16,TF32' dense peaks of the device")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per job")
  args = p.parse_args(argv)
  table = jobs(args.smoke)
  names = [n.strip() for n in args.jobs.split(",") if n.strip()] or list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    p.error(f"--jobs: unknown job {unknown[0]!r}; known: {', '.join(table)}.")
  if args.peak_tflops is not None:
    try:
      peak_for("", args.peak_tflops)
    except ValueError:
      p.error(f"--peak_tflops={args.peak_tflops!r} is not 'BF16,TF32', e.g. 989.4,494.7.")
  if args.no_peer or args.smoke:
    names = [n for n in names if table[n][0] in ("jax", "dit")]
  elif any(table[n][0] == "peer" for n in names) and not os.path.exists(args.peer_script):
    p.error(f"--peer_script={args.peer_script!r} does not exist; pass the peer's torch_unet_bench.py "
            f"or --no_peer.")
  os.makedirs(args.out, exist_ok=True)
  records, errors = {}, {}
  for name in names:
    impl, job_argv = table[name]
    if impl == "jax":
      cmd = [sys.executable, UNET_BENCH, *job_argv]
    elif impl in ("dit", "dit_peer"):
      cmd = [sys.executable, DIT_BENCH, *job_argv]
    else:
      cmd = [sys.executable, PEER_GPU, "--peer_script", args.peer_script, *job_argv]
    t0 = time.perf_counter()
    rec, err = run(cmd, args.timeout)
    print(f"{name}: {'ok' if rec else err} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if rec:
      rec["job"] = name
      records[name] = rec
      with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    else:
      errors[name] = err
  summary = summarize(records, errors, args.peak_tflops)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary + "\n")
  print(summary)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
