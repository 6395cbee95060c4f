r"""Input-pipeline throughput (images/s), to compare with what a train step consumes.

  python benchmarks/input_bench.py --dataset mnist --data_dir ../shared/tfds --batch_size 128
  python benchmarks/input_bench.py --dataset folder --make_folder 2000 --resolution 32
  python benchmarks/input_bench.py --dataset folder --data_dir /my/images --num_workers 4

Builds the same iterator training uses (`jaxdiff.data.create_dataset`, shuffled, repeating,
with flips and dequantization if asked), draws `--warmup` batches, then times `--batches`
more and prints one JSON line with `images_per_sec`. `--to_device` also times the
`prefetch_to_device` path (global `jax.Array`s on all local devices). `--make_folder N`
first writes N 32x32 PNGs (the embedded `shapes`, one sub-folder per shape) into
`--data_dir` (or a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def make_folder(path: str, num_images: int, resolution: int = 32, seed: int = 0) -> str:
  """Writes `num_images` PNGs of the `shapes` dataset under `path/<shape name>/`; returns path."""
  from PIL import Image

  from jaxdiff.data import synthetic

  x, y = synthetic.shapes(num_images, resolution, 3, seed=seed)
  for name in synthetic.SHAPE_NAMES:
    os.makedirs(os.path.join(path, name), exist_ok=True)
  for i in range(num_images):
    Image.fromarray(x[i]).save(os.path.join(path, synthetic.SHAPE_NAMES[y[i]], f"{i:06d}.png"))
  return path


def run(*, dataset: str, data_dir: str = "", batch_size: int = 128, num_workers: int = 0,
        num_threads: int = 4, resolution: int = 32, num_channels: int | None = None,
        batches: int = 50, warmup: int = 5, random_flip: bool = True,
        uniform_dequantization: bool = False, to_device: bool = False, prefetch: int = 2) -> dict[str, Any]:
  """Times the input pipeline; returns the JSON-able result."""
  from jaxdiff import data as data_lib
  from jaxdiff.data import catalog

  info = catalog.lookup(dataset)
  if num_channels is None:
    num_channels = info.channels or 3
  it = data_lib.create_dataset(
      dataset=dataset, batch_size=batch_size, resolution=resolution, num_channels=num_channels,
      data_dir=data_dir or None, random_flip=random_flip, uniform_dequantization=uniform_dequantization,
      num_threads=num_threads, num_workers=num_workers, seed=0)
  mesh = None
  if to_device:
    import jax

    from jaxdiff import sharding

    mesh = sharding.create_mesh({"data": -1})
    it = data_lib.prefetch_to_device(it, mesh, size=prefetch)
  t0 = time.perf_counter()
  for _ in range(max(1, warmup)):
    b = next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  if to_device:
    jax.block_until_ready(b)
  t2 = time.perf_counter()
  close = getattr(it, "close", None)
  if callable(close):
    close()
  return {
      "dataset": dataset, "data_dir": data_dir, "batch_size": batch_size, "resolution": resolution,
      "num_channels": num_channels, "num_threads": num_threads, "num_workers": num_workers,
      "to_device": to_device, "batches": batches, "warmup_s": round(t1 - t0, 3),
      "images_per_sec": round(batches * batch_size / (t2 - t1), 1),
      "cpu_count": os.cpu_count(), "shape": list(np.shape(b["x"])),
  }


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="mnist", help="mnist | folder | shapes | any jaxdiff.data.KNOWN name")
  p.add_argument("--data_dir", default="", help="TFDS data_dir, or the image folder")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--num_workers", type=int, default=0, help="grain worker processes")
  p.add_argument("--num_threads", type=int, default=4, help="grain reader threads per process")
  p.add_argument("--resolution", type=int, default=None, help="default: 28 for (fashion_)mnist, else 32")
  p.add_argument("--num_channels", type=int, default=None, help="default: the dataset's, else 3")
  p.add_argument("--batches", type=int, default=50, help="batches timed (after --warmup)")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--make_folder", type=int, default=0, help="first write N 32x32 PNGs into --data_dir")
  p.add_argument("--to_device", action="store_true", help="time prefetch_to_device's global arrays too")
  p.add_argument("--no_flip", action="store_true", help="no random horizontal flips")
  p.add_argument("--dequantize", action="store_true", help="uniform dequantization")
  args = p.parse_args(argv)
  data_dir = args.data_dir
  if args.make_folder:
    data_dir = data_dir or tempfile.mkdtemp(prefix="jaxdiff-bench-folder-")
    make_folder(data_dir, args.make_folder)
  resolution = args.resolution or (28 if args.dataset in ("mnist", "fashion_mnist") else 32)
  from jaxdiff.errors import one_line_errors

  with one_line_errors():
    result = run(dataset=args.dataset, data_dir=data_dir, batch_size=args.batch_size,
                 num_workers=args.num_workers, num_threads=args.num_threads, resolution=resolution,
                 num_channels=args.num_channels, batches=args.batches, warmup=args.warmup,
                 random_flip=not args.no_flip, uniform_dequantization=args.dequantize,
                 to_device=args.to_device)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
