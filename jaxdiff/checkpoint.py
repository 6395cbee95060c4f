"""One orbax wrapper: train state and data-iterator position saved together, atomically.

A checkpoint `<dir>/<step>/` holds three items:

* `state`: the train state (params, EMA, optimizer state, step), sharded arrays saved by
  every process;
* `data`: the grain iterator position (so a resumed run sees exactly the batches an
  uninterrupted run would have seen);
* `meta`: JSON with the config it was written under.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
crash mid-save never leaves a partial checkpoint that looks valid; the latest
`max_to_keep` are kept.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff.errors import CheckpointError


def _path_names(path) -> str:
  """A pytree path as 'a/b/0', the same for dict keys, attributes and sequence indices."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def shape_mismatches(saved_meta, abstract, limit: int = 3) -> list[str]:
  """Paths whose saved shape differs from the expected one (or that are missing)."""
  saved = {_path_names(p): tuple(getattr(m, "shape", ()) or ())
           for p, m in jax.tree_util.tree_flatten_with_path(saved_meta)[0]}
  out = []
  for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    k = _path_names(p)
    want = tuple(getattr(a, "shape", ()))
    if k not in saved:
      out.append(f"{k} is missing (expected shape {want})")
    elif saved[k] != want:
      out.append(f"{k} has shape {saved[k]} in the checkpoint but {want} in the model")
    if len(out) >= limit:
      break
  if not out:  # arrays only the checkpoint has, by the state's field (e.g. a teacher this run keeps none of)
    mine = {_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    extra: dict[str, int] = {}
    for k in saved:
      if k not in mine:
        extra[k.split("/")[0]] = extra.get(k.split("/")[0], 0) + 1
    if extra:
      out.append("the checkpoint also holds " + ", ".join(f"{top} ({n} arrays)" for top, n in extra.items())
                 + ", which this config's train state has no place for")
  return out


def _type_handlers():
  """Orbax's array handlers, with replica-parallel saving only for arrays over 1 MiB a slice.

  Replica-parallel saving slices every replicated array once per device; for the many
  small arrays of a train state that costs thousands of tiny dispatches per save (seconds
  on simulated CPU devices) and buys nothing.
  """
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20)),
      (np.ndarray, th.NumpyHandler()),
      (int, th.ScalarHandler()),
      (float, th.ScalarHandler()),
      (np.number, th.ScalarHandler()),
  )


def checkpoint_dir(config, workdir: str) -> str:
  """Where a run's checkpoints live: `config.checkpoint_dir`, or `<workdir>/checkpoints`.

  `config.checkpoint_dir` may be any path orbax writes to, including a cloud bucket
  (`gs://bucket/runs/c10`, through etils/tensorstore), so that every host of a pod can
  save its shards there while metrics and images stay in a local `--workdir` of process 0.
  """
  return str(config.get("checkpoint_dir", "") or "") or os.path.join(workdir, "checkpoints")


class Checkpointer:
  """Saves and restores `(state, data iterator)` under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    directory = os.fspath(directory)
    # gs://... and other URLs go to orbax (etils.epath) as they are; local paths are made absolute.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    import grain

    handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None) -> None:
    import grain

    items = {"state": ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint found under {self.directory}; train first "
                            f"(run_train.py --workdir ...) or pass the right --workdir.")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"checkpoint step={step} does not exist under {self.directory}; "
                            f"available steps: {sorted(steps)}.")
    return step

  def meta(self, step: int | None = None) -> dict:
    step = self._resolve(step)
    try:
      return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception:  # older checkpoints without meta
      return {}

  def restore(self, abstract_state: Any, step: int | None = None, *, data_iterator=None) -> tuple[int, Any]:
    """Restores into the shapes/shardings of `abstract_state` (from `jax.eval_shape`).

    Raises CheckpointError naming the first mismatching arrays when the checkpoint was
    written by a different model configuration.
    """
    import grain

    step = self._resolve(step)
    items_meta = self._mngr.item_metadata(step)
    self._check(step, shape_mismatches(self._saved_tree(items_meta), abstract_state))
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    # An imported checkpoint (config.training.init_from with num_steps=0) has no data position:
    # the data then starts from the beginning.
    if data_iterator is not None and "data" in items_meta.keys():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return step, restored["state"]

  def restore_fields(self, abstract_state: Any, fields: Sequence[str], step: int | None = None
                     ) -> tuple[int, dict[str, Any]]:
    """Restores only these fields of the saved train state (e.g. `("ema_params",)` to sample),
    into the shapes/shardings of the same fields of `abstract_state`; returns `(step, {field: tree})`.

    Reads those arrays alone (orbax's partial restore): sampling from an Adam-trained run reads
    a quarter of its state, and a checkpoint whose other fields this config's state lacks or
    lays out otherwise (a teacher, a discriminator) still gives its EMA parameters. CheckpointError
    names the first mismatching arrays, as `restore` does.
    """
    step = self._resolve(step)
    saved_tree = self._saved_tree(self._mngr.item_metadata(step))
    want = {f: getattr(abstract_state, f) for f in fields}
    missing = [f for f in fields if f not in saved_tree]
    self._check(step, [f"{f} is missing" for f in missing] if missing
                else shape_mismatches({f: saved_tree[f] for f in fields}, want))
    args = ocp.args.PyTreeRestore(want, restore_args=ocp.checkpoint_utils.construct_restore_args(want),
                                  partial_restore=True)
    return step, dict(self._mngr.restore(step, args=ocp.args.Composite(state=args))["state"])

  @staticmethod
  def _saved_tree(items_meta) -> Any:
    """The saved train state's tree of array metadata."""
    saved = items_meta["state"]
    return getattr(saved, "tree", saved)

  def _check(self, step: int, mismatches: list[str]) -> None:
    """CheckpointError naming `mismatches` (from `shape_mismatches`), if any."""
    if mismatches:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} does not match the config: {'; '.join(mismatches)}. "
          f"Use the config it was trained with, or a fresh --workdir.")

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
