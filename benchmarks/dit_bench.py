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

`--dtype bfloat16` computes in bf16 with fp32 parameters, optimizer state and loss (jaxdiff:
`DiT(dtype=bfloat16)`; diffusers: `torch.autocast`). `--device cuda` runs diffusers on the GPU
(jaxdiff runs on JAX's default backend) and `--compile on` wraps it in `torch.compile`:
`benchmarks/gpu_suite.py`'s DiT jobs. Model FLOPs (`train_flops_per_img`, for MFU) are
counted from the architecture: 2 per multiply-add of every matmul and of attention, the
backward pass twice the forward.

Each measurement runs in its own process; without `--impl` the script runs `--rounds`
rounds, alternating the order, and prints the jaxdiff / diffusers ratios. One JSON line per
measurement: `impl`, `size`, `mode`, `batch`, `params`, `dtype`, `device_kind`, `malloc`,
`img_per_s`, `step_s` (median), `first_step_s`, `peak_rss_mb`. `JAXDIFF_TCMALLOC=1` runs jaxdiff's processes with
tcmalloc preloaded, as it does `run_train.py` (`jaxdiff/cli.py`); the peer keeps its allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from peer_rounds import jaxdiff_train_call, jaxdiff_worker_setup, print_ratios, record, run_rounds, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = ("S/2", "S/4", "S/8", "B/2", "B/4", "L/2", "XL/2")
NUM_CLASSES, SIDE, CHANNELS = 1000, 32, 4
WIDTHS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}  # D, depth, heads


def forward_flops_per_img(size: str, side: int = SIDE, channels: int = CHANNELS, mlp_ratio: float = 4.0) -> int:
  """Model FLOPs of one DiT forward on a [side, side, channels] input: 2 x the multiply-adds
  of the patch embedding, each block's qkv, attention (QK^T and AV over all T tokens),
  output projection and MLP, the per-image timestep / adaLN layers and the final projection.
  DiT-XL/2 at 32x32x4: 237 GFLOP (Peebles & Xie count 118.6 G multiply-adds)."""
  name, patch = size.split("/")
  d, depth, _ = WIDTHS[name]
  p, mlp = int(patch), int(mlp_ratio * d)
  tokens = (side // p) ** 2
  per_token = p * p * channels * d + depth * (4 * d * d + 2 * d * mlp) + d * p * p * channels
  per_image = 256 * d + d * d + depth * 6 * d * d + 2 * d * d  # timestep MLP, adaLN of every block and the last
  attention = depth * 2 * tokens * tokens * d
  return 2 * (tokens * per_token + per_image + attention)


def train_flops_per_img(size: str) -> int:
  """A train step's model FLOPs per image: the forward and a backward of twice its cost."""
  return 3 * forward_flops_per_img(size)


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
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  p.add_argument("--device", default="cpu", help="diffusers' torch device (cpu, cuda)")
  p.add_argument("--compile", default="off", choices=["off", "on"], help="diffusers under torch.compile")
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

  model = DiT(**dit_size(args.size), num_classes=NUM_CLASSES, dtype=jnp.dtype(args.dtype))
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
  return first, step_s, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), jax.devices()[0].device_kind


def measure_diffusers(args, mode):
  import torch
  from diffusers import DiTTransformer2DModel

  size, patch = args.size.split("/")
  hidden, depth, heads = WIDTHS[size]
  dev = torch.device(args.device)
  if dev.type == "cuda":
    if not torch.cuda.is_available():
      sys.exit("error: --device=cuda but torch sees no GPU; use --device cpu.")
    torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default fp32 precision on GPU
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  torch.manual_seed(0)
  net = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=CHANNELS,
                              out_channels=CHANNELS, num_layers=depth, sample_size=SIDE, patch_size=int(patch),
                              num_embeds_ada_norm=NUM_CLASSES).to(dev)
  fwd = torch.compile(net) if args.compile == "on" else net
  autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
              else contextlib.nullcontext())
  alphas_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(dev)
  x0 = torch.randn(args.batch, CHANNELS, SIDE, SIDE, device=dev)
  if mode == "train":
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def call(i):
      t = torch.randint(0, 1000, (args.batch,), device=dev)
      y = torch.randint(0, NUM_CLASSES, (args.batch,), device=dev)
      eps = torch.randn_like(x0)
      a = alphas_bar[t].view(-1, 1, 1, 1)
      with autocast:
        pred = fwd(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y).sample
      loss = ((pred.float() - eps) ** 2).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      loss.item()
  else:
    net.eval()
    t = torch.full((args.batch,), 500, device=dev)

    def call(i):
      with torch.no_grad(), autocast:
        fwd(torch.randn_like(x0), t, torch.randint(0, NUM_CLASSES, (args.batch,), device=dev))
      sync()
  first, step_s = timed(call, args.warmup, args.steps)
  kind = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
  return first, step_s, sum(p.numel() for p in net.parameters()), kind


def worker(args) -> None:
  if args.impl == "jaxdiff":
    jaxdiff_worker_setup(ROOT)  # JAXDIFF_TCMALLOC=1: restarts once with tcmalloc preloaded
  for mode in args.modes.split(","):
    fn = measure_jaxdiff if args.impl == "jaxdiff" else measure_diffusers
    first, step_s, n, kind = fn(args, mode)
    extra = {"compile": args.compile} if args.impl == "diffusers" else {}
    print(record(first, step_s, impl=args.impl, size=args.size, mode=mode, batch=args.batch, params=int(n),
                 dtype=args.dtype, device_kind=kind, **extra), flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.impl:
    if args.impl not in ("jaxdiff", "diffusers"):
      sys.exit(f"error: --impl={args.impl!r} is not jaxdiff or diffusers.")
    worker(args)
    return 0
  common = ["--size", args.size, "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--dtype", args.dtype, "--device", args.device, "--compile", args.compile]
  impls = [("jaxdiff", sys.executable)] + ([("diffusers", args.ref_python)] if args.ref_python else [])
  modes = args.modes.split(",")
  records = run_rounds(os.path.abspath(__file__), impls, common, modes, args.rounds, ROOT)
  if len(impls) == 2:
    print_ratios(records, modes, "diffusers", "diffusers", f"DiT-{args.size} {{mode}} B={args.batch}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
