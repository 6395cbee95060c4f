r"""NCSN++ / DDPM++ on CPU: jaxdiff's `NCSNpp` against score_sde_pytorch's own `NCSNpp`.

  python benchmarks/ncsnpp_bench.py --net ncsnpp --ch 64 --batch 16          # jaxdiff only
  python benchmarks/ncsnpp_bench.py --net ddpmpp --ch 64 --batch 16 --rounds 2 \
      --ref_python /tmp/peers-venv/bin/python --score_sde_pytorch /path/to/score_sde_pytorch

Workloads (CIFAR-10 32x32, the networks of configs/cifar10_ncsnpp.py / cifar10_ddpmpp.py
with `--ch` base channels, dropout 0.1, float32):

* `train` (images/s): one step of the eps-MSE loss with AdamW(2e-4, weight_decay=0.01) on
  all parameters (the peer workload of ../shared/bench). jaxdiff: `jaxdiff.train.train_step`
  with the config's process (VE for NCSN++, VP for DDPM++), jitted, state donated;
  score_sde_pytorch: its `NCSNpp` in train mode, `torch.optim.AdamW(fused=True)`.
* `forward` (images/s): one eval-mode forward, what every sampler step costs.

Each measurement runs in its own process (`--impl` picks one; without it the script runs
`--rounds` rounds, alternating the order, and prints the jaxdiff / score_sde ratios). The
reference needs score_sde_pytorch's sources made to run on CPU: see
tests/fixtures/make_score_sde_fixture.py for the changes; `--score_sde_pytorch` is that tree.
One JSON line per measurement: `impl`, `net`, `ch`, `mode`, `batch`, `params`, `malloc`,
`img_per_s`, `step_s` (median), `first_step_s`, `peak_rss_mb`. `JAXDIFF_TCMALLOC=1` runs
jaxdiff's processes with tcmalloc preloaded (as `run_train.py`); the peer keeps its allocator.
"""

from __future__ import annotations

import argparse
import os
import sys

