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

Each step directory also holds ``mhr_manifest.json``, the size of every file the save wrote
(``checkpoint_integrity``); ``restore_latest`` resumes from the newest step that is committed and
matches it, names every newer damaged step and moves it aside, and refuses to start from step 0
when steps exist but none is intact.

Multi-process runs: every process calls the same methods; orbax writes each array shard from the
process that holds it, the JSON items and the manifest from process 0 only, and commits once,
after every process has finished writing. All processes check the checkpoint folder themselves
(it must be one shared file system) and confirm they chose the same step before restoring.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import zlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mhr_jax import checkpoint_integrity as integrity
from mhr_jax import errors
from mhr_jax.errors import (CheckpointDamagedError, CheckpointDisagreementError, CheckpointError,
                            CheckpointMismatchError)

FORMAT_VERSION = 2  # 2: every step carries a file manifest (checkpoint_integrity)
TRAINABLE, OPT_STATE, METADATA, TASK_TABLE = "trainable", "opt_state", "metadata", "task_table"

log = logging.getLogger("mhr_jax.checkpoints")


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
    mode: the adapter mode the run trains (a name of ``modes.MODES``, e.g. "mhr" or "mhr_z").
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
    # orbax runs the manifest hook only on its asynchronous path: a synchronous manager saves
    # asynchronously and waits at once.
    self._async = async_save
    self._saving_step: Optional[int] = None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
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

  def _write_manifest(self) -> None:
    """orbax's post-finalization hook: on the primary process, after every process has written
    its files and before the rename that commits the step."""
    step_dir = integrity.pending_directory(self.directory, self._saving_step)
    integrity.write_manifest(step_dir, self._saving_step)

  def save(self, step: int, trainable: Any, opt_state: Any, *, data_position: Any,
           metadata: dict, force: bool = False) -> bool:
    """Starts saving step ``step``; returns whether a save was started (see save_interval).

    ``metadata`` comes from ``make_metadata``; ``data_position`` (JSON-serialisable) is stored in
    it and comes back from ``restore`` so the data pipeline can resume where it was.
    """
    metadata = dict(metadata, data_position=data_position, step=int(step),
                    trainable_shapes=param_shapes(trainable), format_version=FORMAT_VERSION)
    pure = trainable.to_pure_dict() if isinstance(trainable, nnx.State) else trainable
    self._manager.wait_until_finished()  # the manifest hook reads _saving_step
    self._saving_step = int(step)
    started = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            TRAINABLE: ocp.args.PyTreeSave(pure),
            OPT_STATE: ocp.args.StandardSave(opt_state),
            METADATA: ocp.args.JsonSave(metadata),
            TASK_TABLE: ocp.args.JsonSave(metadata["task_table"]),
        }),
        force=force)
    if not self._async:
      self._manager.wait_until_finished()
    return started

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None (``restore_latest`` also checks it is intact)."""
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

  def restore_latest(self, abstract_trainable: Any, abstract_opt_state: Any, *,
                     expected: Optional[dict] = None) -> Optional[tuple[Any, Any, dict]]:
    """Resumes a run: restores the newest intact step, or returns None when nothing was saved.

    Steps newer than the one restored that fail ``checkpoint_integrity.problems`` (an unfinished
    commit, a truncated or missing file, unreadable JSON) are named and moved to the sibling
    ``<directory>_damaged`` folder, so that later saves and ``max_to_keep`` never meet them.
    Arguments and return value as ``restore`` (the saved metadata has ``step``).

    Raises:
      CheckpointDamagedError: steps exist but none is intact (nothing is moved or deleted), or
        the chosen step fails to read.
      CheckpointDisagreementError: the processes of the run found different steps.
      CheckpointMismatchError: the step does not fit ``expected``.
    """
    step, damaged = integrity.newest_intact(self.directory)
    _check_processes_agree(self.directory, step, damaged)
    if damaged and step is None:
      raise CheckpointDamagedError(
          f"no intact checkpoint in {self.directory}:\n  "
          + "\n  ".join(d.describe() for d in damaged)
          + f"\nNothing was moved or deleted. To start again from step 0, remove or move away "
          f"{self.directory}; to keep trying, restore the damaged files first.")
    if damaged:
      moved = integrity.move_aside(self.directory, damaged) if jax.process_index() == 0 else []
      _sync_processes("mhr_jax.checkpoints.move_aside")
      self._manager.reload()
      _tell("damaged checkpoint" + ("s" if len(damaged) > 1 else "") + " skipped:\n  "
            + "\n  ".join(d.describe() for d in damaged)
            + f"\nmoved to {', '.join(moved)}; resuming from step {step}, the newest intact one")
    if step is None:
      return None
    try:
      restored = self.restore(step, abstract_trainable, abstract_opt_state, expected=expected)
    except CheckpointError:
      raise
    except Exception as e:  # damage that leaves the sizes intact (flipped bytes)
      raise CheckpointDamagedError(
          f"checkpoint step {step} ({os.path.join(self.directory, str(step))}) cannot be read: "
          f"{type(e).__name__}: {e}\nMove that folder out of {self.directory} to resume from "
          f"the step before it.") from e
    _tell(f"resuming from step {step} of {self.directory}")
    return restored

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


def _tell(message: str) -> None:
  """A line for the person running the job (process 0 prints it; every process logs it)."""
  log.info(message)
  if jax.process_index() == 0:
    print(f"checkpoints: {message}", file=sys.stderr, flush=True)


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _check_processes_agree(directory: str, step: Optional[int],
                           damaged: list[integrity.DamagedStep]) -> None:
  """Raises ``CheckpointDisagreementError`` unless every process found the same steps.

  Every process examines the folder itself; a process that sees other files (a folder that is
  not one shared file system, or one still being copied) would otherwise restore another step
  than its peers, or wait for them in a collective that never comes.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  damaged_steps = ",".join(str(d.step) for d in damaged).encode()
  mine = np.array([-1 if step is None else step, zlib.crc32(damaged_steps) & 0x7FFFFFFF],
                  np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2]
  if not (everyone == everyone[0]).all():
    seen = ", ".join(f"process {i}: step {int(v[0]) if v[0] >= 0 else None}"
                     for i, v in enumerate(everyone))
    raise CheckpointDisagreementError(
        f"the processes found different checkpoints in {directory} ({seen}; this process "
        f"found damaged steps [{damaged_steps.decode()}]): every process must see the same "
        f"checkpoint folder, on one shared file system")


# ----------------------------------------------------------------------------------------------
# Reading another run's checkpoints (fine-tuning from pre-training, a backbone from a full run).


def _run_manager(run_dir) -> tuple[CheckpointManager, int]:
  directory = os.path.join(os.fspath(run_dir), "checkpoints")
  if not epath.Path(directory).is_dir():
    raise errors.MissingFileError(
        f"no checkpoints directory in run {run_dir} (looked for {directory})")
  step, damaged = integrity.newest_intact(directory)
  if step is None:
    detail = "".join(f"\n  {d.describe()}" for d in damaged)
    raise (CheckpointDamagedError if damaged else errors.MissingFileError)(
        f"no intact checkpoint in {directory}{detail}")
  if damaged:
    _tell(f"reading step {step} of {directory}; newer steps are damaged:"
          + "".join(f"\n  {d.describe()}" for d in damaged))
  return CheckpointManager(directory, async_save=False), step


def read_metadata(run_dir) -> dict:
  """The newest intact checkpoint's metadata of a run directory, with ``path`` set to the directory
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
