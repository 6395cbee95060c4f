r"""The peer's U-Net workloads, run through jaxdiff's own U-Net, train step and sampler.

  python benchmarks/unet_bench.py --config big --mode both --batch 16 --warmup 2 --steps 8
  python benchmarks/unet_bench.py --config small --mode train --batch 64 --out results.jsonl
  python benchmarks/unet_bench.py --config big --mode train --dtype bfloat16 --batch 128   # GPU

Reproduces `../shared/bench/torch_unet_bench.py` (see its README) with the same flags and
one JSON line per measurement:

* networks: `big` is `configs/cifar10_ddpm.py`'s U-Net (the DDPM CIFAR-10 network, dropout
  0.1, 35,746,307 parameters, the peer's count exactly); `small` the same with ch=32
  (2,245,763). Both built with `jaxdiff.models.create_model(**config.model)`.
* `train` (images/s): `jaxdiff.train.train_step` -- the step `run_train.py` runs -- with the
  eps-MSE loss on the linear 1000-step DDPM process (`t` uniform over the integer steps,
  dropout active), AdamW(2e-4, 0.9, 0.999, 1e-8, weight_decay=0.01) on all parameters, no
  clipping, no EMA, no schedule; jitted with the state donated; every timed step waits for
  the new state and the loss. `--steps_per_call K` runs K steps (K fresh batches) per call
  in one `lax.scan` (`jaxdiff.train.train_steps`, `config.training.steps_per_call`); then
  `--steps` train steps are timed as ceil(steps / K) calls. `--microbatches M` computes each
  step's gradient over M parts of the batch, one at a time (`config.training.microbatches`):
  the same update, a 1/M-sized activation working set.
* `sample` (images x NFE/s): DDPM ancestral steps from t = 1000 down, each call one
  `jaxdiff.sample(..., method="ancestral", ts=[t, t-1], denoise=False)` (`--sample_chunk K`
  runs K steps per call in one `lax.scan` instead), eval mode.

`first_step_s` is the first call, compilation included, and `first_step_breakdown_s` splits
it into tracing, lowering to StableHLO, XLA compilation, and the rest (the first execution
itself). A warm `--cache_dir` skips all three: the measured step's compiled executable is
loaded (`jaxdiff.aot`, `load_executable`, `executable_loaded: true`); JAX's persistent cache
serves the small jits around it. `--warmup` counts that call. `img_per_s = B * steps /
sum(step times)`. Each measurement runs in its own process (`--mode both` starts one per
mode), so `peak_rss_mb` (ru_maxrss) belongs to it alone; `JAXDIFF_TCMALLOC=1` runs it with
tcmalloc preloaded, as the entry scripts would (`malloc` in the record).

`cpu_s_per_step` (`user`, `sys`) and `minor_faults_per_step` are `getrusage` over the timed
calls, divided by the train steps (sample: the NFE steps) they ran: CPU time that the wall
clock hides (two threads) or that steal inflates, and the kernel's share of it (page faults
of fresh buffers). `benchmarks/torch_peer_gpu.py --device cpu` reports the same for the peer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

CONFIGS = ("big", "small")
MODES = ("train", "sample", "both")
DEFAULT_BATCH = {"big": 16, "small": 64}
# what the measured program depends on (the key of its cached executable)
PROGRAM_FLAGS = ("config", "mode", "batch", "dtype", "remat", "sample_chunk", "steps_per_call",
                 "microbatches")
PEER_PARAMS = {"big": 35_746_307, "small": 2_245_763}
# The peer's counts (README of ../shared/bench): 2 FLOPs per MAC, conv + linear + attention.
TRAIN_FLOPS_PER_IMG = {"big": 37.32e9, "small": 2.528e9}
FWD_FLOPS_PER_IMG = {"big": 12.444e9, "small": 0.843e9}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="big", help="big (35.7M, the DDPM CIFAR-10 U-Net) | small (2.2M)")
  p.add_argument("--mode", default="both", help="train | sample | both")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: 16 big, 64 small)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls, the first (compiling) one included")
  p.add_argument("--steps", type=int, default=8, help="timed calls")
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16 (params stay fp32)")
  p.add_argument("--remat", action="store_true", help="jax.checkpoint every resnet/attention block")
  p.add_argument("--sample_chunk", type=int, default=1, help="ancestral steps per sampling call")
  p.add_argument("--steps_per_call", type=int, default=1, help="train steps per call (one lax.scan)")
  p.add_argument("--microbatches", type=int, default=1,
                 help="train: each step's gradient over this many parts of the batch, one at a time")
  p.add_argument("--cache_dir", default="", help="persistent XLA compilation cache and compiled steps ('' = off)")
  p.add_argument("--threads", type=int, default=None, help="informational: cores given to the run")
  args = p.parse_args(argv)
  errors = []
  if args.config not in CONFIGS:
    errors.append(f"--config={args.config!r} is not known; use one of {', '.join(CONFIGS)}.")
  if args.mode not in MODES:
    errors.append(f"--mode={args.mode!r} is not known; use one of {', '.join(MODES)}.")
  if args.dtype not in ("float32", "bfloat16"):
    errors.append(f"--dtype={args.dtype!r} is not supported; use float32 or bfloat16.")
  for name in ("steps", "warmup", "sample_chunk", "steps_per_call", "microbatches"):
    if getattr(args, name) < (0 if name == "warmup" else 1):
      errors.append(f"--{name}={getattr(args, name)} must be >= {0 if name == 'warmup' else 1}.")
  if args.batch is not None and args.batch < 1:
    errors.append(f"--batch={args.batch} must be >= 1.")
  if errors:
    p.exit(2, f"error: {errors[0]}\n")
  args.batch = args.batch or DEFAULT_BATCH[args.config]
  return args


def build(config_name: str, dtype: str, remat: bool):
  """The peer's network as jaxdiff builds it: `configs/cifar10_ddpm.py`'s model config."""
  from jaxdiff import models
  import importlib.util

  spec = importlib.util.spec_from_file_location("cifar10_ddpm", os.path.join(ROOT, "configs", "cifar10_ddpm.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  model_cfg = config.model.to_dict()
  model_cfg.update(dropout=0.1, dtype=dtype, remat=remat)
  if config_name == "small":
    model_cfg["ch"] = 32
  return models.create_model(**model_cfg), config


def measure(args) -> dict:
  """One measurement in this process; returns the JSON record."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxdiff import aot, losses, parameterization, processes, samplers, sharding, train

  if args.cache_dir:  # before anything compiles
    aot.use_compilation_cache(args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  model, config = build(args.config, args.dtype, args.remat)
  mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
  sharding.check_batch_size(args.batch, mesh, name="--batch",
                            microbatches=args.microbatches if args.mode == "train" else 1,
                            microbatches_name="--microbatches")
  process = processes.DDPM.linear(num_timesteps=1000)
  shape = (args.batch, 32, 32, 3)
  x_sh = sharding.batch_sharding(mesh, 4)
  repl = sharding.replicated(mesh)
  key = jax.random.key(0)
  rss_before = peak_rss_mb()

  def compiled_ahead(jitted):
    """Compiled ahead of its first execution, as run_train does (jaxdiff.aot); with --cache_dir
    a warm run loads the compiled step without tracing it."""
    return aot.AotJit(jitted, cache_dir=args.cache_dir, name=f"unet_bench_{args.mode}",
                      fingerprint=json.dumps({k: getattr(args, k) for k in PROGRAM_FLAGS}))

  if args.mode == "train":
    optimizer = train.make_optimizer(name="adamw", learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=0.01, grad_clip=0.0)
    # (a throwaway jit: nothing keeps the init's executable alive after this call)
    state = aot.AotJit(jax.jit(
        lambda k: train.create_train_state(k, model=model, optimizer=optimizer,
                                           example_x=jnp.zeros((1, 32, 32, 3)), ema=False),
        out_shardings=repl), name="init")(key)
    loss_fn = losses.make_denoising_loss(process, prediction="eps")

    def one_step(state, batch, k):
      return train.train_step(state, batch, k, model=model, loss_fn=loss_fn, optimizer=optimizer,
                              ema_decay=None, microbatches=args.microbatches)

    n_steps = args.steps_per_call
    if n_steps == 1:
      step = jax.jit(one_step, donate_argnums=0, in_shardings=(repl, {"x": x_sh}, repl),
                     out_shardings=(repl, repl))
    else:  # the training loop's calls of K steps; step i draws with fold_in(k, state.step)
      step = jax.jit(functools.partial(train.train_steps, step_fn=one_step), donate_argnums=0,
                     in_shardings=(repl, ({"x": x_sh},) * n_steps, repl), out_shardings=(repl, repl))
    step = compiled_ahead(step)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

    def call(i):
      nonlocal state
      k = jax.random.fold_in(key, i)
      xs = tuple({"x": jax.random.normal(jax.random.fold_in(k, 1 + j), shape)} for j in range(n_steps))
      state, metrics = step(state, xs[0] if n_steps == 1 else xs, k)
      jax.block_until_ready((state, metrics["loss"]))

    per_call = args.batch * n_steps
  else:
    params = aot.AotJit(jax.jit(
        lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)), train=False)["params"],
        out_shardings=repl), name="init")(key)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    chunk = args.sample_chunk

    def sample_chunk(params, k, t0):
      net = train.network_fn(model, params)
      score_fn = parameterization.score_fn_from_network(net, process, "eps")
      ts = t0 - jnp.arange(chunk + 1, dtype=jnp.float32)
      x, info = samplers.sample(k, process, score_fn, shape, method="ancestral", ts=ts, denoise=False)
      return x

    fn = compiled_ahead(jax.jit(sample_chunk, out_shardings=x_sh))
    t_now = [1000.0]

    def call(i):
      x = fn(params, jax.random.fold_in(key, i), jnp.float32(t_now[0]))
      t_now[0] = t_now[0] - chunk if t_now[0] - chunk > chunk else 1000.0
      jax.block_until_ready(x)

    per_call = args.batch * chunk

  # Where the first call's time goes: JAX reports its compile phases through jax.monitoring.
  phases = {"/jax/core/compile/jaxpr_trace_duration": "trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
            "/jax/core/compile/backend_compile_duration": "compile_or_cache_load"}
  spent = dict.fromkeys(phases.values(), 0.0)

  def listener(event, duration, **_):
    if event in phases:
      spent[phases[event]] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  t0 = time.perf_counter()
  call(0)
  first = time.perf_counter() - t0
  jax.monitoring.unregister_event_duration_listener(listener)
  timed = step if args.mode == "train" else fn
  if timed.loaded:
    spent["load_executable"] = timed.compile_s  # no trace, lowering or compile
  spent["execute_and_rest"] = first - sum(spent.values())
  for i in range(1, args.warmup):
    call(i)
  times = []
  n_timed = -(-args.steps // args.steps_per_call) if args.mode == "train" else args.steps
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  for i in range(n_timed):
    t0 = time.perf_counter()
    call(args.warmup + i)
    times.append(time.perf_counter() - t0)
  usage1 = resource.getrusage(resource.RUSAGE_SELF)
  img_per_s = per_call * n_timed / sum(times)
  n_steps = n_timed * per_call // args.batch  # train steps, or NFE steps when sampling
  dev = jax.devices()[0]
  rec = dict(
      impl="jaxdiff", config=args.config, mode=args.mode, batch=args.batch, params=n_params,
      params_match_peer=n_params == PEER_PARAMS[args.config], img_per_s=round(img_per_s, 3),
      step_s_median=round(float(np.median(times)), 4), step_s_min=round(min(times), 4),
      first_step_s=round(first, 3), first_step_breakdown_s={k: round(v, 2) for k, v in spent.items()},
      warmup=args.warmup, steps=args.steps, dtype=args.dtype,
      remat=args.remat, sample_chunk=args.sample_chunk if args.mode == "sample" else None,
      steps_per_call=args.steps_per_call if args.mode == "train" else None,
      microbatches=args.microbatches if args.mode == "train" else None,
      compilation_cache=bool(args.cache_dir),
      executable_loaded=timed.loaded, peak_rss_mb=round(peak_rss_mb(), 1),
      rss_after_build_mb=round(rss_before, 1), backend=jax.default_backend(),
      device_kind=dev.device_kind, num_devices=jax.device_count(),
      threads=args.threads or os.cpu_count(), python=platform.python_version(),
      malloc="tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "default",
      xla_flags=os.environ.get("XLA_FLAGS", ""),  # jaxdiff's defaults included (set at import)
      cpu_s_per_step={"user": round((usage1.ru_utime - usage0.ru_utime) / n_steps, 4),
                      "sys": round((usage1.ru_stime - usage0.ru_stime) / n_steps, 4)},
      minor_faults_per_step=round((usage1.ru_minflt - usage0.ru_minflt) / n_steps),
  )
  flops = (TRAIN_FLOPS_PER_IMG if args.mode == "train" else FWD_FLOPS_PER_IMG)[args.config]
  rec["achieved_gflops"] = round(img_per_s * flops / 1e9, 1)
  import flax
  import jaxlib
  import optax

  rec.update(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__)
  return rec


def emit(rec: dict, out: str | None) -> None:
  line = json.dumps(rec)
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")


def _without_flag(argv: list[str], flag: str) -> list[str]:
  """`argv` without `flag=value` or `flag value`."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == flag:
      skip = True
    elif not a.startswith(flag + "="):
      out.append(a)
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.mode == "both" or not os.environ.get("JAXDIFF_BENCH_CHILD"):
    # One process per measurement: its peak RSS and thread pools are its own.
    from jaxdiff import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    # as run_train.py / run_sample.py run: tcmalloc preloaded if JAXDIFF_TCMALLOC=1
    env = dict(cli.tcmalloc_env() or os.environ, JAXDIFF_BENCH_CHILD="1")
    rc = 0
    for mode in (("train", "sample") if args.mode == "both" else (args.mode,)):
      child = _without_flag(argv, "--mode")
      cmd = [sys.executable, os.path.abspath(__file__), *child, "--mode", mode]
      rc = subprocess.call(cmd, env=env) or rc
    return rc
  rec = measure(args)
  emit(rec, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
