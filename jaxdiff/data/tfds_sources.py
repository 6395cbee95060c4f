"""TFDS datasets read from array_record files, with no TensorFlow.

A TFDS dataset prepared once (`tfds build <name> --data_dir=DIR --file_format=array_record`)
lives in `DIR/<name>/<version>/` as `dataset_info.json`, `features.json` and
`<name>-<split>.array_record-*` shards. `open_source` finds the newest prepared version,
checks that it is array_record, and opens it with `tfds.builder_from_directory(...)
.as_data_source(split)`: random access, decoding with PIL, no TensorFlow import and no
dataset-builder code (so LSUN, CelebA, ImageNet builders need none of their extra
dependencies at training time).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from jaxdiff.data import catalog
from jaxdiff.errors import DataError

_DEFAULT_DIR = "~/tensorflow_datasets"


def resolve_data_dir(data_dir: str | None) -> str:
  """`config.data.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.

  Local paths are made absolute; URIs (gs://...) are kept as they are.
  """
  d = os.fspath(data_dir or os.environ.get("TFDS_DATA_DIR") or _DEFAULT_DIR)
  if "://" in d:
    return d.rstrip("/")
  return os.path.abspath(os.path.expanduser(d))


def prepare_hint(tfds_name: str, data_dir: str) -> str:
  return (f"prepare it once on a machine with internet: `pip install 'jaxdiff[prepare]' && "
          f"tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record`, or point "
          f"--config.data.data_dir at the directory that holds {tfds_name}/<version>/")


def _version_key(v: str) -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in v.split("."))
  except ValueError:
    return (-1,)


def find_prepared(tfds_name: str, data_dir: str | None) -> str:
  """The newest `DIR/<tfds_name>/<version>` holding a dataset_info.json; DataError if none.

  Paths go through `etils.epath`, so a gs:// data_dir works where its file system does.
  """
  from etils import epath

  root = resolve_data_dir(data_dir)
  if not epath.Path(root).is_dir():
    raise DataError(f"config.data.data_dir={root!r} does not exist, so dataset {tfds_name!r} cannot be "
                    f"read; {prepare_hint(tfds_name, root)}.")
  ds_dir = epath.Path(root) / tfds_name
  versions = []
  if ds_dir.is_dir():
    versions = [v.name for v in ds_dir.iterdir() if (v / "dataset_info.json").exists()]
  if not versions:
    raise DataError(f"dataset {tfds_name!r} is not prepared under config.data.data_dir={root!r} "
                    f"(no {tfds_name}/<version>/dataset_info.json); {prepare_hint(tfds_name, root)}.")
  return os.fspath(ds_dir / max(versions, key=_version_key))


def _file_format(version_dir: str) -> str:
  from etils import epath

  info = json.loads((epath.Path(version_dir) / "dataset_info.json").read_text())
  return str(info.get("fileFormat", "tfrecord")).lower()


class TfdsSource:
  """Random access to one split as `{"image": uint8 [H, W, C], "label": int}` records.

  Only the image (and label, where the dataset has one) are passed on; `__getitems__`
  reads a list of records in one array_record call.
  """

  def __init__(self, source, image_key: str, label_key: str, name: str):
    self._source, self._image_key, self._label_key, self.name = source, image_key, label_key, name

  def __len__(self) -> int:
    return len(self._source)

  def _select(self, rec: dict[str, Any]) -> dict[str, Any]:
    out = {"image": rec[self._image_key]}
    if self._label_key:
      out["label"] = rec[self._label_key]
    return out

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._select(self._source[i])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._select(r) for r in self._source.__getitems__(list(indices))]

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {len(self)} records)"


def open_source(name: str, split: str, data_dir: str | None) -> TfdsSource:
  """Opens split `split` of the catalogued TFDS dataset `name`; DataError saying how to fix."""
  info = catalog.lookup(name)
  if info.kind != "tfds":
    raise DataError(f"config.data.dataset={name!r} is not a TFDS dataset.")
  version_dir = find_prepared(info.tfds_name, data_dir)
  fmt = _file_format(version_dir)
  if fmt != "array_record":
    raise DataError(
        f"dataset {info.tfds_name!r} at {version_dir} is prepared as {fmt}, which has no random access; "
        f"convert it once with `tfds convert_format --dataset_version_dir={version_dir} "
        f"--out_file_format=array_record --out_dir=<new data_dir>/{info.tfds_name}/"
        f"{os.path.basename(version_dir)}` (needs `pip install 'jaxdiff[prepare]'`), or rebuild it with "
        f"`tfds build {info.tfds_name} --file_format=array_record`.")
  import tensorflow_datasets as tfds  # reads array_record with PIL decoding; no TensorFlow

  try:
    builder = tfds.builder_from_directory(version_dir)
  except Exception as e:  # a damaged dataset_info.json / features.json
    raise DataError(f"dataset {info.tfds_name!r} at {version_dir} cannot be opened "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); prepare it again.") from None
  splits = sorted(builder.info.splits.keys())
  if catalog.base_split(split) not in splits:
    raise DataError(f"config.data.split={split!r} does not exist for {info.tfds_name!r} at {version_dir}; "
                    f"its splits are {splits}.")
  try:
    src = builder.as_data_source(split=split)
  except Exception as e:  # bad slicing syntax, missing shard files
    raise DataError(f"cannot read split {split!r} of {info.tfds_name!r} at {version_dir} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the split name "
                    f"(e.g. 'train' or 'train[:90%]') and that its array_record files are all "
                    f"there.") from None
  features = builder.info.features
  if info.image_key not in features:
    raise DataError(f"dataset {info.tfds_name!r} at {version_dir} has no {info.image_key!r} feature "
                    f"(it has {sorted(features.keys())}); it is not the dataset jaxdiff expects.")
  label_key = info.label_key if info.label_key in features else ""
  return TfdsSource(src, info.image_key, label_key, info.tfds_name)
