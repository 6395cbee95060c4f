"""What jaxdiff knows about each dataset, without reading any of them.

`lookup(name)` returns a `DatasetInfo` for a `config.data.dataset` value: where the data
comes from (`embedded`, `tfds` or `folder`), the native image shape, the number of classes
(0: no labels) and the splits. `configs.validate` checks a config against it before any
file is opened, so nothing here imports tensorflow_datasets or grain.
"""

from __future__ import annotations

import dataclasses

from jaxdiff.errors import DataError

# TFDS's LSUN builder configs (scene and object categories).
LSUN_CATEGORIES = (
    "classroom", "bedroom", "bridge", "church_outdoor", "conference_room", "dining_room",
    "kitchen", "living_room", "restaurant", "tower", "airplane", "bicycle", "bird", "boat",
    "bottle", "bus", "car", "cat", "chair", "cow", "dining_table", "dog", "horse", "motorbike",
    "person", "potted_plant", "sheep", "sofa", "train", "tv-monitor")

FOLDER = "folder"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about one `config.data.dataset`.

  Attributes:
    name: the `config.data.dataset` value.
    kind: "embedded" (drawn by jaxdiff), "tfds" (array_record under a TFDS data_dir) or
      "folder" (PNG/JPEG files under `config.data.data_dir`).
    tfds_name: the TFDS name (`name/config` for builder configs); "" unless kind is tfds.
    shape: native (height, width, channels) of an image; None for a size that varies
      between images (or is not known before the folder is read); `()` for non-images.
    num_classes: number of labels; 0 for a dataset without labels; -1 when it depends on
      the data (class sub-folders of an image folder).
    splits: split names; () when any split name reads the whole dataset (folders).
    is_image: False for vector data (gmm2d).
    image_key: the TFDS feature holding the image.
    label_key: the TFDS feature holding the label ("" if none).
  """

  name: str
  kind: str
  tfds_name: str = ""
  shape: tuple[int | None, int | None, int | None] | tuple[()] | None = None
  num_classes: int = 0
  splits: tuple[str, ...] = ("train", "test")
  is_image: bool = True
  image_key: str = "image"
  label_key: str = ""

  @property
  def has_labels(self) -> bool:
    return self.num_classes != 0

  @property
  def channels(self) -> int | None:
    """Native channel count, or None where it is not fixed."""
    return self.shape[2] if self.shape else None

  @property
  def min_side(self) -> int | None:
    """The shorter native side, or None where the size varies."""
    if not self.shape or self.shape[0] is None or self.shape[1] is None:
      return None
    return min(self.shape[0], self.shape[1])


def _tfds(name: str, shape, num_classes: int, splits=("train", "test"), tfds_name: str = "") -> DatasetInfo:
  return DatasetInfo(name=name, kind="tfds", tfds_name=tfds_name or name, shape=shape,
                     num_classes=num_classes, splits=splits,
                     label_key="label" if num_classes else "")


_TABLE: dict[str, DatasetInfo] = {
    "shapes": DatasetInfo("shapes", "embedded", shape=(None, None, None), num_classes=3,
                          splits=("train", "test")),
    "gmm2d": DatasetInfo("gmm2d", "embedded", shape=(), num_classes=8, splits=("train", "test"),
                         is_image=False),
    "mnist": _tfds("mnist", (28, 28, 1), 10),
    "fashion_mnist": _tfds("fashion_mnist", (28, 28, 1), 10),
    "cifar10": _tfds("cifar10", (32, 32, 3), 10),
    "celeb_a": _tfds("celeb_a", (218, 178, 3), 0, ("train", "validation", "test")),
    "downsampled_imagenet/32x32": _tfds("downsampled_imagenet/32x32", (32, 32, 3), 0,
                                        ("train", "validation")),
    "downsampled_imagenet/64x64": _tfds("downsampled_imagenet/64x64", (64, 64, 3), 0,
                                        ("train", "validation")),
    "imagenet_resized/8x8": _tfds("imagenet_resized/8x8", (8, 8, 3), 1000, ("train", "validation")),
    "imagenet_resized/16x16": _tfds("imagenet_resized/16x16", (16, 16, 3), 1000, ("train", "validation")),
    "imagenet_resized/32x32": _tfds("imagenet_resized/32x32", (32, 32, 3), 1000, ("train", "validation")),
    "imagenet_resized/64x64": _tfds("imagenet_resized/64x64", (64, 64, 3), 1000, ("train", "validation")),
    FOLDER: DatasetInfo(FOLDER, "folder", shape=None, num_classes=-1, splits=()),
}

# What error messages list; "lsun/<category>" stands for the 30 LSUN categories.
KNOWN: tuple[str, ...] = tuple(_TABLE) + ("lsun/<category>",)
EMBEDDED: tuple[str, ...] = tuple(k for k, v in _TABLE.items() if v.kind == "embedded")
TFDS: tuple[str, ...] = tuple(k for k, v in _TABLE.items() if v.kind == "tfds")  # plus lsun/<category>


def lookup(name: str) -> DatasetInfo:
  """The `DatasetInfo` of `config.data.dataset=name`; DataError listing the known names."""
  if name in _TABLE:
    return _TABLE[name]
  if isinstance(name, str) and name.startswith("lsun/"):
    category = name[len("lsun/"):]
    if category not in LSUN_CATEGORIES:
      raise DataError(f"config.data.dataset={name!r}: LSUN has no category {category!r}; "
                      f"use one of lsun/{', lsun/'.join(LSUN_CATEGORIES)}.")
    # Variable-size JPEGs (shorter side 256), no labels, TFDS splits train/validation.
    return DatasetInfo(name, "tfds", tfds_name=name, shape=(None, None, 3), num_classes=0,
                       splits=("train", "validation"))
  raise DataError(f"config.data.dataset={name!r} is not known; known datasets: {', '.join(KNOWN)}.")


def base_split(split: str) -> str:
  """'train[:90%]' -> 'train' (TFDS slicing syntax)."""
  return split.split("[", 1)[0].strip()
