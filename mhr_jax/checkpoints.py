"""Orbax checkpoints of the trainable state, restored onto any mesh and checked against the config.

A checkpoint step directory holds four items, written together and atomically (orbax writes to
a temporary directory and renames it when every item is complete, so a crash mid-save leaves
the earlier steps untouched and the half-written one invisible):

  trainable/   the trainable parameters as a nested dict keyed by parameter path
  opt_state/   the optax state
  metadata/    JSON: mode, task table, backbone reference, model and adapter configs, the shape
               of every trainable parameter, the data position
  task_table/task_table.json   the task-name -> id table again, for people to read

Only the trainable part is saved: the frozen backbone is named by ``backbone`` (a path) and
loaded from there.
"""

from __future__ import annotations

import dataclasses
import os
import logging
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

FORMAT_VERSION = 1
TRAINABLE, OPT_STATE, METADATA, TASK_TABLE = "trainable", "opt_state", "metadata", "task_table"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the configured run; the message lists every difference."""


def _path_str(path) -> str:
  return "/".join(str(k) for k in path)


def param_shapes(trainable: Any) -> dict[str, list[int]]:
  """``{"encoder/layers_0/mlp/wi_0/kernel": [64, 128], ...}`` of a (possibly abstract) State."""
  pure = trainable.to_pure_dict() if isinstance(trainable, nnx.State) else trainable
  flat = jax.tree_util.tree_leaves_with_path(pure)
  return {_path_str(k.key for k in path): list(x.shape) for path, x in flat}


def make_metadata(
    *, mode: str, task_table: dict[str, int], trainable: Any, backbone: Optional[str] = None,
    model_config: Optional[dict] = None, adapter_config: Optional[dict] = None,
    data_position: Any = None,
) -> dict:
  """The JSON metadata describing a run's checkpoints.

  Args:
    mode: what the run trains, for example "pretrain", "finetune" or "mhr_z".
    task_table: task name -> task id (the row of the routing matrix).
    trainable: the trainable State (arrays or ShapeDtypeStructs); its shapes are recorded.
    backbone: path of the backbone checkpoint the frozen part comes from.
    model_config: the T5 config as a dict (``dataclasses.asdict``).
    adapter_config: the adapter config as a dict.
    data_position: where the data pipeline is (JSON-serialisable; ``save`` overwrites it).
  """
  return {
      "format_version": FORMAT_VERSION,
      "mode": mode,
      "task_table": {str(k): int(v) for k, v in task_table.items()},
      "backbone": backbone,
      "model_config": dict(model_config or {}),
      "adapter_config": dict(adapter_config or {}),
      "trainable_shapes": param_shapes(trainable),
      "data_position": data_position,
  }


def check_metadata(saved: dict, expected: dict) -> None:
  """Raises ``CheckpointMismatchError`` naming every mode, routing-update, task-table and shape
  difference."""
  problems = []
  if saved.get("mode") != expected.get("mode"):
    problems.append(f"mode: checkpoint {saved.get('mode')!r}, config {expected.get('mode')!r}")
  # The two routing updates keep differently shaped optimizer states (older checkpoints: dense).
  s_update = saved.get("routing_update", "dense")
  e_update = expected.get("routing_update", "dense")
  if s_update != e_update:
    problems.append(f"routing_update: checkpoint {s_update!r}, config {e_update!r}")
  s_tasks, e_tasks = saved.get("task_table", {}), expected.get("task_table", {})
  for name in sorted(set(s_tasks) - set(e_tasks)):
    problems.append(f"task {name!r} (id {s_tasks[name]}) is in the checkpoint, not the config")
  for name in sorted(set(e_tasks) - set(s_tasks)):
    problems.append(f"task {name!r} (id {e_tasks[name]}) is in the config, not the checkpoint")
  for name in sorted(set(s_tasks) & set(e_tasks)):
    if s_tasks[name] != e_tasks[name]:
      problems.append(
          f"task {name!r} has id {s_tasks[name]} in the checkpoint, {e_tasks[name]} in the config")
  s_shapes, e_shapes = saved.get("trainable_shapes", {}), expected.get("trainable_shapes", {})
  for path in sorted(set(s_shapes) - set(e_shapes)):
    problems.append(f"parameter {path} is in the checkpoint, not the model")
  for path in sorted(set(e_shapes) - set(s_shapes)):
    problems.append(f"parameter {path} is in the model, not the checkpoint")
  for path in sorted(set(s_shapes) & set(e_shapes)):
    if list(s_shapes[path]) != list(e_shapes[path]):
      problems.append(
          f"parameter {path} has shape {tuple(s_shapes[path])} in the checkpoint, "
          f"{tuple(e_shapes[path])} in the model")
  if problems:
    raise CheckpointMismatchError(
        "checkpoint does not match the config:\n  " + "\n  ".join(problems))


@dataclasses.dataclass
class PartialRestoreReport:
  """What ``restore_partial`` did with each parameter path."""

  loaded: list[str]
  not_loaded: list[str]  # in the target, absent from the checkpoint: kept as initialised
  shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # (checkpoint, target)
  unused: list[str]  # in the checkpoint, absent from the target

  def summary(self) -> str:
    return (f"loaded {len(self.loaded)}; kept as initialised {len(self.not_loaded)} "
            f"{self.not_loaded}; shape mismatch {self.shape_mismatch}; unused {self.unused}")


def _abstract_leaf(x) -> jax.ShapeDtypeStruct:
  if isinstance(x, jax.ShapeDtypeStruct):
    if x.sharding is None:
      raise ValueError("restore targets need a sharding; use sharding.abstract_with_shardings")
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _copy(tree):
  return jax.tree.map(lambda x: x, tree)


class CheckpointManager:
  """Saves and restores a run's trainable state, optimizer state and metadata.

  Saving is asynchronous: ``save`` returns once the arrays are copied off the devices; call
  ``wait_until_finished`` (or ``close``) before the process exits. Every process of a multi-host
  run must make the same calls.
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    # orbax wants absolute paths; remote paths (gs://...) are absolute already.
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            TRAINABLE: ocp.PyTreeCheckpointHandler(),
            OPT_STATE: ocp.StandardCheckpointHandler(),
            METADATA: ocp.JsonCheckpointHandler(),
            TASK_TABLE: ocp.JsonCheckpointHandler(filename="task_table.json"),
        },
        options=options)

  def save(self, step: int, trainable: Any, opt_state: Any, *, data_position: Any,
           metadata: dict, force: bool = False) -> bool:
    """Starts saving step ``step``; returns whether a save was started (see save_interval).

    ``metadata`` comes from ``make_metadata``; ``data_position`` (JSON-serialisable) is stored in
    it and comes back from ``restore`` so the data pipeline can resume where it was.
    """
    metadata = dict(metadata, data_position=data_position, step=int(step),
                    trainable_shapes=param_shapes(trainable))
    pure = trainable.to_pure_dict() if isinstance(trainable, nnx.State) else trainable
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            TRAINABLE: ocp.args.PyTreeSave(pure),
            OPT_STATE: ocp.args.StandardSave(opt_state),
            METADATA: ocp.args.JsonSave(metadata),
            TASK_TABLE: ocp.args.JsonSave(metadata["task_table"]),
        }),
        force=force)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def latest_step(self) -> Optional[int]:
    """The newest fully written step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def metadata(self, step: int) -> dict:
    """The JSON metadata of a saved step."""
    return self._manager.restore(
        step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]

  def restore(self, step: int, abstract_trainable: Any, abstract_opt_state: Any, *,
              expected: Optional[dict] = None) -> tuple[Any, Any, dict]:
    """Restores a step onto the shardings of the targets (any mesh, not only the saving one).

    Args:
      step: the step to restore (``latest_step()`` to resume).
      abstract_trainable: State whose leaves are ``jax.ShapeDtypeStruct`` with shardings
        (``sharding.abstract_with_shardings``) or arrays whose shardings are used.
      abstract_opt_state: the same for the optimizer state.
      expected: metadata of the configured run (``make_metadata``); the saved metadata is
        checked against it and a ``CheckpointMismatchError`` lists every difference. Without
        it, only the parameter shapes are checked.

    Returns:
      (trainable State, opt_state, saved metadata with ``data_position``).
    """
    saved = self.metadata(step)
    target_shapes = param_shapes(abstract_trainable)
    if expected is None:
      expected = dict(mode=saved.get("mode"), task_table=saved.get("task_table", {}),
                      routing_update=saved.get("routing_update", "dense"))
    check_metadata(saved, dict(expected, trainable_shapes=target_shapes))
    tr_target = _copy(abstract_trainable)
    pure = jax.tree.map(_abstract_leaf, tr_target.to_pure_dict()
                        if isinstance(tr_target, nnx.State) else tr_target)
    opt_target = jax.tree.map(_abstract_leaf, abstract_opt_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        TRAINABLE: ocp.args.PyTreeRestore(
            pure, restore_args=ocp.checkpoint_utils.construct_restore_args(pure)),
        OPT_STATE: ocp.args.StandardRestore(opt_target),
    }))
    trainable = restored[TRAINABLE]
    if isinstance(tr_target, nnx.State):
      nnx.replace_by_pure_dict(tr_target, trainable)
      trainable = tr_target
    return trainable, restored[OPT_STATE], saved

  def restore_partial(self, step: int, trainable: nnx.State
                      ) -> tuple[nnx.State, PartialRestoreReport]:
    """Loads the saved parameters that fit ``trainable`` (same path and shape) into a copy of it.

    For moving between modes (pre-training -> fine-tuning): parameters the checkpoint lacks, or
    has with another shape (say a router for another number of tasks), keep their values in
    ``trainable``; the report lists them, as big_vision's ``merge_params`` does. Arrays are
    placed with the shardings of ``trainable``'s arrays. The optimizer state is not loaded.
    """
    saved_shapes = self.metadata(step)["trainable_shapes"]
    target = trainable.to_pure_dict()
    flat_target = {_path_str(k.key for k in p): (p, x)
                   for p, x in jax.tree_util.tree_leaves_with_path(target)}
    report = PartialRestoreReport([], [], {}, sorted(set(saved_shapes) - set(flat_target)))
    partial: dict = {}
    for path, (_, x) in sorted(flat_target.items()):
      if path not in saved_shapes:
        report.not_loaded.append(path)
      elif tuple(saved_shapes[path]) != tuple(x.shape):
        report.shape_mismatch[path] = (tuple(saved_shapes[path]), tuple(x.shape))
      else:
        report.loaded.append(path)
        node = partial
        keys = path.split("/")
        for k in keys[:-1]:
          node = node.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    new = _copy(trainable)
    if partial:
      loaded = self._manager.restore(step, args=ocp.args.Composite(**{
          TRAINABLE: ocp.args.PyTreeRestore(
              partial, restore_args=ocp.checkpoint_utils.construct_restore_args(partial),
              partial_restore=True)}))[TRAINABLE]
      nnx.replace_by_pure_dict(new, loaded)
    logging.info("partial restore of %s step %d: %s", self.directory, step, report.summary())
    return new, report


# ----------------------------------------------------------------------------------------------
# Reading another run's checkpoints (fine-tuning from pre-training, a backbone from a full run).


def _run_manager(run_dir) -> tuple[CheckpointManager, int]:
  directory = os.path.join(os.fspath(run_dir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory in run {run_dir} (looked for {directory})")
  manager = CheckpointManager(directory, async_save=False)
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  return manager, step


def read_metadata(run_dir) -> dict:
  """The latest checkpoint's metadata of a run directory, with ``path`` set to the directory
  and ``task_names`` listing its tasks in id order."""
  manager, step = _run_manager(run_dir)
  try:
    meta = manager.metadata(step)
  finally:
    manager.close()
  table = meta.get("task_table", {})
  meta["task_names"] = sorted(table, key=table.get)
  meta["path"] = os.fspath(run_dir)
  meta["step"] = step
  return meta


def restore_into(model: nnx.Module, run_dir, filter_) -> None:
  """Loads a run's latest trainable parameters into the ``filter_`` part of ``model`` (in place).

  Every parameter the filter selects must be in the checkpoint with its shape, and every
  saved parameter must find a place: otherwise ``CheckpointMismatchError`` names them.
  """
  manager, step = _run_manager(run_dir)
  try:
    state = nnx.state(model, filter_)
    new, report = manager.restore_partial(step, state)
  finally:
    manager.close()
  if report.not_loaded or report.shape_mismatch or report.unused:
    raise CheckpointMismatchError(
        f"{run_dir} (step {step}) does not fit the model: {report.summary()}")
  nnx.update(model, new)


def read_params(run_dir) -> dict[tuple[str, ...], np.ndarray]:
  """A run's latest trainable parameters as ``{path: numpy array}`` (for inspection and tests)."""
  manager, step = _run_manager(run_dir)
  try:
    out = manager._manager.restore(
        step, args=ocp.args.Composite(**{TRAINABLE: ocp.args.PyTreeRestore()}))[TRAINABLE]
  finally:
    manager.close()
  flat = jax.tree_util.tree_leaves_with_path(out)
  return {tuple(str(k.key) for k in path): np.asarray(x) for path, x in flat}
