"""Image folders: PNG/JPEG files under `config.data.data_dir`, optionally one sub-folder per class.

Layout (recursive; hidden files and folders are ignored):

    data_dir/cat/0001.png              with use_labels=True, labels are the first-level
    data_dir/cat/more/0002.jpg         sub-folders in sorted order (cat=0, dog=1)
    data_dir/dog/0003.jpeg
    data_dir/0004.png                  allowed only with use_labels=False

Every host lists the folder the same way (sorted paths), keeps only its own slice
`files[shard_index::shard_count]`, and checks the first bytes of each of its files: a file
whose header is not PNG or JPEG is dropped before training starts and counted in the log.
A file that passes the header check but fails to decode (truncated, damaged) is dropped
when it is read (`DecodeImage` marks it, `HasImage` filters it out) and logged once with a
running count; the epoch goes on. An empty folder is a DataError.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
from typing import Any, Sequence

import grain
import numpy as np

from jaxdiff.data import imageops
from jaxdiff.errors import DataError

log = logging.getLogger("jaxdiff")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """All image files under `root` (sorted relative paths) and their class folders."""

  root: str
  files: tuple[str, ...]
  class_names: tuple[str, ...]
  num_other_files: int  # files without an image extension (ignored)

  def class_of(self, rel: str) -> str | None:
    parts = rel.split(os.sep)
    return parts[0] if len(parts) > 1 else None

  def labels(self) -> np.ndarray:
    """int32 label per file (class sub-folders sorted by name); DataError if some have none."""
    index = {c: i for i, c in enumerate(self.class_names)}
    loose = [f for f in self.files if self.class_of(f) is None]
    if not self.class_names or loose:
      example = f" (e.g. {loose[0]!r})" if loose else ""
      raise DataError(
          f"config.data.use_labels=True needs one sub-folder per class under config.data.data_dir="
          f"{self.root!r}, but {len(loose)} of {len(self.files)} images lie directly in it{example}; "
          f"move them into class sub-folders or set --config.data.use_labels=False.")
    return np.asarray([index[self.class_of(f)] for f in self.files], np.int32)


def list_images(root: str) -> FolderListing:
  """Walks `root` (following links) for files with an image extension; DataError if none."""
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  if not os.path.isdir(root):
    raise DataError(f"config.data.data_dir={root!r} is not a directory; config.data.dataset='folder' "
                    f"reads {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images from a folder, so point "
                    f"--config.data.data_dir at one.")
  files, other = [], 0
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.startswith("."):
        continue
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        files.append(name if rel_dir == "." else os.path.join(rel_dir, name))
      else:
        other += 1
  if not files:
    raise DataError(f"config.data.data_dir={root!r} holds no images: no files ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)} (case-insensitive) in it or its sub-folders "
                    f"({other} other files); point it at a folder of PNG/JPEG images.")
  files.sort()
  listing = FolderListing(root, tuple(files), (), other)
  classes = sorted({c for c in (listing.class_of(f) for f in files) if c is not None})
  return dataclasses.replace(listing, class_names=tuple(classes))


def has_image_header(path: str) -> bool:
  """True if the file starts like a PNG or a JPEG (reads 8 bytes; False if unreadable)."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return False
  return head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC)


def _channels_of_mode(mode: str) -> int:
  return 1 if mode in _GRAY_MODES else 3


class FolderSource:
  """Random access to this host's image files as `{"path": str, "label": int}` records."""

  def __init__(self, root: str, files: Sequence[str], labels: np.ndarray | None):
    self.root, self.files = root, tuple(files)
    self.labels = None if labels is None else np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    rec = {"path": os.path.join(self.root, self.files[i])}
    if self.labels is not None:
      rec["label"] = self.labels[i]
    return rec

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, {len(self)} files)"


