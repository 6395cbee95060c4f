"""The one module that knows about devices, meshes, shardings and processes.

* `create_mesh({"data": -1, "fsdp": 1})` builds a `jax.sharding.Mesh` over all devices of
  all processes; `-1` means "all remaining devices".
* Batches are sharded over every data-like axis (`data` and `fsdp` together); parameters,
  EMA and optimizer state are replicated (data parallel) or, where the mesh has an `fsdp`
  axis of size > 1, sharded over it along their largest divisible dimension (FSDP); XLA
  inserts the all-gathers / reduce-scatters.
* `global_batch(local_batch, mesh)` turns each host's numpy batch into one global `jax.Array`.
* `initialize_distributed(...)` wraps `jax.distributed.initialize` for multi-host runs.

Nothing else in jaxdiff asks how many devices or processes exist.
"""

from __future__ import annotations

import math
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


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over all data-like axes; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, name: str = "config.training.batch_size") -> None:
  n = num_data_shards(mesh)
  if global_batch % n:
    m = (global_batch // n + 1) * n
    raise ConfigError(f"{name}={global_batch} is not divisible by the {n} devices of the mesh's data "
                      f"axes {dict(mesh.shape)}; use a multiple of {n} (e.g. {name}={m}).")
  if global_batch % jax.process_count():
    raise ConfigError(f"{name}={global_batch} is not divisible by the {jax.process_count()} processes.")


def local_batch_size(global_batch: int) -> int:
  return global_batch // jax.process_count()


def process_shard() -> tuple[int, int]:
  """(this process's index, the number of processes): which slice of the data to read."""
  return jax.process_index(), jax.process_count()


def is_main_process() -> bool:
  return jax.process_index() == 0


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


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None,
                           initialization_timeout: int = 300) -> None:
  """Starts `jax.distributed` (a no-op for a single process with no arguments).

  On Cloud TPU and under SLURM / Open MPI, JAX finds the coordinator itself: pass nothing
  and set the environment (`JAX_COORDINATOR_ADDRESS` etc.) or run under `srun` / `mpirun`.
  On other GPU clusters pass all three of address, count and id.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ConfigError(f"multi-host needs all of --coordinator_address, --num_processes and --process_id "
                      f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}), or none of them "
                      f"on Cloud TPU / SLURM / Open MPI.")
  kwargs = dict(initialization_timeout=initialization_timeout)
  if coordinator_address is not None:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  jax.distributed.initialize(**kwargs)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host sharded) array as numpy, on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
