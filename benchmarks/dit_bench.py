r"""DiT on CPU: jaxdiff's `DiT` against diffusers' `DiTTransformer2DModel` (PyTorch).

  python benchmarks/dit_bench.py --size S/2 --batch 8                      # jaxdiff only
  python benchmarks/dit_bench.py --size S/2 --batch 8 --rounds 3 --ref_python /tmp/peers-venv/bin/python

Workload: DiT-XL/2-256's input, [B, 32, 32, 4] latents (NHWC for jaxdiff, NCHW for
diffusers), 1000 classes, the network `--size` of the paper (S/2: 33M parameters), float32.

* `train` (images/s): one step of the eps-MSE loss on the linear DDPM process with AdamW
  (1e-4, no weight decay: DiT's optimizer) on all parameters, random class labels.
  jaxdiff: `jaxdiff.train.train_step`, jitted, state donated; diffusers: the model in train
  mode (its attention: torch's scaled_dot_product_attention), `torch.optim.AdamW(fused=True)`.
* `forward` (images/s): one eval-mode forward with labels, what every sampler step costs.

diffusers' DiT holds a timestep/label embedder in every block (DiT has one), so it has more
parameters (`params` of each record) and trains them all; its forward computes each block's
embedding again, which jaxdiff computes once. Those are part of what is compared.

Each measurement runs in its own process; without `--impl` the script runs `--rounds`
rounds, alternating the order, and prints the jaxdiff / diffusers ratios. One JSON line per
measurement: `impl`, `size`, `mode`, `batch`, `params`, `malloc`, `img_per_s`, `step_s`
(median), `first_step_s`, `peak_rss_mb`. `JAXDIFF_TCMALLOC=1` runs jaxdiff's processes with
tcmalloc preloaded, as it does `run_train.py` (`jaxdiff/cli.py`); the peer keeps its allocator.
"""

from __future__ import annotations

import argparse
import os
import sys

from peer_rounds import jaxdiff_train_call, jaxdiff_worker_setup, print_ratios, record, run_rounds, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = ("S/2", "S/4", "S/8", "B/2", "B/4", "L/2", "XL/2")
NUM_CLASSES, SIDE, CHANNELS = 1000, 32, 4


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="S/2", help=f"one of {', '.join(SIZES)}")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--modes", default="train,forward")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls, the first (compiling) one included")
  p.add_argument("--steps", type=int, default=4, help="timed calls")
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--impl", default="", help="jaxdiff | diffusers: one measurement in this process")
  p.add_argument("--ref_python", default="", help="a python with torch and diffusers")
  args = p.parse_args(argv)
  if args.size not in SIZES:
    p.error(f"--size={args.size!r} is not known; use one of {', '.join(SIZES)}.")
  for m in args.modes.split(","):
    if m not in ("train", "forward"):
      p.error(f"--modes item {m!r} is not train or forward.")
  if min(args.batch, args.steps, args.warmup, args.rounds) < 1:
    p.error("--batch, --steps, --warmup and --rounds must be >= 1.")
  if args.ref_python and not os.path.exists(args.ref_python):
    p.error(f"--ref_python={args.ref_python!r} does not exist.")
  return args


def measure_jaxdiff(args, mode):
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxdiff import aot, processes
  from jaxdiff.models import DiT, dit_size

  model = DiT(**dit_size(args.size), num_classes=NUM_CLASSES)
  process = processes.get_process(name="ddpm", schedule="linear", num_timesteps=1000)
  shape = (args.batch, SIDE, SIDE, CHANNELS)
  key = jax.random.key(0)
  labels = lambda k: jax.random.randint(k, (args.batch,), 0, NUM_CLASSES)  # noqa: E731
  if mode == "train":
    call, params = jaxdiff_train_call(model, process, lambda k: {"x": jax.random.normal(k, shape), "label": labels(k)},
                                      shape[1:], learning_rate=1e-4, weight_decay=0.0)
  else:
    params = aot.AotJit(jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape[1:])), jnp.ones((1,)))["params"]),
                        name="init")(key)
    fwd = aot.AotJit(jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y)), name="forward")
    t = jnp.full((args.batch,), 500.0)

    def call(i):
      k = jax.random.fold_in(key, i)
      jax.block_until_ready(fwd(params, jax.random.normal(k, shape), t, labels(k)))
  first, step_s = timed(call, args.warmup, args.steps)
  return first, step_s, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def measure_diffusers(args, mode):
  import torch
  from diffusers import DiTTransformer2DModel

  size, patch = args.size.split("/")
  hidden, depth, heads = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}[size]
  torch.manual_seed(0)
  net = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=CHANNELS,
                              out_channels=CHANNELS, num_layers=depth, sample_size=SIDE, patch_size=int(patch),
                              num_embeds_ada_norm=NUM_CLASSES)
  alphas_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
  x0 = torch.randn(args.batch, CHANNELS, SIDE, SIDE)
  if mode == "train":
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def call(i):
      t = torch.randint(0, 1000, (args.batch,))
      y = torch.randint(0, NUM_CLASSES, (args.batch,))
      eps = torch.randn_like(x0)
      a = alphas_bar[t].view(-1, 1, 1, 1)
      loss = ((net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y).sample - eps) ** 2).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      loss.item()
  else:
    net.eval()
    t = torch.full((args.batch,), 500)

    def call(i):
      with torch.no_grad():
        net(torch.randn_like(x0), t, torch.randint(0, NUM_CLASSES, (args.batch,)))
  first, step_s = timed(call, args.warmup, args.steps)
  return first, step_s, sum(p.numel() for p in net.parameters())


def worker(args) -> None:
  if args.impl == "jaxdiff":
    jaxdiff_worker_setup(ROOT)  # JAXDIFF_TCMALLOC=1: restarts once with tcmalloc preloaded
  for mode in args.modes.split(","):
    fn = measure_jaxdiff if args.impl == "jaxdiff" else measure_diffusers
    first, step_s, n = fn(args, mode)
    print(record(first, step_s, impl=args.impl, size=args.size, mode=mode, batch=args.batch, params=int(n)),
          flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.impl:
    if args.impl not in ("jaxdiff", "diffusers"):
      sys.exit(f"error: --impl={args.impl!r} is not jaxdiff or diffusers.")
    worker(args)
    return 0
  common = ["--size", args.size, "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
  impls = [("jaxdiff", sys.executable)] + ([("diffusers", args.ref_python)] if args.ref_python else [])
  modes = args.modes.split(",")
  records = run_rounds(os.path.abspath(__file__), impls, common, modes, args.rounds, ROOT)
  if len(impls) == 2:
    print_ratios(records, modes, "diffusers", "diffusers", f"DiT-{args.size} {{mode}} B={args.batch}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
