r"""The PyTorch peer's train and sample workloads on a GPU: eager or `torch.compile`, fp32 or bf16.

  python benchmarks/torch_peer_gpu.py --peer_script PATH/torch_unet_bench.py --mode train \
      --batch 128 --dtype bfloat16 --compile on

The CPU harness `../shared/bench/torch_unet_bench.py` (the peer) has no device option. This
script imports it (`--peer_script`) for the network (`build_model`: diffusers `UNet2DModel`
with the DDPM CIFAR-10 config, dropout 0.1), the DDPM schedule and the AdamW settings, and
runs its workloads on `--device` (default cuda):

* `train` (images/s): eps-MSE on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t uniform
  over 0..999, fused AdamW(2e-4, wd 0.01) on all parameters; `--dtype bfloat16` runs the
  network under `torch.autocast(bfloat16)` (parameters, optimizer state and loss fp32, as
  jaxdiff's `--dtype bfloat16`).
* `sample` (images x NFE / s): DDPM ancestral steps ("fixed_small" variance) under
  `torch.inference_mode`; `--sample_steps N` times N consecutive steps as one measurement
  (`--sample_steps 1000 --batch 256`: the 256 x 1000-step wall time).

Every timed step ends with `torch.cuda.synchronize()`. One JSON line per run, with the
same keys as the peer's (`impl`, `config`, `mode`, `batch`, `compile`, `img_per_s`, ...) plus
`dtype`, `device_kind` and, for sampling, `wall_s` of the `--sample_steps` steps; and
`cpu_s_per_step` (`user`, `sys`) and `minor_faults_per_step`, `getrusage` over the timed
steps, as `unet_bench.py` reports them (with `--device cpu`, the peer's CPU time per step).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import sys
import time


def load_peer(path: str):
  if not os.path.exists(path):
    sys.exit(f"error: --peer_script={path!r} does not exist; pass the peer's torch_unet_bench.py "
             f"(../shared/bench/ beside the repository; copy it next to the repo to carry it to a GPU machine).")
  spec = importlib.util.spec_from_file_location("torch_unet_bench", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--peer_script", required=True, help="path of the peer's torch_unet_bench.py")
  p.add_argument("--config", choices=["big", "small"], default="big")
  p.add_argument("--mode", choices=["train", "sample"], default="train")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--compile", choices=["off", "on"], default="off")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
  p.add_argument("--steps", type=int, default=20, help="timed steps (train) or timed runs (sample)")
  p.add_argument("--sample_steps", type=int, default=1, help="DDPM steps per timed sampling run")
  p.add_argument("--device", default="cuda")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  for name in ("batch", "steps", "sample_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1.")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  peer = load_peer(args.peer_script)
  import torch
  import torch.nn.functional as F

  dev = torch.device(args.device)
  if dev.type == "cuda" and not torch.cuda.is_available():
    sys.exit("error: --device=cuda but torch sees no GPU; use --device cpu to try the script.")
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  if dev.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default fp32 precision on GPU
    torch.backends.cudnn.allow_tf32 = True
  model, n_params = peer.build_model(args.config, 0)
  model = model.to(dev)
  betas, alphas, abar = (a.to(dev) for a in peer.schedule(torch))
  sqrt_abar, sqrt_1m_abar = abar.sqrt(), (1.0 - abar).sqrt()
  fwd = torch.compile(model) if args.compile == "on" else model
  autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
              else contextlib.nullcontext())
  g = torch.Generator(device=dev).manual_seed(1)
  b = args.batch
  shape = (b, 3, 32, 32)

  if args.mode == "train":
    model.train()
    opt = torch.optim.AdamW(model.parameters(), fused=True, **peer.ADAMW)  # as the CPU harness

    def step():
      x0 = torch.randn(shape, generator=g, device=dev)
      eps = torch.randn(shape, generator=g, device=dev)
      t = torch.randint(0, peer.T_STEPS, (b,), generator=g, device=dev)
      xt = sqrt_abar[t].view(b, 1, 1, 1) * x0 + sqrt_1m_abar[t].view(b, 1, 1, 1) * eps
      with autocast:
        pred = fwd(xt, t).sample
      loss = F.mse_loss(pred.float(), eps)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    per_run, runs, ctx = b, args.steps, torch.enable_grad
  else:
    model.eval()
    x = torch.randn(shape, generator=g, device=dev)

    def step():
      xt = x
      for i in range(args.sample_steps):
        ti = peer.T_STEPS - 1 - (i % peer.T_STEPS)
        t = torch.full((b,), ti, dtype=torch.long, device=dev)
        with autocast:
          eps_hat = fwd(xt, t).sample.float()
        mean = (xt - betas[ti] / sqrt_1m_abar[ti] * eps_hat) / alphas[ti].sqrt()
        if ti > 0:
          var = betas[ti] * (1.0 - abar[ti - 1]) / (1.0 - abar[ti])
          mean = mean + var.sqrt() * torch.randn(shape, generator=g, device=dev)
        xt = mean
    per_run, runs, ctx = b * args.sample_steps, args.steps, torch.inference_mode

  with ctx():
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
      step()
    sync()
    times = []
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
      t0 = time.perf_counter()
      step()
      sync()
      times.append(time.perf_counter() - t0)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
  times.sort()
  n_steps = runs * per_run // b  # train steps, or NFE steps when sampling
  rec = dict(impl="diffusers-torch", config=args.config, mode=args.mode, batch=b, params=n_params,
             compile=args.compile == "on", dtype=args.dtype,
             img_per_s=round(per_run * len(times) / sum(times), 3),
             step_s_median=round(times[len(times) // 2], 5), step_s_min=round(times[0], 5),
             first_step_s=round(first, 3), warmup=args.warmup, steps=runs,
             device_kind=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
             torch=torch.__version__, diffusers=__import__("diffusers").__version__,
             cpu_s_per_step={"user": round((usage1.ru_utime - usage0.ru_utime) / n_steps, 4),
                             "sys": round((usage1.ru_stime - usage0.ru_stime) / n_steps, 4)},
             minor_faults_per_step=round((usage1.ru_minflt - usage0.ru_minflt) / n_steps))
  if args.mode == "sample":
    rec.update(sample_steps=args.sample_steps, wall_s=round(times[len(times) // 2], 4))
  line = json.dumps(rec)
  print(line, flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
