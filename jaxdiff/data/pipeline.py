"""Input pipelines on grain: one interface for embedded, TFDS and (later) folder datasets.

`create_dataset(...)` returns a checkpointable grain iterator of host-local batches

    {"x": float32 [local_batch, ...], "label": int32 [local_batch]}   (label if requested)

Each host reads only its own shard of the records (`shard_index::shard_count`), reshuffles
it every epoch from `seed`, and applies per-record random transforms (flip,
dequantization) whose randomness is a function of (seed, record position), so the stream
is deterministic and resumes exactly from `iterator.get_state()`.

TFDS datasets are read with `tfds.data_source` (array_record) and need no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import grain
import numpy as np

from jaxdiff.data import synthetic
from jaxdiff.errors import DataError

EMBEDDED = ("shapes", "gmm2d")
TFDS_IMAGE = ("mnist", "fashion_mnist", "cifar10")
KNOWN = EMBEDDED + TFDS_IMAGE


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the model sees: `shape` of one example (no batch axis) and the number of classes."""

  shape: tuple[int, ...]
  num_classes: int
  is_image: bool


class ArraySource:
  """A random-access source over in-memory arrays (for the embedded datasets)."""

  def __init__(self, x: np.ndarray, label: np.ndarray):
    self._x, self._label = x, label

  def __len__(self) -> int:
    return len(self._x)

  def __getitem__(self, i):
    return {"image": self._x[i], "label": self._label[i]}


def _tfds_source(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # reads array_record; no TensorFlow import

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises several types for a missing or unprepared dataset
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise DataError(
        f"config.data.dataset={name!r} (split {split!r}) is not prepared under "
        f"config.data.data_dir={where!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        f"Prepare it once with `pip install tensorflow tensorflow-datasets && tfds build {name} "
        f"--data_dir={where} --file_format=array_record`, or point --config.data.data_dir at a "
        f"directory holding {name}/<version>/.") from None


def _source(name: str, split: str, data_dir: str | None, resolution: int, num_channels: int,
            num_examples: int):
  if name == "shapes":
    # a different seed per split so 'test' is held out
    x, y = synthetic.shapes(num_examples, resolution, num_channels, seed=(0 if split == "train" else 1))
    return ArraySource(x, y), 3
  if name == "gmm2d":
    x, y = synthetic.gmm2d().sample(num_examples, seed=(0 if split == "train" else 1))
    return ArraySource(x, y), 8
  if name in TFDS_IMAGE:
    return _tfds_source(name, split, data_dir), 10
  raise DataError(f"config.data.dataset={name!r} is not known; known datasets: {', '.join(KNOWN)}.")


def spec(name: str, resolution: int, num_channels: int) -> DataSpec:
  if name == "gmm2d":
    return DataSpec((2,), 8, False)
  if name == "shapes":
    return DataSpec((resolution, resolution, num_channels), 3, True)
  if name in TFDS_IMAGE:
    return DataSpec((resolution, resolution, num_channels), 10, True)
  raise DataError(f"config.data.dataset={name!r} is not known; known datasets: {', '.join(KNOWN)}.")


def _resize_image(img: np.ndarray, resolution: int) -> np.ndarray:
  """Centre-crops to a square and resizes (bicubic, antialiased) to `resolution`."""
  h, w = img.shape[:2]
  if h == w == resolution:
    return img
  from PIL import Image

  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  squeeze = img.ndim == 3 and img.shape[-1] == 1
  pil = Image.fromarray(img[..., 0] if squeeze else img)
  pil = pil.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
  out = np.asarray(pil)
  return out[..., None] if squeeze else out


class Preprocess(grain.transforms.RandomMap):
  """uint8 record -> {"x": float32, "label": int32}: resize, flip, dequantize, scale."""

  def __init__(self, *, is_image: bool, resolution: int, num_channels: int, centered: bool,
               random_flip: bool, uniform_dequantization: bool, use_labels: bool, name: str):
    self.is_image, self.resolution, self.num_channels = is_image, resolution, num_channels
    self.centered, self.random_flip = centered, random_flip
    self.uniform_dequantization, self.use_labels, self.name = uniform_dequantization, use_labels, name

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    if self.use_labels:
      out["label"] = np.int32(record["label"])
    if not self.is_image:
      out["x"] = np.asarray(record["image"], np.float32)
      return out
    img = np.asarray(record["image"])
    if img.ndim == 2:
      img = img[..., None]
    if img.shape[-1] != self.num_channels:
      raise DataError(f"dataset {self.name!r} has {img.shape[-1]}-channel images but "
                      f"config.data.num_channels={self.num_channels}; set it to {img.shape[-1]}.")
    img = _resize_image(img, self.resolution)
    if self.random_flip and rng.random() < 0.5:
      img = img[:, ::-1]
    x = img.astype(np.float32)
    if self.uniform_dequantization:
      x = (x + rng.random(x.shape, dtype=np.float32)) / 256.0
    else:
      x = x / 255.0
    out["x"] = 2.0 * x - 1.0 if self.centered else x
    return out


def create_dataset(
    *,
    dataset: str,
    split: str = "train",
    batch_size: int,
    resolution: int = 32,
    num_channels: int = 3,
    data_dir: str | None = None,
    centered: bool = True,
    random_flip: bool = False,
    uniform_dequantization: bool = False,
    use_labels: bool = False,
    num_examples: int = 20000,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch_buffer_size: int = 4,
    num_workers: int = 0,
) -> grain.DatasetIterator:
  """A checkpointable iterator of host-local batches of `batch_size` examples.

  `batch_size` is the per-host batch (the global batch divided by `shard_count`).
  `num_epochs=None` repeats forever (training); evaluation uses `num_epochs=1`,
  `shuffle=False`, `drop_remainder=False`.
  """
  if dataset not in KNOWN:
    raise DataError(f"config.data.dataset={dataset!r} is not known; known datasets: {', '.join(KNOWN)}.")
  src, _ = _source(dataset, split, data_dir, resolution, num_channels, num_examples)
  ds = grain.MapDataset.source(src)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  is_image = dataset != "gmm2d"
  ds = ds.random_map(Preprocess(is_image=is_image, resolution=resolution, num_channels=num_channels,
                                centered=centered, random_flip=random_flip,
                                uniform_dequantization=uniform_dequantization,
                                use_labels=use_labels, name=dataset), seed=seed)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=prefetch_buffer_size))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def dataset_size(dataset: str, split: str, data_dir: str | None, num_examples: int) -> int:
  if dataset in EMBEDDED:
    return num_examples
  return len(_tfds_source(dataset, split, data_dir))


__all__: Sequence[str] = ("create_dataset", "spec", "DataSpec", "KNOWN", "dataset_size")
