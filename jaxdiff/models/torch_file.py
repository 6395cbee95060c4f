"""torch's checkpoint files (`torch.save`'s zip format and its legacy pickle format) read without
torch: `read_torch_file(path)` gives the saved object with every tensor as a numpy array. Used
by the converters of published weights (`inception`, `lpips`)."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from jaxdiff.errors import InputError

_STORAGE_DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16", "BFloat16": "bfloat16",
                   "Long": "int64", "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8",
                   "Bool": "bool"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # a jax dependency

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _Storage:
  """A storage the pickle names; its bytes are read after the pickle (legacy) or from the zip."""

  def __init__(self, key: str, dtype: np.dtype):
    self.key, self.dtype, self.data = key, dtype, None


class _Tensor:
  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def array(self) -> np.ndarray:
    flat, item = self.storage.data, self.storage.dtype.itemsize
    end = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride)) + 1
    if min(self.size, default=1) > 0 and end > len(flat):
      raise InputError(f"a tensor of shape {self.size} reaches element {end} of a storage of {len(flat)}: "
                       f"the file is truncated or corrupt.")
    if not self.size:
      return np.array(flat[self.offset])
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, [s * item for s in self.stride])
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *args):
  del args  # requires_grad, backward hooks, metadata
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *args):
  del args
  return data


class _StorageType:
  def __init__(self, dtype: str):
    self.dtype = _np_dtype(dtype)


class _Unpickler(pickle.Unpickler):
  """Unpickles a state dict: tensors, OrderedDicts and plain Python values, nothing else."""

  def __init__(self, f, path: str):
    super().__init__(f)
    self.path, self.storages = path, {}

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      import collections

      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage") and name[:-len("Storage")] in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name[:-len("Storage")]])
    raise pickle.UnpicklingError(f"{self.path!r} holds a {module}.{name}; only a state dict (names -> tensors) "
                                 f"can be read without torch: save model.state_dict(), or np.savez it.")

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: the same and the view metadata
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self.path!r}: unknown persistent id {pid!r}.")
    storage_type, key = pid[1], str(pid[2])
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError(f"{self.path!r} uses storage views (torch < 0.4); re-save it with a newer torch.")
    return self.storages.setdefault(key, _Storage(key, storage_type.dtype))


def _materialize(obj):
  if isinstance(obj, _Tensor):
    return obj.array()
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def read_torch_file(path: str | os.PathLike[str]) -> Any:
  """The object a `torch.save` file holds (a state dict), its tensors as numpy arrays, without torch.

  Reads both of torch's formats: the zip archive (torch >= 1.6) and the legacy pickle stream
  (what pytorch-fid's 2019 Inception weights use). Only state dicts: tensors in (nested)
  dicts, lists and plain values; anything else is an InputError.
  """
  path = os.fspath(path)
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
          raise InputError(f"{path!r} is a zip file without a data.pkl: not a torch.save file.")
        prefix = pkl[:-len("data.pkl")]
        with z.open(pkl) as f:
          unpickler = _Unpickler(f, path)
          obj = unpickler.load()
        order = "<" if not z.namelist() or f"{prefix}byteorder" not in z.namelist() else (
            "<" if z.read(f"{prefix}byteorder").decode().strip() == "little" else ">")
        for key, s in unpickler.storages.items():
          s.data = np.frombuffer(z.read(f"{prefix}data/{key}"), s.dtype.newbyteorder(order)).astype(s.dtype)
      return _materialize(obj)
    with open(path, "rb") as f:
      if pickle.load(f) != _LEGACY_MAGIC:
        raise InputError(f"{path!r} is neither a zip archive nor a legacy torch.save file.")
      pickle.load(f)  # protocol version
      info = pickle.load(f)
      if not info.get("little_endian", True):
        raise InputError(f"{path!r} was saved on a big-endian machine; re-save it on a little-endian one.")
      unpickler = _Unpickler(f, path)
      obj = unpickler.load()
      for key in pickle.load(f):
        s = unpickler.storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        raw = f.read(numel * s.dtype.itemsize)
        if len(raw) != numel * s.dtype.itemsize:
          raise InputError(f"{path!r} ends inside a tensor's data: the file is truncated.")
        s.data = np.frombuffer(raw, s.dtype)
    return _materialize(obj)
  except InputError:
    raise
  except Exception as e:  # a truncated, corrupt or foreign file: whatever the unpickler trips on
    raise InputError(f"cannot read {path!r} as a torch.save state dict: {type(e).__name__}: {e}") from None


def read_state_dict(path: str | os.PathLike[str], *, what: str, missing_hint: str) -> dict[str, Any]:
  """A state dict (name -> numpy array) from a torch checkpoint (`read_torch_file`) or an `.npz`.

  `what` names the weights in errors ("FID Inception weights"); `missing_hint` says where to get
  them when `path` is not a file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f"{what} {path!r} are not a file; {missing_hint}")
  if path.endswith(".npz"):
    with np.load(path) as f:
      return dict(f)
  loaded = read_torch_file(path)
  if not isinstance(loaded, dict):
    raise InputError(f"{what} {path!r} hold a {type(loaded).__name__}, not a state dict.")
  return loaded
