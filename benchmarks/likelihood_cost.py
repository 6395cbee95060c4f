r"""Cost of the likelihood ODE per function evaluation vs a bare forward of the network.

  python benchmarks/likelihood_cost.py                       # tiny and quickstart U-Nets, batch 16
  python benchmarks/likelihood_cost.py --model quickstart --batch 32 --repeats 3

The networks are configs/tiny.py's U-Net (ch=8, ch_mult (1, 2), 8x8x3) and the quickstart
U-Net (configs/quickstart.py: ch=32, ch_mult (1, 2, 2), attention at 8x8, 16x16x3), with
random weights and eps-prediction on the 1000-step linear DDPM, wrapped by
`parameterization.score_fn_from_network` as `evaluate.make_likelihood_fn` does.

For each model the script times, interleaved so that load from other jobs on a shared
machine hits all alike, and repeated `--repeats` times:

* `forward`: the jitted bare forward `net(x, c)` at batch B (median of `--calls` calls);
* `vf`: one jitted evaluation of what the solver calls once per NFE: the probability-flow
  drift and one Rademacher Hutchinson probe, from one `jax.jvp` (median of `--calls`);
* `per_nfe`: one jitted `likelihood.log_likelihood` solve (Tsit5, `--rtol`/`--atol`)
  divided by its `info["nfe"]`; nothing is subtracted (diffrax's step control included).

It prints one JSON line per model and `--autodiff` mode (`forward`: one `jax.jvp` through
the plain layers, what `evaluate` uses; `reverse`: `jax.vjp` through the default custom-VJP
layers) with the medians over repeats of `ratio = per_nfe / forward` (the issue's
criterion: <= 3) and `ratio_vf = vf / forward`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import likelihood, models, parameterization, processes  # noqa: E402

MODELS = {
    "tiny": (dict(name="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                  num_groups=4), 8),
    "quickstart": (dict(name="unet", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                        dropout=0.0, num_groups=8), 16),
}


def _median_call_s(fn, args, calls: int) -> float:
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(model_name: str, batch: int, calls: int, repeats: int, rtol: float, atol: float,
          autodiff: str = "forward") -> dict:
  kwargs, res = MODELS[model_name]
  # forward mode: plain layers, as evaluate.make_likelihood_fn builds the model; reverse mode:
  # the default custom-VJP layers (what a user's own network usually is).
  model = models.create_model(**kwargs, custom_vjp=autodiff == "reverse")
  process = processes.DDPM.linear(1000)
  key = jax.random.key(0)
  x = jax.random.uniform(jax.random.key(1), (batch, res, res, 3), minval=-1.0, maxval=1.0)
  c = jnp.full((batch,), 500.0)
  params = jax.jit(lambda k: model.init({"params": k}, x[:1], c[:1], train=False)["params"])(key)

  def net_for(p):
    return lambda y, cond: model.apply({"params": p}, y, cond, train=False)

  forward = jax.jit(lambda p, y, cond: net_for(p)(y, cond))

  def one_vf(p, y, probe):
    score_fn = parameterization.score_fn_from_network(net_for(p), process, "eps")
    fn = likelihood._drift_and_divergence_fn(likelihood._drift_fn(process, score_fn),  # noqa: SLF001
                                             "hutchinson_rademacher", 1, autodiff)
    return fn(y, jnp.asarray(500.0), probe[None])

  vf = jax.jit(one_vf)
  probe = jax.random.rademacher(jax.random.key(2), x.shape, dtype=jnp.float32)

  def solve(p, k, y):
    score_fn = parameterization.score_fn_from_network(net_for(p), process, "eps")
    logp, info = likelihood.log_likelihood(k, process, score_fn, y, rtol=rtol, atol=atol, autodiff=autodiff)
    return logp, info["nfe"]

  solve_jit = jax.jit(solve)
  # compile and warm up all three
  jax.block_until_ready(forward(params, x, c))
  jax.block_until_ready(vf(params, x, probe))
  _, nfe = solve_jit(params, key, x)
  nfe = int(nfe)

  rows = []
  for _ in range(repeats):
    f = _median_call_s(forward, (params, x, c), calls)
    v = _median_call_s(vf, (params, x, probe), calls)
    s = _median_call_s(solve_jit, (params, key, x), max(1, calls // 10))
    rows.append((f, v, s / nfe))
  f_med = statistics.median(r[0] for r in rows)
  return {
      "model": model_name, "autodiff": autodiff, "resolution": res, "batch": batch, "backend": jax.default_backend(),
      "devices": jax.device_count(), "nfe": nfe, "rtol": rtol, "atol": atol,
      "forward_ms": 1e3 * f_med,
      "vf_ms": 1e3 * statistics.median(r[1] for r in rows),
      "per_nfe_ms": 1e3 * statistics.median(r[2] for r in rows),
      "ratio": statistics.median(r[2] / r[0] for r in rows),
      "ratio_vf": statistics.median(r[1] / r[0] for r in rows),
      "ratios_per_repeat": [round(r[2] / r[0], 3) for r in rows],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS) + ["all"], default="all")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--calls", type=int, default=20, help="calls per timing (solves: calls // 10)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rtol", type=float, default=1e-3)
  parser.add_argument("--atol", type=float, default=1e-3)
  parser.add_argument("--autodiff", choices=["forward", "reverse", "both"], default="both",
                      help="the divergence's Jacobian products: jax.jvp (plain layers) or jax.vjp")
  args = parser.parse_args()
  names = sorted(MODELS) if args.model == "all" else [args.model]
  modes = ["forward", "reverse"] if args.autodiff == "both" else [args.autodiff]
  for name in names:
    for mode in modes:
      print(json.dumps(bench(name, args.batch, args.calls, args.repeats, args.rtol, args.atol, mode)), flush=True)


if __name__ == "__main__":
  main()
