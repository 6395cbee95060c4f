r"""jaxdiff vs the PyTorch peer, interleaved in separate processes: ratio per workload.

  python benchmarks/compare.py --rounds 3                       # the four CPU workloads
  python benchmarks/compare.py --workloads small:train:64,small:sample:64 --rounds 5
  python benchmarks/compare.py --peer_python /tmp/peers-venv/bin/python --out cmp.jsonl

For every round and every workload `config:mode:batch` it runs `benchmarks/unet_bench.py`
(jaxdiff) and `../shared/bench/torch_unet_bench.py` (diffusers `UNet2DModel`, eager torch)
one after the other, each in its own process with the same `--warmup`/`--steps` (the order
alternates between rounds so drift on a shared machine hits both alike). It prints the
JSON lines as they come, then per workload the jaxdiff/peer ratio of `img_per_s` (median
and range over rounds), both peak RSS values and jaxdiff's first-step time.

The peer needs its own venv (torch and diffusers; never in the same process as JAX): see
`../shared/bench/README.md`, or

  python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install torch==2.13.0 && \
    /tmp/peers-venv/bin/pip install diffusers --no-deps && /tmp/peers-venv/bin/pip install \
    "huggingface_hub>=1.32,<3" "safetensors>=0.8" regex Pillow importlib_metadata filelock requests numpy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "unet_bench.py")
DEFAULT_PEER_SCRIPT = os.path.join(ROOT, "..", "shared", "bench", "torch_unet_bench.py")
DEFAULT_WORKLOADS = "big:train:16,big:sample:16,small:train:64,small:sample:64"
MAKE_PEER = ("python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install torch==2.13.0 && "
             "/tmp/peers-venv/bin/pip install diffusers --no-deps && /tmp/peers-venv/bin/pip install "
             "'huggingface_hub>=1.32,<3' 'safetensors>=0.8' regex Pillow importlib_metadata filelock "
             "requests numpy (see ../shared/bench/README.md)")


def fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def parse_workloads(spec: str) -> list[tuple[str, str, int]]:
  out = []
  for item in spec.split(","):
    parts = item.strip().split(":")
    if len(parts) != 3 or parts[0] not in ("big", "small") or parts[1] not in ("train", "sample"):
      fail(f"--workloads item {item!r} is not config:mode:batch with config big|small and mode "
           f"train|sample, e.g. big:train:16.")
    try:
      batch = int(parts[2])
    except ValueError:
      fail(f"--workloads item {item!r}: batch {parts[2]!r} is not an integer.")
    out.append((parts[0], parts[1], batch))
  return out


def check_peer(python: str, script: str) -> None:
  if not os.path.exists(python):
    fail(f"--peer_python={python!r} does not exist; make the peer venv with: {MAKE_PEER}")
  if not os.path.exists(script):
    fail(f"--peer_script={script!r} does not exist; it is ../shared/bench/torch_unet_bench.py "
         f"beside the repository.")
  probe = subprocess.run([python, "-c", "import torch, diffusers"], capture_output=True, text=True)
  if probe.returncode:
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    fail(f"--peer_python={python!r} cannot import torch and diffusers ({last}); make the peer venv "
         f"with: {MAKE_PEER}")


def run_json(cmd: list[str], env: dict) -> dict:
  """Runs one measurement process; returns its last JSON line."""
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
  return json.loads(lines[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="comma list of config:mode:batch")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--peer_python", default="/tmp/peers-venv/bin/python")
  p.add_argument("--peer_script", default=DEFAULT_PEER_SCRIPT)
  p.add_argument("--threads", type=int, default=2, help="OMP/torch threads of the peer")
  p.add_argument("--jax_args", default="", help="extra unet_bench.py flags, e.g. '--remat'")
  p.add_argument("--out", default=None, help="append every JSON line (and the summary) here")
  args = p.parse_args(argv)
  if args.rounds < 1:
    fail(f"--rounds={args.rounds} must be >= 1.")
  workloads = parse_workloads(args.workloads)
  check_peer(args.peer_python, os.path.abspath(args.peer_script))
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
  results: dict[tuple, dict[str, list[dict]]] = {w: {"jaxdiff": [], "peer": []} for w in workloads}

  def record(rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(line + "\n")

  for r in range(args.rounds):
    for config, mode, batch in workloads:
      common = ["--config", config, "--mode", mode, "--batch", str(batch), "--warmup", str(args.warmup),
                "--steps", str(args.steps)]
      jax_cmd = [sys.executable, BENCH, *common, *args.jax_args.split()]
      peer_cmd = [args.peer_python, os.path.abspath(args.peer_script), *common, "--threads", str(args.threads)]
      order = [("jaxdiff", jax_cmd), ("peer", peer_cmd)]
      for impl, cmd in (order if r % 2 == 0 else order[::-1]):
        rec = run_json(cmd, env)
        rec["round"] = r
        results[(config, mode, batch)][impl].append(rec)
        record(rec)

  print()
  print(f"{'workload':<20} {'jaxdiff img/s':>14} {'peer img/s':>11} {'ratio (median [min, max])':>28} "
        f"{'RSS MB jax/peer':>16} {'first step s':>13}")
  for (config, mode, batch), res in results.items():
    ratios = [j["img_per_s"] / t["img_per_s"] for j, t in zip(res["jaxdiff"], res["peer"])]
    jax_ips = statistics.median(x["img_per_s"] for x in res["jaxdiff"])
    peer_ips = statistics.median(x["img_per_s"] for x in res["peer"])
    summary = dict(impl="compare", config=config, mode=mode, batch=batch, rounds=args.rounds,
                   ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                   ratio_max=round(max(ratios), 3), jaxdiff_img_per_s=jax_ips, peer_img_per_s=peer_ips,
                   jaxdiff_peak_rss_mb=max(x["peak_rss_mb"] for x in res["jaxdiff"]),
                   peer_peak_rss_mb=max(x["peak_rss_mb"] for x in res["peer"]),
                   jaxdiff_first_step_s=statistics.median(x["first_step_s"] for x in res["jaxdiff"]))
    print(f"{config + ' ' + mode + ' B=' + str(batch):<20} {jax_ips:>14.2f} {peer_ips:>11.2f} "
          f"{summary['ratio_median']:>10.2f} [{summary['ratio_min']:.2f}, {summary['ratio_max']:.2f}]"
          f"{'':>8} {summary['jaxdiff_peak_rss_mb']:>7.0f}/{summary['peer_peak_rss_mb']:<7.0f}"
          f" {summary['jaxdiff_first_step_s']:>12.1f}")
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(summary) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
