"""The one module that knows about devices, meshes, shardings and processes.

* `create_mesh({"data": -1, "fsdp": 1})` builds a `jax.sharding.Mesh` over all devices of
  all processes; `-1` means "all remaining devices".
* Batches are sharded over every data-like axis (`data` and `fsdp` together); parameters,
  EMA and optimizer state are replicated (data parallel) or, where the mesh has an `fsdp`
  axis of size > 1, sharded over it along their largest divisible dimension (FSDP); XLA
  inserts the all-gathers / reduce-scatters.
* `global_batch(local_batch, mesh)` turns each host's numpy batch into one global `jax.Array`;
  `local_batch_rows(mesh, global_batch)` says which rows of it this host reads.
* `initialize_distributed(...)` wraps `jax.distributed.initialize` for multi-host runs (explicit
  coordinator, or auto-detection on Cloud TPU / SLURM / Open MPI), failing in one line within
  a timeout instead of hanging; `check_same_config(config)` stops processes started with
  different configs.

Nothing else in jaxdiff asks how many devices or processes exist.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.errors import ConfigError

DATA_AXES = ("data", "fsdp")  # axes the batch is split over (in this order)
FSDP_AXIS = "fsdp"


def create_mesh(axes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A mesh with the named axes; one axis may be -1 ("the rest of the devices").

  Axes not named get size 1, so every mesh has both `data` and `fsdp`.
  """
  axes = dict(axes or {"data": -1})
  unknown = set(axes) - set(DATA_AXES)
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes: {', '.join(DATA_AXES)}.")
  for name in DATA_AXES:
    axes.setdefault(name, 1)
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  free = [k for k, v in axes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh={axes}: only one axis may be -1.")
  fixed = math.prod(v for v in axes.values() if v != -1)
  if any(v == 0 or v < -1 for v in axes.values()) or n % fixed:
    raise ConfigError(f"config.mesh={axes} needs a multiple of {fixed} devices, but there are {n}; "
                      f"choose axis sizes whose product divides {n} (or use -1 for one axis).")
  if free:
    axes[free[0]] = n // fixed
  elif fixed != n:
    raise ConfigError(f"config.mesh={axes} uses {fixed} devices, but there are {n}; "
                      f"set one axis to -1 to use them all.")
  shape = tuple(axes[k] for k in DATA_AXES)
  # Auto axes: shardings are propagated by XLA (GSPMD); jax.make_mesh picks a device order
  # that follows the physical topology on TPU/GPU.
  return jax.make_mesh(shape, DATA_AXES, axis_types=(AxisType.Auto,) * len(DATA_AXES),
                       devices=list(devices.flat))


def num_data_shards(mesh: Mesh) -> int:
  """Number of ways the batch is split (product of the data-like axes)."""
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def round_up_batch(batch: int, mesh: Mesh) -> int:
  """`batch` rounded up to a multiple of the data shards (the global batch a padded last batch fills)."""
  n = num_data_shards(mesh)
  return int(math.ceil(batch / n) * n)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over all data-like axes; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(x: Any, mesh: Mesh) -> Any:
  """A value that is the same on every process (a PRNG key too, or a tree of arrays such as
  weights read from a file) as replicated global arrays.

  `jax.device_put` cannot target devices of other processes; this builds the global array
  from each process's own copy.
  """
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    return jax.random.wrap_key_data(replicate(jax.random.key_data(x), mesh), impl=impl)
  return put_host_tree(x, replicated(mesh))


def put_host_tree(tree: Any, shardings: Any) -> Any:
  """Global arrays laid out as `shardings` (a tree like `tree`'s, or one sharding for every leaf)
  from a host copy that every process holds (e.g. weights read from a file): each device takes
  its slice of the host array."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(a, s):
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def check_batch_size(global_batch: int, mesh: Mesh, name: str = "config.training.batch_size",
                     microbatches: int = 1, microbatches_name: str = "config.training.microbatches") -> None:
  """The batch splits evenly over the data shards, the processes and, per device, `microbatches`."""
  n = num_data_shards(mesh)
  if global_batch % n:
    m = (global_batch // n + 1) * n
    raise ConfigError(f"{name}={global_batch} is not divisible by the {n} devices of the mesh's data "
                      f"axes {dict(mesh.shape)}; use a multiple of {n} (e.g. {name}={m}).")
  if global_batch % jax.process_count():
    raise ConfigError(f"{name}={global_batch} is not divisible by the {jax.process_count()} processes.")
  if microbatches < 1:
    raise ConfigError(f"{microbatches_name}={microbatches} must be >= 1.")
  if (global_batch // n) % microbatches:
    raise ConfigError(
        f"{microbatches_name}={microbatches} does not divide the {global_batch // n} examples "
        f"each of the {n} devices gets from {name}={global_batch}; use a multiple of "
        f"{n * microbatches} for {name}, or microbatches dividing {global_batch // n}.")


def local_batch_size(global_batch: int) -> int:
  return global_batch // jax.process_count()


def process_shard() -> tuple[int, int]:
  """(this process's index, the number of processes): which slice of the data to read."""
  return jax.process_index(), jax.process_count()


def local_batch_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold (sorted), int [local_batch].

  `global_batch` puts a host's local batch into exactly these rows, so a host that reads
  these rows of every global batch of one data stream makes the same global batches as a
  single process would (`data.create_dataset(batch_rows=...)`).
  """
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
  rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(global_batch))})
  return np.asarray(rows, np.int64)


def is_main_process() -> bool:
  return jax.process_index() == 0


def device_fingerprint() -> str:
  """The devices a compiled program is tied to: platform and version, each device's kind and
  id, and this process's index among all processes (for `aot`'s cache key)."""
  devices = jax.devices()
  return repr((devices[0].platform, devices[0].client.platform_version, jax.process_index(),
               jax.process_count(), [(d.id, d.device_kind, d.process_index) for d in devices]))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**12) -> P:
  """Shards the largest dimension divisible by `fsdp_size`; small arrays stay replicated."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for a train-state pytree: replicated, or FSDP-sharded when `fsdp` > 1."""
  fsdp_size = mesh.shape[FSDP_AXIS]

  def leaf(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp_size))

  return jax.tree.map(leaf, abstract_state)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's host-local batch into global arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ConfigError(f"--coordinator_address={address!r} must look like host:port "
                      f"(e.g. 10.0.0.2:12345, process 0's host and a free port).")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, process_id: int, num_processes: int, timeout_s: float) -> None:
  """Returns once something accepts TCP connections at `address`; ConfigError after `timeout_s`."""
  host, port = _split_address(address)
  deadline, err = time.monotonic() + timeout_s, None
  while True:
    left = deadline - time.monotonic()
    try:
      socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))).close()
      return
    except OSError as e:
      err = e
    if left <= 0:
      raise ConfigError(
          f"--coordinator_address={address} cannot be reached from process {process_id} of {num_processes}: "
          f"nothing accepted a connection within --distributed_timeout={timeout_s:g}s (last error: {err}); "
          f"start process 0 (--process_id=0) on that host and port, check the address and firewall, "
          f"or raise --distributed_timeout.")
    time.sleep(min(0.2, max(left, 0.0)))