def open_folder(root: str, *, num_channels: int, use_labels: bool, shard_index: int = 0,
                shard_count: int = 1, check_threads: int = 8) -> FolderSource:
  """This host's slice of the image folder, with files whose header is not PNG/JPEG dropped.

  Raises DataError for a missing or empty folder, for `use_labels` without class
  sub-folders, and when the images' channel count (sampled from the first readable ones)
  differs from `num_channels`.
  """
  listing = list_images(root)
  labels = listing.labels() if use_labels else None
  idx = np.arange(len(listing.files))[shard_index::shard_count]
  paths = [os.path.join(listing.root, listing.files[i]) for i in idx]
  with concurrent.futures.ThreadPoolExecutor(max(1, check_threads)) as pool:
    ok = np.fromiter(pool.map(has_image_header, paths), bool, len(paths))
  bad = [listing.files[i] for i in idx[~ok]]
  idx = idx[ok]
  if not len(idx):
    raise DataError(f"config.data.data_dir={listing.root!r}: none of this host's {len(paths)} image files "
                    f"(shard {shard_index} of {shard_count}) is a readable PNG/JPEG; check the folder.")
  other = (f"; {listing.num_other_files} file(s) without a {'/'.join(IMAGE_EXTENSIONS)} extension ignored"
           if listing.num_other_files else "")
  classes = f" in {len(listing.class_names)} classes" if use_labels else ""
  example = f" (not a PNG/JPEG header, e.g. {bad[0]})" if bad else ""
  log.info("Image folder %s: %d images%s; shard %d of %d (this host): %d images, %d corrupt file(s) "
           "skipped%s%s.", listing.root, len(listing.files), classes, shard_index, shard_count, len(idx),
           len(bad), example, other)
  _check_channels(listing.root, [listing.files[i] for i in idx[:8]], num_channels)
  return FolderSource(listing.root, [listing.files[i] for i in idx],
                      None if labels is None else labels[idx])


def _check_channels(root: str, sample: Sequence[str], num_channels: int) -> None:
  """DataError if every sampled image has the other channel count (grey vs colour)."""
  from PIL import Image

  seen = []
  for rel in sample:
    try:
      with Image.open(os.path.join(root, rel)) as im:  # reads the header only
        seen.append((rel, im.mode))
    except Exception:  # undecodable: DecodeImage drops it later
      continue
  if seen and all(_channels_of_mode(m) != num_channels for _, m in seen):
    rel, mode = seen[0]
    c = _channels_of_mode(mode)
    raise DataError(f"the images in config.data.data_dir={root!r} have {c} channel{'s' if c > 1 else ''} "
                    f"(e.g. {rel!r}, PIL mode {mode!r}) but config.data.num_channels={num_channels}; "
                    f"set --config.data.num_channels={c}.")


class DecodeImage(grain.transforms.Map):
  """`{"path", ["label"]}` -> `{"image": uint8 [R, R, C] | None, ["label"]}`.

  Decodes with PIL, converts to `num_channels` (grey 'L' or 'RGB'; alpha is dropped),
  centre-crops to a square (`crop_size`, 0: the shorter side) and resizes to
  `resolution`. JPEGs are decoded at a reduced DCT scale when that still leaves at least
  `resolution` pixels. A file that cannot be decoded gives `image=None` (dropped by
  `HasImage`) and is logged once, with the running count in `failures`.
  """

  def __init__(self, *, resolution: int, num_channels: int, crop_size: int = 0):
    self.resolution, self.num_channels, self.crop_size = resolution, num_channels, crop_size
    self._lock = threading.Lock()
    self._failed: set[str] = set()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def failures(self) -> int:
    """Distinct files that failed to decode in this process so far."""
    with self._lock:
      return len(self._failed)

  def _load(self, path: str) -> np.ndarray:
    from PIL import Image

    mode = "L" if self.num_channels == 1 else "RGB"
    with Image.open(path) as im:
      if im.format == "JPEG" and self.crop_size <= 0:
        im.draft(mode, (self.resolution, self.resolution))
      im = im.convert(mode)  # decodes the whole file: truncated data raises here
    im = imageops.crop_resize_pil(im, self.resolution, self.crop_size)
    arr = np.asarray(im, np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k != "path"}
    path = record["path"]
    try:
      out["image"] = self._load(path)
    except Exception as e:  # any decoder error: skip this file, never stop the epoch
      with self._lock:
        first = path not in self._failed
        self._failed.add(path)
        n = len(self._failed)
      if first:
        log.warning("Skipping unreadable image %s (%s: %s); %d unreadable image(s) skipped so far.",
                    path, type(e).__name__, str(e)[:120], n)
      out["image"] = None
    return out


class HasImage(grain.transforms.Filter):
  """Keeps records whose image decoded."""

  def filter(self, record: dict[str, Any]) -> bool:
    return record.get("image") is not None


def num_classes(root: str) -> int:
  """Number of class sub-folders holding images under `root` (0 if the folder is unreadable)."""
  try:
    return len(list_images(root).class_names)
  except DataError:
    return 0
