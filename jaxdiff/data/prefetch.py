"""Prefetch to device: host batches become global sharded `jax.Array`s ahead of the train step.

    it = prefetch_to_device(create_dataset(...), mesh, size=2)
    batch = next(it)           # {"x": jax.Array sharded over the mesh's data axes, ...}
    ckpt.save(step, state, data_iterator=it)   # saves the position of the next unconsumed batch

A background thread pulls host-local batches from the grain iterator, assembles them into
global arrays with `sharding.global_batch` (`jax.make_array_from_process_local_data`, an
asynchronous host-to-device copy) and keeps up to `size` of them queued, so reading,
decoding and the transfer overlap the step running on the accelerator.

Checkpoints stay exact: the producer records the grain iterator's state *before* each
batch it draws, and `get_state()` returns the state recorded for the oldest batch not yet
handed out (batches that were prefetched but not consumed are read again after a
restore). `set_state()` stops the thread, drops the queue and repositions the iterator.
States are JSON bytes, the form grain's orbax `CheckpointHandler` stores for iterators
that are not `grain.DatasetIterator`s; the file it writes is the same JSON as for the
bare grain iterator, so checkpoints restore into either.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import threading
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from jaxdiff import sharding
from jaxdiff.errors import DataError


def _encode(state: Any) -> bytes:
  if isinstance(state, bytes):
    return state
  return json.dumps(state).encode()


def _decode(state: Any) -> Any:
  if isinstance(state, (bytes, bytearray)):
    state = state.decode()
  if isinstance(state, str):
    return json.loads(state)
  return state


class _Producer:
  """The queue shared with the background thread (which holds no reference to the wrapper)."""

  def __init__(self, iterator, to_device: Callable, size: int):
    self.it, self.to_device, self.size = iterator, to_device, size
    self.cond = threading.Condition()
    self.queue: collections.deque = collections.deque()  # (state_before, batch, exception)
    self.inflight_state: Any = None  # state before the batch being read right now
    self.stop = False
    self.thread: threading.Thread | None = None

  def run(self) -> None:
    while True:
      with self.cond:
        while len(self.queue) >= self.size and not self.stop:
          self.cond.wait()
        if self.stop:
          return
        try:
          state = copy.deepcopy(self.it.get_state())
        except BaseException as e:  # a broken iterator: the consumer raises it
          self.queue.append((None, None, e))
          self.cond.notify_all()
          return
        self.inflight_state = state
      try:
        item = (state, self.to_device(next(self.it)), None)
      except BaseException as e:  # StopIteration or a data error: handed to the consumer in order
        item = (state, None, e)
      with self.cond:
        self.inflight_state = None
        self.queue.append(item)
        self.cond.notify_all()
      if item[2] is not None:
        return

  def start(self) -> None:
    with self.cond:
      if self.thread is not None:
        return
      self.stop = False
      self.thread = threading.Thread(target=self.run, name="jaxdiff-prefetch", daemon=True)
      self.thread.start()

  def shutdown(self) -> None:
    """Stops the thread (after the batch it is reading, if any) and empties the queue."""
    with self.cond:
      self.stop = True
      self.cond.notify_all()
      thread = self.thread
    if thread is not None and thread is not threading.current_thread():
      thread.join()
    with self.cond:
      self.thread = None
      self.queue.clear()
      self.inflight_state = None


class DevicePrefetchIterator(Iterator[dict[str, Any]]):
  """Yields device batches `size` ahead of the consumer; checkpointable (see module doc).

  With `size=0` nothing runs in the background: each `next` reads and transfers one batch.
  """

  def __init__(self, iterator, mesh=None, *, size: int = 2,
               to_device: Callable[[Mapping[str, np.ndarray]], Any] | None = None):
    if size < 0:
      raise DataError(f"config.data.prefetch_to_device={size} must be >= 0 (0: no prefetching).")
    if to_device is None:
      if mesh is None:
        raise DataError("prefetch_to_device needs the mesh to shard batches over (or a to_device function).")
      to_device = functools.partial(sharding.global_batch, mesh=mesh)
    self._p = _Producer(iterator, to_device, size)
    self._closed = False

  @property
  def size(self) -> int:
    return self._p.size

  @property
  def buffered(self) -> int:
    """Batches read ahead and not yet consumed (ready on the devices or being transferred)."""
    with self._p.cond:
      return len(self._p.queue)

  @property
  def iterator(self):
    """The wrapped host-batch iterator."""
    return self._p.it

  def __iter__(self) -> DevicePrefetchIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._closed:
      raise ValueError("the prefetching iterator was closed.")
    p = self._p
    if p.size == 0:
      return p.to_device(next(p.it))
    p.start()
    with p.cond:
      while not p.queue:
        p.cond.wait()
      _, batch, err = p.queue[0]
      if err is None:
        p.queue.popleft()
        p.cond.notify_all()
    if err is not None:  # left queued: every later `next` raises it too, get_state points before it
      if isinstance(err, StopIteration):
        raise StopIteration
      raise err
    return batch

  def get_state(self) -> bytes:
    """JSON state of the wrapped iterator positioned at the next batch `next` will return."""
    p = self._p
    with p.cond:
      if p.queue:
        state = p.queue[0][0]
      elif p.inflight_state is not None:
        state = p.inflight_state
      else:
        state = p.it.get_state()
    return _encode(state)

  def set_state(self, state: bytes | str | dict) -> None:
    """Repositions the wrapped iterator; prefetched batches are dropped."""
    self._p.shutdown()
    self._p.it.set_state(_decode(state))

  def start_prefetch(self) -> None:
    """Starts reading ahead now (grain's checkpoint handler calls this after a restore)."""
    if self._p.size and not self._closed:
      self._p.start()

  def close(self) -> None:
    """Stops the thread and closes the wrapped iterator (idempotent)."""
    if self._closed:
      return
    self._closed = True
    self._p.shutdown()
    close = getattr(self._p.it, "close", None)
    if callable(close):
      close()

  def __del__(self):
    try:
      self._p.shutdown()
    except Exception:  # interpreter shutdown
      pass


def prefetch_to_device(iterator, mesh=None, *, size: int = 2,
                       to_device: Callable[[Mapping[str, np.ndarray]], Any] | None = None
                       ) -> DevicePrefetchIterator:
  """Wraps a host-batch iterator into one of global sharded batches, `size` in flight.

  Args:
    iterator: yields host-local numpy batches and has `get_state`/`set_state` (a grain
      `DatasetIterator` from `create_dataset`).
    mesh: the `jax.sharding.Mesh`; batches are split over its data axes.
    size: batches kept ready on the device (0: read and transfer on demand).
    to_device: replaces `sharding.global_batch(local, mesh)` (tests, custom layouts).

  Returns:
    A `DevicePrefetchIterator`; pass it to `Checkpointer.save/restore` as `data_iterator`.
  """
  return DevicePrefetchIterator(iterator, mesh, size=size, to_device=to_device)