from peer_rounds import jaxdiff_train_call, jaxdiff_worker_setup, print_ratios, record, run_rounds, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETS = {"ncsnpp": "cifar10_ncsnpp", "ddpmpp": "cifar10_ddpmpp"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--net", default="ncsnpp", help="ncsnpp (VE, FIR, Fourier) | ddpmpp (VP)")
  p.add_argument("--ch", type=int, default=64, help="base channels (CIFAR-10: 128)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num_res_blocks", type=int, default=4, help="residual blocks per level (score_sde: 4)")
  p.add_argument("--modes", default="train,forward")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls, the first (compiling) one included")
  p.add_argument("--steps", type=int, default=4, help="timed calls")
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--impl", default="", help="jaxdiff | score_sde: one measurement in this process")
  p.add_argument("--ref_python", default="", help="a python with torch, for score_sde_pytorch")
  p.add_argument("--score_sde_pytorch", default="", help="score_sde_pytorch's source tree (CPU-patched)")
  args = p.parse_args(argv)
  if args.net not in NETS:
    p.error(f"--net={args.net!r} is not known; use one of {', '.join(NETS)}.")
  for m in args.modes.split(","):
    if m not in ("train", "forward"):
      p.error(f"--modes item {m!r} is not train or forward.")
  if min(args.batch, args.steps, args.warmup, args.num_res_blocks, args.ch) < 1:
    p.error("--batch, --ch, --num_res_blocks, --steps and --warmup must be >= 1.")
  if not args.impl and bool(args.ref_python) != bool(args.score_sde_pytorch):
    p.error("--ref_python and --score_sde_pytorch go together (the reference needs both).")
  if args.score_sde_pytorch and not os.path.isfile(os.path.join(args.score_sde_pytorch, "models", "ncsnpp.py")):
    p.error(f"--score_sde_pytorch={args.score_sde_pytorch!r} has no models/ncsnpp.py; pass the source tree.")
  if args.ref_python and not os.path.exists(args.ref_python):
    p.error(f"--ref_python={args.ref_python!r} does not exist.")
  return args


def config(net: str, ch: int, num_res_blocks: int):
  import importlib.util

  spec = importlib.util.spec_from_file_location(NETS[net], os.path.join(ROOT, "configs", f"{NETS[net]}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.update(ch=ch, num_res_blocks=num_res_blocks, dtype="float32", dropout=0.1)
  return c


def measure_jaxdiff(args, mode):
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxdiff import aot, models, processes

  c = config(args.net, args.ch, args.num_res_blocks)
  model = models.create_model(**c.model.to_dict())
  process = processes.get_process(**c.process.to_dict())
  shape = (args.batch, 32, 32, 3)
  key = jax.random.key(0)
  if mode == "train":
    call, params = jaxdiff_train_call(model, process, lambda k: {"x": jax.random.normal(k, shape)}, shape[1:],
                                      learning_rate=2e-4, weight_decay=0.01)
  else:
    params = aot.AotJit(jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), jnp.ones((1,)),
                                                     train=False)["params"]), name="init")(key)
    fwd = aot.AotJit(jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, train=False)), name="forward")
    cond = process.noise_cond(jnp.full((args.batch,), 0.5))

    def call(i):
      jax.block_until_ready(fwd(params, jax.random.normal(jax.random.fold_in(key, i), shape), cond))
  first, step_s = timed(call, args.warmup, args.steps)
  return first, step_s, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def measure_score_sde(args, mode):
  import torch

  sys.path.insert(0, args.score_sde_pytorch)
  from models import ncsnpp  # noqa: F401  (score_sde_pytorch's)

  # score_sde's CIFAR-10 configs (the torch venv has no ml_collections to read jaxdiff's)
  ve = args.net == "ncsnpp"

  class Attrs(dict):
    __getattr__ = dict.__getitem__

  model_cfg = Attrs(
      name="ncsnpp", normalization="GroupNorm", nonlinearity="swish", nf=args.ch, ch_mult=(1, 2, 2, 2),
      num_res_blocks=args.num_res_blocks, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
      conditional=True, fir=ve, fir_kernel=[1, 3, 3, 1], skip_rescale=True, resblock_type="biggan",
      progressive="none", progressive_input="residual" if ve else "none", progressive_combine="sum",
      embedding_type="fourier" if ve else "positional", fourier_scale=16.0, init_scale=0.0, scale_by_sigma=ve,
      num_scales=1000, sigma_min=0.01, sigma_max=50.0, beta_min=0.1, beta_max=20.0)
  cfg = Attrs(model=model_cfg, data=Attrs(image_size=32, num_channels=3, centered=not ve),
              training=Attrs(continuous=True))
  torch.manual_seed(0)
  net = ncsnpp.NCSNpp(cfg)
  x = torch.randn(args.batch, 3, 32, 32)
  t = torch.full((args.batch,), 5.0 if ve else 500.0)
  if mode == "train":
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=0.01, fused=True)

    def call(i):
      eps = torch.randn_like(x)
      loss = ((net(x + eps, t) - eps) ** 2).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      loss.item()
  else:
    net.eval()

    def call(i):
      with torch.no_grad():
        net(torch.randn_like(x), t)
  first, step_s = timed(call, args.warmup, args.steps)
  return first, step_s, sum(p.numel() for p in net.parameters())


def worker(args) -> None:
  if args.impl == "jaxdiff":
    jaxdiff_worker_setup(ROOT)  # JAXDIFF_TCMALLOC=1: restarts once with tcmalloc preloaded
  for mode in args.modes.split(","):  # (the driver passes one mode per process)
    fn = measure_jaxdiff if args.impl == "jaxdiff" else measure_score_sde
    first, step_s, n = fn(args, mode)
    print(record(first, step_s, impl=args.impl, net=args.net, ch=args.ch, mode=mode, batch=args.batch,
                 params=int(n)), flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.impl:
    if args.impl not in ("jaxdiff", "score_sde"):
      sys.exit(f"error: --impl={args.impl!r} is not jaxdiff or score_sde.")
    worker(args)
    return 0
  common = ["--net", args.net, "--ch", str(args.ch), "--batch", str(args.batch),
            "--num_res_blocks", str(args.num_res_blocks),
            "--warmup", str(args.warmup), "--steps", str(args.steps)]
  impls = [("jaxdiff", sys.executable)] + ([("score_sde", args.ref_python)] if args.ref_python else [])
  modes = args.modes.split(",")
  extra = lambda impl: ["--score_sde_pytorch", args.score_sde_pytorch] if impl == "score_sde" else []  # noqa: E731
  records = run_rounds(os.path.abspath(__file__), impls, common, modes, args.rounds, ROOT, extra=extra)
  if len(impls) == 2:
    print_ratios(records, modes, "score_sde", "score_sde_pytorch", f"{args.net} ch={args.ch} {{mode}} B={args.batch}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