class _Watchdog:
  """Ends the process with a one-line error if `jax.distributed.initialize` outlives `timeout_s`.

  JAX itself aborts the process at its own deadline (a fatal C++ error with a stack
  trace that Python cannot catch); this says why, slightly earlier, in one line.
  """

  def __init__(self, timeout_s: float, message: str):
    self._timer = threading.Timer(timeout_s, self._fire, args=(message,))
    self._timer.daemon = True

  @staticmethod
  def _fire(message: str) -> None:
    print(f"error: ConfigError: {message}", file=sys.stderr, flush=True)
    os._exit(1)

  def __enter__(self):
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()
    return False


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False, local_device_ids=None,
                           timeout_s: float = 300) -> None:
  """Starts `jax.distributed` for a multi-process run; fails in one line within `timeout_s`.

  Args:
    coordinator_address: `host:port` of process 0 (it serves there; the others connect).
    num_processes: the number of processes (usually one per host).
    process_id: this process's index in [0, num_processes).
    auto: let `jax.distributed.initialize()` detect the cluster (Cloud TPU, SLURM, Open MPI);
      the explicit values given replace the detected ones. Without `auto` all three of
      address, count and id are required.
    local_device_ids: the accelerators this process uses (default: all it sees).
    timeout_s: how long to wait for the coordinator and the other processes. A process
      other than 0 that cannot reach the coordinator raises ConfigError; one whose peers
      do not all connect exits with a one-line error (JAX aborts the process there).
  """
  if jax.distributed.is_initialized():
    return
  given = [coordinator_address, num_processes, process_id]
  if not auto and not all(v is not None for v in given):
    raise ConfigError(f"multi-host needs all of --coordinator_address, --num_processes and --process_id "
                      f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); or pass "
                      f"--distributed=auto on Cloud TPU / SLURM / Open MPI.")
  if timeout_s <= 0:
    raise ConfigError(f"--distributed_timeout={timeout_s} must be > 0 seconds.")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
  if coordinator_address is not None:
    _split_address(coordinator_address)
    if process_id not in (None, 0):  # process 0 serves the coordinator; the others wait for it
      _wait_for_coordinator(coordinator_address, process_id, num_processes or 0, timeout_s)
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id, local_device_ids=local_device_ids,
                # JAX's own deadline (a fatal abort) comes after the watchdog's one-line error
                initialization_timeout=int(math.ceil(timeout_s)) + 30)
  who = "this process" if process_id is None else f"process {process_id} of {num_processes}"
  where = coordinator_address or "the auto-detected coordinator"
  message = (f"jax.distributed did not start within --distributed_timeout={timeout_s:g}s on {who} "
             f"(coordinator {where}): not every process connected; start all processes with the same "
             f"--coordinator_address and --num_processes and distinct --process_id, or raise "
             f"--distributed_timeout.")
  try:
    with _Watchdog(timeout_s, message):
      jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError, RuntimeError) as e:
    if auto and coordinator_address is None and "coordinator_address" in str(e):
      raise ConfigError("--distributed=auto found no Cloud TPU, SLURM or Open MPI environment to detect "
                        "the processes from; pass --coordinator_address, --num_processes and "
                        "--process_id instead.") from None
    raise ConfigError(f"jax.distributed.initialize failed on {who}: {' '.join(str(e).split())}") from None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (a collective: all processes must call it)."""
  from jax.experimental import multihost_utils

  lens = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
  n = int(lens.max())
  buf = np.zeros((n,), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lens), n)
  return [bytes(r[:m]) for r, m in zip(rows, lens)]


def main_process_value(value: Any) -> Any:
  """Process 0's `value` (JSON-serialisable) on every process, e.g. a directory listing that hosts
  could see at different moments (a collective with several processes: all must call it)."""
  if jax.process_count() == 1:
    return value
  return json.loads(_allgather_bytes(json.dumps(value).encode())[0])


def check_same_config(config: Any, extra: Mapping[str, Any] | None = None, *, what: str = "config",
                      max_keys: int = 4) -> None:
  """ConfigError, on every process, if the processes were started with different configs.

  Compares a hash of the config's JSON (plus `extra`, e.g. command-line arguments) across
  processes; on a mismatch gathers the configs and names the keys that differ. A no-op
  for one process. Call it on every process at the same point (it is a collective).
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  tree = json.loads(config.to_json_best_effort(sort_keys=True)) if hasattr(config, "to_json_best_effort") \
      else dict(config)
  if extra:
    tree = {**tree, **{f"--{k}": v for k, v in extra.items()}}
  text = json.dumps(tree, sort_keys=True, default=repr).encode()
  digest = np.frombuffer(hashlib.sha256(text).digest()[:16], np.int32)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  if (digests == digests[0]).all():
    return
  trees = [_flatten(json.loads(t)) for t in _allgather_bytes(text)]
  ref = trees[0]
  for pid, other in enumerate(trees[1:], start=1):
    keys = sorted(k for k in set(ref) | set(other) if ref.get(k, "<missing>") != other.get(k, "<missing>"))
    if keys:
      shown = ", ".join(f"{k}={other.get(k, '<missing>')!r} (process 0: {ref.get(k, '<missing>')!r})"
                        for k in keys[:max_keys])
      more = f" and {len(keys) - max_keys} more" if len(keys) > max_keys else ""
      bad = [p for p in range(1, len(trees)) if trees[p] != ref]
      raise ConfigError(
          f"the {len(trees)} processes were started with different {what}s: process {pid} has {shown}{more}"
          f"{'' if len(bad) == 1 else f' (processes {bad} differ from process 0)'}; start every process "
          f"with the same --config and --config.* overrides (and the same flags).")
  raise ConfigError(f"the {len(trees)} processes were started with different {what}s; start every process "
                    f"with the same --config and --config.* overrides (and the same flags).")


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host sharded) array as numpy, on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
