"""Input pipelines on grain: one interface for embedded, TFDS and image-folder datasets.

`create_dataset(...)` returns a checkpointable grain iterator of host-local batches

    {"x": float32 [local_batch, ...], "label": int32 [local_batch]}   (label if requested)

Hosts read disjoint parts of the records, in one of two ways:

* training (`batch_rows` given): one stream of global batches, the same for any number of
  hosts: all records shuffled every epoch from `seed`, per-record randomness a function of
  (seed, global position), and each host reads only the rows of every global batch that
  its devices hold (`sharding.local_batch_rows`), so 2 hosts train on exactly the batches
  of 1 host;
* evaluation (`batch_rows=None`): host `shard_index` reads records
  `shard_index::shard_count`, shuffled on its own (every record exactly once).

Either way the stream is deterministic and resumes exactly from `iterator.get_state()`.
`prefetch.prefetch_to_device` turns it into global sharded `jax.Array`s, a few batches
ahead, keeping that exact resume.

* embedded (`shapes`, `gmm2d`): drawn in memory by `synthetic`;
* TFDS (`mnist`, `cifar10`, `celeb_a`, `lsun/<category>`, ...): array_record files read by
  `tfds_sources` with no TensorFlow;
* `folder`: PNG/JPEG files under `data_dir`, optionally one class per sub-folder, read by
  `folder`, skipping (and counting) corrupt files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from jaxdiff.data import catalog
from jaxdiff.data import folder as folder_lib
from jaxdiff.data import imageops
from jaxdiff.data import synthetic
from jaxdiff.data import tfds_sources
from jaxdiff.errors import DataError

KNOWN = catalog.KNOWN
EMBEDDED = catalog.EMBEDDED
TFDS_IMAGE = catalog.TFDS


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


def spec(name: str, resolution: int, num_channels: int, *, data_dir: str | None = None,
         use_labels: bool = False) -> DataSpec:
  """The shape of one example and the number of classes for `config.data.dataset=name`.

  For an image folder the class count needs the folder (`data_dir`) and is only computed
  with `use_labels`; it is 0 otherwise.
  """
  info = catalog.lookup(name)
  if not info.is_image:
    return DataSpec((2,), info.num_classes, False)
  n = info.num_classes
  if info.kind == "folder":
    n = folder_lib.num_classes(data_dir) if (data_dir and use_labels) else 0
  return DataSpec((resolution, resolution, num_channels), n, True)


def _check_request(info: catalog.DatasetInfo, *, num_channels: int, use_labels: bool,
                   batch_size: int) -> None:
  if batch_size < 1:
    raise DataError(f"batch_size={batch_size} must be >= 1 (the per-host batch).")
  if use_labels and not info.has_labels:
    raise DataError(f"config.data.use_labels=True but dataset {info.name!r} has no labels; "
                    f"set --config.data.use_labels=False.")
  if info.is_image and num_channels not in (1, 3):
    raise DataError(f"config.data.num_channels={num_channels} is not supported; images have 1 (grey) "
                    f"or 3 (RGB) channels.")
  if info.channels is not None and info.channels != num_channels:
    raise DataError(f"dataset {info.name!r} has {info.channels}-channel images but "
                    f"config.data.num_channels={num_channels}; "
                    f"set --config.data.num_channels={info.channels}.")


def _source(info: catalog.DatasetInfo, split: str, data_dir: str | None, resolution: int,
            num_channels: int, num_examples: int):
  if info.name == "shapes":
    # a different seed per split so 'test' is held out
    x, y = synthetic.shapes(num_examples, resolution, num_channels, seed=(0 if split == "train" else 1))
    return ArraySource(x, y)
  if info.name == "gmm2d":
    x, y = synthetic.gmm2d().sample(num_examples, seed=(0 if split == "train" else 1))
    return ArraySource(x, y)
  return tfds_sources.open_source(info.name, split, data_dir)


class BatchRows(grain.MapDataset):
  """This host's rows of every global batch: record `b * global_batch + rows[r]` for local `b * L + r`.

  A last partial global batch (finite datasets) keeps the rows that exist, so the hosts
  together still read every record once.
  """

  def __init__(self, parent: grain.MapDataset, *, rows: Sequence[int], global_batch: int):
    super().__init__(parent)
    self._rows, self._global = tuple(int(r) for r in rows), int(global_batch)
    full, tail = divmod(len(parent), self._global)
    self._len = full * len(self._rows) + sum(r < tail for r in self._rows)

  def __len__(self) -> int:
    return self._len

  def _parent_index(self, index: int) -> int:
    b, r = divmod(index, len(self._rows))
    return b * self._global + self._rows[r]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"BatchRows(rows={len(self._rows)} of {self._global})"


def check_rows(batch_rows: Sequence[int], batch_size: int, shard_count: int) -> list[int]:
  rows = sorted(int(r) for r in batch_rows)
  global_batch = batch_size * shard_count
  if len(rows) != batch_size or len(set(rows)) != batch_size or not all(0 <= r < global_batch for r in rows):
    raise DataError(f"batch_rows={rows[:8]}{'...' if len(rows) > 8 else ''} must be {batch_size} distinct rows "
                    f"(batch_size) in [0, {global_batch}) (batch_size * shard_count); "
                    f"use sharding.local_batch_rows(mesh, global_batch).")
  return rows


def _derived_seed(seed: int, shard_index: int) -> int:
  """A 32-bit seed for per-record randomness, different on every host."""
  return int(np.random.SeedSequence([int(seed) % 2**32, int(shard_index), 0x6A64]).generate_state(1)[0])


class Preprocess(grain.transforms.RandomMap):
  """uint8 record -> {"x": float32, "label": int32}: crop/resize, flip, dequantize, scale."""

  def __init__(self, *, is_image: bool, resolution: int, num_channels: int, centered: bool,
               random_flip: bool, uniform_dequantization: bool, use_labels: bool, name: str,
               crop_size: int = 0):
    self.is_image, self.resolution, self.num_channels = is_image, resolution, num_channels
    self.centered, self.random_flip, self.crop_size = centered, random_flip, crop_size
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
    if img.shape[0] != self.resolution or img.shape[1] != self.resolution or self.crop_size:
      img = imageops.crop_resize_array(img, self.resolution, self.crop_size)
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
    crop_size: int = 0,
    num_examples: int = 20000,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    batch_rows: Sequence[int] | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch_buffer_size: int = 4,
    num_workers: int = 0,
) -> grain.DatasetIterator:
  """A checkpointable iterator of host-local batches of `batch_size` examples.

  Args:
    dataset: a name from `KNOWN` (`catalog.lookup`), e.g. "mnist", "lsun/bedroom", "folder".
    split: TFDS split (slicing allowed: "train[:90%]"); ignored by folders.
    batch_size: the per-host batch (the global batch divided by `shard_count`).
    resolution: images are centre-cropped to a square and resized to this side.
    num_channels: 1 or 3; must match a TFDS dataset's images (folders are converted).
    data_dir: the TFDS data_dir ('' / None: $TFDS_DATA_DIR or ~/tensorflow_datasets), or
      the image folder for `dataset="folder"`.
    centered: scale to [-1, 1] (else [0, 1]).
    random_flip: random horizontal flips.
    uniform_dequantization: `(pixel + U[0, 1)) / 256` instead of `pixel / 255`.
    use_labels: yield "label" (DataError for a dataset without labels).
    crop_size: side of the centred square cut before resizing (0: the shorter side).
    num_examples: size of the embedded datasets.
    seed: shuffling and per-record randomness.
    shard_index: this host's slice (`jax.process_index()`).
    shard_count: number of slices (`jax.process_count()`).
    batch_rows: the rows of every global batch (`batch_size * shard_count` records) this
      host reads, e.g. `sharding.local_batch_rows(mesh, global_batch)`. Given, the stream of
      global batches does not depend on the number of hosts (training); None: host
      `shard_index` reads records `shard_index::shard_count` (evaluation).
    num_epochs: None repeats forever (training); evaluation uses 1 with `shuffle=False`
      and `drop_remainder=False`.
    shuffle: reshuffle this host's slice every epoch.
    drop_remainder: drop a last partial batch.
    num_threads: grain reader threads (decoding, resizing) in each process.
    prefetch_buffer_size: batches read ahead by those threads.
    num_workers: grain worker processes (0: none, all in this process).

  Returns:
    A `grain.DatasetIterator` with `get_state` / `set_state` (for the non-folder sources a
    `RecordCountState`: its state counts records whatever the layout).
  """
  info = catalog.lookup(dataset)
  _check_request(info, num_channels=num_channels, use_labels=use_labels, batch_size=batch_size)
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  rows = None if batch_rows is None else check_rows(batch_rows, batch_size, shard_count)
  # With batch_rows every host sees all records (and slices after the random transforms).
  part, parts = (0, 1) if rows is not None else (shard_index, shard_count)
  if info.kind == "folder":
    if not data_dir:
      raise DataError("config.data.dataset='folder' needs the image folder: set "
                      "--config.data.data_dir=/path/to/images.")
    src = folder_lib.open_folder(data_dir, num_channels=num_channels, use_labels=use_labels,
                                 shard_index=part, shard_count=parts)
    ds = grain.MapDataset.source(src)  # already this host's slice
  else:
    ds = grain.MapDataset.source(_source(info, split, data_dir, resolution, num_channels, num_examples))
    if parts > 1:
      ds = ds[part::parts]
  if len(ds) == 0:
    raise DataError(f"dataset {dataset!r} split {split!r} has no records for shard {shard_index} of "
                    f"{shard_count}; use a larger split or fewer hosts.")
  if drop_remainder and num_epochs == 1 and len(ds) < batch_size:
    raise DataError(f"dataset {dataset!r} split {split!r} has {len(ds)} records on this host, fewer than "
                    f"batch_size={batch_size}, so one epoch with drop_remainder gives no batch.")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if info.kind == "folder":
    ds = ds.map(folder_lib.DecodeImage(resolution=resolution, num_channels=num_channels,
                                       crop_size=crop_size))
    ds = ds.filter(folder_lib.HasImage())
  ds = ds.random_map(Preprocess(is_image=info.is_image, resolution=resolution, num_channels=num_channels,
                                centered=centered, random_flip=random_flip,
                                uniform_dequantization=uniform_dequantization,
                                use_labels=use_labels, name=dataset,
                                # folder images were cropped and resized when decoded
                                crop_size=0 if info.kind == "folder" else crop_size),
                     seed=_derived_seed(seed, part))
  if rows is not None and shard_count > 1:
    ds = BatchRows(ds, rows=rows, global_batch=batch_size * shard_count)
    if len(ds) == 0:
      raise DataError(f"dataset {dataset!r} split {split!r} has no records for rows {rows[0]}.. of the "
                      f"global batch of {batch_size * shard_count}; use a larger split or fewer hosts.")
  buffer = max(1, prefetch_buffer_size)
  if info.kind == "folder":
    # Records are read and decoded in `num_threads` threads, `prefetch_buffer_size` batches
    # ahead, then batched, so that decoding failures (None) are skipped before batching.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer * batch_size))
    return iter(_in_workers(it_ds.batch(batch_size, drop_remainder=drop_remainder), num_workers))
  return batched_iterator(ds, batch_size=batch_size, drop_remainder=drop_remainder, num_threads=num_threads,
                          prefetch_buffer_size=buffer, num_workers=num_workers)


def batched_iterator(ds: grain.MapDataset, *, batch_size: int, drop_remainder: bool = True, num_threads: int = 4,
                     prefetch_buffer_size: int = 4, num_workers: int = 0) -> grain.DatasetIterator:
  """`ds` (records, in order) in batches of `batch_size`, read by `num_threads` threads
  `prefetch_buffer_size` batches ahead (and `num_workers` processes): a `RecordCountState`
  iterator."""
  # Batched before the reader threads: each thread reads and transforms a whole batch,
  # `prefetch_buffer_size` batches ahead. grain (0.2.18) measures its prefetch depth on
  # every element by walking the ready part of its buffer, so with one element per record
  # and a buffer of 4 batches each record cost ~3 us per buffered record: the 2-D mixture
  # at batch 256 read 900 records/s, batched first 11,000 (MNIST, bound by array_record
  # reads and PNG decoding, is unchanged at ~1,300 on 2 cores).
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
  return RecordCountState(iter(_in_workers(it_ds, num_workers)), batch_size)


def _in_workers(it_ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """`it_ds` run in `num_workers` grain worker processes (0: in this one)."""
  if num_workers <= 0:
    return it_ds
  _ensure_absl_flags_parsed()
  return it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


class RecordCountState(grain.DatasetIterator):
  """A batch-level grain iterator whose state counts records, as a record-level one's does.

  grain's state of a reader over batches is `{'next_index': batches}` (per worker with
  `num_workers`); this wrapper reports and takes `{'next_index': records}` = batches x
  `batch_size`, the state the record-level pipeline of earlier versions saved, so checkpoints
  written before and after batches moved ahead of the reader threads resume at the same batch.
  """

  def __init__(self, iterator: grain.DatasetIterator, batch_size: int):
    super().__init__(iterator)
    self._it, self._batch = iterator, int(batch_size)

  def __next__(self):
    return next(self._it)

  def _scale(self, state, to_records: bool):
    if isinstance(state, dict):
      out = {}
      for k, v in state.items():
        if k == "next_index" and isinstance(v, int):
          if not to_records and v % self._batch:
            raise DataError(f"the data iterator's saved position next_index={v} is not a multiple of "
                            f"batch_size={self._batch}: the checkpoint was written with another per-host "
                            f"batch size; resume with the run's config.training.batch_size and host count.")
          out[k] = v * self._batch if to_records else v // self._batch
        else:
          out[k] = self._scale(v, to_records)
      return out
    if isinstance(state, list):
      return [self._scale(v, to_records) for v in state]
    return state

  def get_state(self) -> dict:
    return self._scale(self._it.get_state(), to_records=True)

  def set_state(self, state: dict) -> None:
    self._it.set_state(self._scale(state, to_records=False))

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if callable(close):
      close()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks,
  scripts with argparse) nothing has parsed them, so take the defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def dataset_kwargs(data_config: Mapping[str, Any]) -> dict[str, Any]:
  """The `create_dataset` arguments that `config.data` sets (add batch_size, seed, shards)."""
  d = data_config
  return dict(dataset=d["dataset"], split=d["split"], resolution=d["resolution"],
              num_channels=d["num_channels"], data_dir=d["data_dir"] or None, centered=d["centered"],
              random_flip=d["random_flip"], uniform_dequantization=d["uniform_dequantization"],
              use_labels=d["use_labels"], crop_size=d["crop_size"], num_examples=d["num_examples"],
              num_threads=d["num_threads"], prefetch_buffer_size=d["prefetch_buffer_size"],
              num_workers=d["num_workers"])


def dataset_size(dataset: str, split: str, data_dir: str | None, num_examples: int) -> int:
  """Number of records of a split (all hosts together); for folders, image files found."""
  info = catalog.lookup(dataset)
  if info.kind == "embedded":
    return num_examples
  if info.kind == "folder":
    if not data_dir:
      raise DataError("config.data.dataset='folder' needs --config.data.data_dir=/path/to/images.")
    return len(folder_lib.list_images(data_dir).files)
  return len(tfds_sources.open_source(dataset, split, data_dir))


__all__: Sequence[str] = ("create_dataset", "dataset_kwargs", "spec", "DataSpec", "KNOWN", "dataset_size",
                          "Preprocess")
