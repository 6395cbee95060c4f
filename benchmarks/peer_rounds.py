"""The measurement loop shared by ncsnpp_bench.py and dit_bench.py (jaxdiff against a PyTorch peer).

`timed` times one workload's calls in the measuring process (`jaxdiff_train_call` builds
jaxdiff's train-step workload); `run_rounds` starts one process
per (round, mode, impl), alternating the impl order every round, and prints and returns the
JSON records; `print_ratios` prints jaxdiff / peer medians and ratios per mode.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence


def timed(call: Callable[[int], None], warmup: int, steps: int) -> tuple[float, float]:
  """(first call's seconds, median of `steps` timed calls after `warmup` untimed ones)."""
  t0 = time.perf_counter()
  call(0)
  first = time.perf_counter() - t0
  for i in range(1, warmup):
    call(i)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    call(warmup + i)
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def jaxdiff_worker_setup(root: str) -> None:
  """In a jaxdiff measuring process: `root` importable, and tcmalloc preloaded (the process
  restarts once) if JAXDIFF_TCMALLOC=1, as run_train.py does (`jaxdiff.cli.tcmalloc_env`)."""
  if root not in sys.path:
    sys.path.insert(0, root)
  from jaxdiff import cli

  cli.restart_with_tcmalloc()


def jaxdiff_train_call(model, process, make_batch: Callable, example_shape: tuple[int, ...], *,
                       learning_rate: float, weight_decay: float):
  """(call(i), params): one jitted eps-MSE + AdamW step of `model` per call, state donated.

  The step is compiled ahead of its first run, with the compiler's heap handed back (as
  run_train does); `make_batch(key)` gives the batch dict ({"x": ...} and maybe "label").
  """
  import jax
  import jax.numpy as jnp

  from jaxdiff import aot, losses, train

  key = jax.random.key(0)
  optimizer = train.make_optimizer(name="adamw", learning_rate=learning_rate, weight_decay=weight_decay)
  state = aot.AotJit(jax.jit(lambda k: train.create_train_state(
      k, model=model, optimizer=optimizer, example_x=jnp.zeros((1, *example_shape)), ema=False)), name="init")(key)
  loss_fn = losses.make_denoising_loss(process, prediction="eps")
  step = aot.AotJit(jax.jit(lambda s, b, k: train.train_step(s, b, k, model=model, loss_fn=loss_fn,
                                                             optimizer=optimizer, ema_decay=None),
                            donate_argnums=0))
  params = state.params

  def call(i):
    nonlocal state
    k = jax.random.fold_in(key, i)
    state, metrics = step(state, make_batch(k), k)
    jax.block_until_ready(metrics["loss"])

  return call, params


def record(first: float, step_s: float, **fields) -> str:
  """One measurement's JSON line: `fields` (with `batch`), then malloc, img_per_s, step_s, first_step_s, peak_rss_mb."""
  malloc = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default"
  return json.dumps(dict(fields, malloc=malloc, img_per_s=round(fields["batch"] / step_s, 3), step_s=round(step_s, 4),
                         first_step_s=round(first, 2),
                         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)))


def run_rounds(script: str, impls: Sequence[tuple[str, str]], common: Sequence[str], modes: Sequence[str],
               rounds: int, cwd: str, extra: Callable[[str], list[str]] = lambda impl: []) -> list[dict]:
  """Runs `python script *common --modes mode --impl impl *extra(impl)` for each (round, mode, impl)."""
  records = []
  runs = [(mode, impl) for r in range(rounds) for mode in modes for impl in (impls if r % 2 == 0 else impls[::-1])]
  for mode, (impl, python) in runs:
    proc = subprocess.run([python, script, *common, "--modes", mode, "--impl", impl, *extra(impl)],
                          capture_output=True, text=True, cwd=cwd)
    if proc.returncode:
      sys.exit(f"error: the {impl} measurement failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
      if line.startswith("{"):
        print(line, flush=True)
        records.append(json.loads(line))
  return records


def print_ratios(records: list[dict], modes: Sequence[str], peer: str, peer_name: str, label: str) -> None:
  """`label.format(mode=...)`: jaxdiff <median> img/s, <peer_name> <median>; ratio <median> [min, max]."""
  for mode in modes:
    ours = [r["img_per_s"] for r in records if r["impl"] == "jaxdiff" and r["mode"] == mode]
    ref = [r["img_per_s"] for r in records if r["impl"] == peer and r["mode"] == mode]
    ratios = [a / b for a, b in zip(ours, ref)]
    print(f"{label.format(mode=mode)}: jaxdiff {statistics.median(ours):.2f} img/s, "
          f"{peer_name} {statistics.median(ref):.2f}; ratio {statistics.median(ratios):.2f} "
          f"[{min(ratios):.2f}, {max(ratios):.2f}]")
