"""From seqio tasks and mixtures to the model's batches, and the task-id table.

The contract with the model is a dict of numpy arrays (per host):

  encoder_input_tokens  [B, Li] int32   inputs, 0-padded, ending with EOS (1)
  decoder_input_tokens  [B, Lt] int32   targets shifted right by one, starting with 0
  decoder_target_tokens [B, Lt] int32   targets, 0-padded, ending with EOS
  decoder_loss_weights  [B, Lt] float32 1 on real target tokens, 0 on padding
  task_ids              [B]     int32   id of the task each row comes from (see `TaskIdTable`)

Every registered task adds a constant string feature ``task_name`` to its examples; it travels
through seqio mixtures as a passthrough feature and becomes ``task_ids`` here, through the
`TaskIdTable` of the run. Examples are never packed: a packed row would hold examples of several
tasks while routing reads one task id per row, so packing would send some examples through another
task's routing.

Data position. Training iteration is deterministic for a given seed (tf.data shuffles and the
mixture sampler are seeded and run deterministically), so the position saved in a checkpoint is
simply the number of batches consumed; `BatchIterator` resumes by skipping that many batches, which
gives exactly the batches an uninterrupted run would have seen. In training, `HostBatches` gives
each process its rows of the global batch from fixed data shards, so the global batches do not
depend on the number of processes.

Batches in which every example is repeated once per answer choice (rank classification and the
T-Few losses) are built in `mhr_jax.choices`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from mhr_jax import errors

TASK_NAME = "task_name"
BATCH_KEYS = (
  "encoder_input_tokens",
  "decoder_input_tokens",
  "decoder_target_tokens",
  "decoder_loss_weights",
  "task_ids",
)

_TABLE_FORMAT = "mhr_jax.task_ids/v1"


# ----------------------------------------------------------------------------- task-id table


@dataclasses.dataclass(frozen=True)
class TaskIdTable:
  """Maps the task names of a run to routing ids 0..n_tasks-1.

  Ids follow the order of ``names``. A table built from a mixture sorts the mixture's task names, so
  the ids do not depend on the order in which the mixture lists them; `extend` appends new tasks
  after the existing ones, so a fine-tuning table keeps every pre-training id. The table is written
  next to every checkpoint and compared (as `check_tables_match` does) on restore.
  """

  names: tuple[str, ...]

  def __post_init__(self):
    object.__setattr__(self, "names", tuple(self.names))
    seen = set()
    dups = sorted({n for n in self.names if n in seen or seen.add(n)})
    if dups:
      raise ValueError(f"Task-id table lists these task names more than once: {dups}")

  @classmethod
  def from_mixture(cls, mixture_or_task_name: str) -> "TaskIdTable":
    """The table of a registered mixture (or single task): its task names, sorted."""
    provider = get_provider(mixture_or_task_name)
    return cls(tuple(sorted(t.name for t in _leaf_tasks(provider))))

  def extend(self, names: Iterable[str]) -> "TaskIdTable":
    """This table with the new tasks of ``names`` appended, sorted, after the existing ones."""
    new = sorted(set(names) - set(self.names))
    return TaskIdTable(self.names + tuple(new))

  def extend_with_mixture(self, mixture_or_task_name: str) -> "TaskIdTable":
    """`extend` with the tasks of a registered mixture (for fine-tuning on held-out tasks)."""
    return self.extend(TaskIdTable.from_mixture(mixture_or_task_name).names)

  @property
  def n_tasks(self) -> int:
    return len(self.names)

  def as_dict(self) -> dict[str, int]:
    return {n: i for i, n in enumerate(self.names)}

  def id(self, name: str) -> int:
    """The id of one task; unknown names fail, listing the table."""
    try:
      return self.names.index(name)
    except ValueError:
      raise KeyError(f"Task {name!r} is not in the task-id table, which holds {list(self.names)}")

  def ids(self, names: Sequence[Any]) -> np.ndarray:
    """Ids of an array of task names (str or bytes), as int32."""
    lookup = self.as_dict()
    out = np.empty(len(names), np.int32)
    for i, n in enumerate(names):
      n = n.decode() if isinstance(n, bytes) else str(n)
      if n not in lookup:
        raise KeyError(f"Task {n!r} is not in the task-id table, which holds {list(self.names)}")
      out[i] = lookup[n]
    return out

  def save(self, path: str | os.PathLike) -> None:
    """Writes the table as JSON (``{"format": ..., "tasks": {name: id}}``), locally or to a
    bucket."""
    epath.Path(path).write_text(
        json.dumps({"format": _TABLE_FORMAT, "tasks": self.as_dict()}, indent=1))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TaskIdTable":
    """Reads a table written by `save`."""
    try:
      raw = json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"Task-id table not found: {path}")
    except json.JSONDecodeError as e:
      raise ValueError(f"Task-id table {path} is not valid JSON: {e}")
    if not isinstance(raw, dict) or raw.get("format") != _TABLE_FORMAT:
      raise ValueError(f"{path} is not a task-id table (expected format {_TABLE_FORMAT!r})")
    tasks = raw["tasks"]
    ids = sorted(tasks.values())
    if ids != list(range(len(ids))):
      raise ValueError(f"Task-id table {path}: ids must be 0..{len(ids) - 1}, got {ids}")
    return cls(tuple(sorted(tasks, key=tasks.get)))


def check_tables_match(saved: TaskIdTable, current: TaskIdTable, allow_new: bool = False
                       ) -> None:
  """Fails unless ``current`` gives every task of ``saved`` the same id.

  (Two tables compared; ``routing.check_task_ids`` checks a batch's ids against one router.)

  Args:
    saved: the table written with a checkpoint.
    current: the table of the run that restores it.
    allow_new: whether ``current`` may hold extra tasks after the saved ones (fine-tuning on new
      tasks); otherwise the two tables must be equal.

  Raises:
    ValueError: naming every difference.
  """
  problems = []
  cur = current.as_dict()
  for i, name in enumerate(saved.names):
    if name not in cur:
      problems.append(f"{name!r} (id {i}) is missing from the current table")
    elif cur[name] != i:
      problems.append(f"{name!r} has id {i} in the saved table but {cur[name]} now")
  extra = [n for n in current.names if n not in set(saved.names)]
  if extra and not allow_new:
    problems.append(f"tasks not in the saved table: {extra}")
  if problems:
    raise ValueError("Task-id tables differ:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- seqio access


def get_provider(name: str) -> seqio.DatasetProviderBase:
  """A registered seqio task or mixture; unknown names fail, listing what is registered."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  raise errors.DataError(
    f"No seqio task or mixture named {name!r}. Mixtures: {sorted(seqio.MixtureRegistry.names())}; "
    f"tasks: {sorted(seqio.TaskRegistry.names())}"
  )


def _leaf_tasks(provider) -> list[seqio.Task]:
  if isinstance(provider, seqio.Mixture):
    return list(provider.tasks)
  return [provider]


def get_examples(
  name: str,
  split: str,
  feature_lengths: Optional[Mapping[str, int]] = None,
  *,
  shuffle: bool = False,
  seed: Optional[int] = None,
  num_epochs: Optional[int] = 1,
  shard_index: int = 0,
  num_shards: int = 1,
) -> tf.data.Dataset:
  """The tokenized examples of a task or mixture, each with its ``task_name``.

  A mixture keeps the passthrough features its tasks add (``task_name``, and for choice tasks
  ``answer_choices`` and ``label``). Mixtures with ``num_epochs=1`` stop at their first exhausted
  task.
  """
  provider = get_provider(name)
  kwargs = dict(
    sequence_length=dict(feature_lengths) if feature_lengths else None,
    split=split,
    shuffle=shuffle,
    seed=seed,
    num_epochs=num_epochs,
    shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
  )
  if isinstance(provider, seqio.Mixture):
    passthrough = [TASK_NAME, "answer_choices", "label", "references"]
    return provider.get_dataset(**kwargs, passthrough_features=passthrough)
  return provider.get_dataset(**kwargs)


# ----------------------------------------------------------------------------- conversion


def _pad_to(x: tf.Tensor, length: int) -> tf.Tensor:
  x = x[:length]
  return tf.pad(x, [[0, length - tf.shape(x)[0]]])


def convert_features(ds: tf.data.Dataset, feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
  """Turns tokenized ``inputs``/``targets`` into the model's (unbatched, unpacked) features.

  Keeps ``task_name`` (a string) for the later id lookup.
  """
  li, lt = feature_lengths["inputs"], feature_lengths["targets"]

  def convert(ex):
    inputs = _pad_to(tf.cast(ex["inputs"], tf.int32), li)
    targets = _pad_to(tf.cast(ex["targets"], tf.int32), lt)
    return {
      "encoder_input_tokens": inputs,
      "decoder_input_tokens": tf.concat([[0], targets[:-1]], axis=0),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": tf.cast(targets > 0, tf.float32),
      TASK_NAME: ex[TASK_NAME],
    }

  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _finish(batch: dict[str, np.ndarray], table: TaskIdTable) -> dict[str, np.ndarray]:
  out = {k: v for k, v in batch.items() if k != TASK_NAME}
  out["task_ids"] = table.ids(batch[TASK_NAME])
  return out


class BatchIterator:
  """Per-host batches of a task or mixture, with task ids; resumable from a batch count.

  Args:
    name: a registered seqio task or mixture.
    table: the run's task-id table; every task of ``name`` must be in it.
    feature_lengths: ``{"inputs": Li, "targets": Lt}``; longer sequences are truncated.
    batch_size: rows per host.
    split: dataset split.
    seed: seed of shuffling and mixture sampling; the same seed gives the same batches.
    shuffle: whether to shuffle (training) or read in order (evaluation).
    num_epochs: ``None`` repeats forever (training); evaluation uses 1.
    shard_index, num_shards: which shard of the data this host reads (`seqio.ShardInfo`).
    start_batch: number of batches already consumed (the saved data position).
    drop_remainder: whether a last, smaller batch is dropped.
  """

  def __init__(
    self,
    name: str,
    table: TaskIdTable,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    split: str = "train",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    shard_index: int = 0,
    num_shards: int = 1,
    start_batch: int = 0,
    drop_remainder: bool = True,
  ):
    missing = [t.name for t in _leaf_tasks(get_provider(name)) if t.name not in table.as_dict()]
    if missing:
      raise KeyError(f"Tasks of {name!r} missing from the task-id table: {missing}")
    self.table = table
    ds = get_examples(
      name,
      split,
      feature_lengths,
      shuffle=shuffle,
      seed=seed,
      num_epochs=num_epochs,
      shard_index=shard_index,
      num_shards=num_shards,
    )
    ds = convert_features(ds, feature_lengths).batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.skip(start_batch)
    options = tf.data.Options()
    options.deterministic = True
    self._it = ds.with_options(options).as_numpy_iterator()
    self.position = start_batch

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = _finish(next(self._it), self.table)
    self.position += 1
    return batch


class HostBatches:
  """This process's rows of every global training batch, resumable from a batch count.

  The training data is split into ``data_shards`` seqio shards; global batch ``i`` is batch ``i``
  of shard 0, then of shard 1, and so on, ``global_batch_size / data_shards`` rows each. A process
  reads the shards that fall in its ``rows`` of the global batch and concatenates them. The global
  batches therefore depend on ``data_shards``, never on how many processes read them: a run
  resumed after a preemption, on the same or on another number of hosts, and a 1-process run
  with the same ``data_shards``, all see the same batches. Each shard skips ``start_batch``
  batches on resume (the saved data position).

  Args:
    name, table, feature_lengths, seed: as `BatchIterator`.
    global_batch_size: rows of a global batch.
    rows: the rows of the global batch this process holds (``sharding.host_batch_rows``).
    data_shards: shards the data is split into; they must tile ``rows`` exactly.
    start_batch: global batches already consumed.
    n_choices: given, T-Few batches of `MultipleChoiceIterator` instead (``global_batch_size``
      and ``rows`` then count examples; each gives ``n_choices`` rows).
  """

  def __init__(self, name: str, table: TaskIdTable, feature_lengths: Mapping[str, int],
               global_batch_size: int, *, rows: slice, data_shards: int, seed: int = 0,
               start_batch: int = 0, n_choices: Optional[int] = None):
    if data_shards < 1 or global_batch_size % data_shards:
      raise ValueError(f"data_shards={data_shards} must divide the global batch size "
                       f"{global_batch_size}")
    per_shard = global_batch_size // data_shards
    if rows.start % per_shard or rows.stop % per_shard:
      raise ValueError(
        f"this process holds rows [{rows.start}, {rows.stop}) of each batch of "
        f"{global_batch_size}, which {data_shards} data shards of {per_shard} rows do not tile: "
        f"make data_shards a multiple of the number of processes")
    self.shards = tuple(range(rows.start // per_shard, rows.stop // per_shard))
    if n_choices:
      from mhr_jax import choices  # choices builds on this module

      self._iters = [choices.MultipleChoiceIterator(
          name, table, feature_lengths, per_shard, n_choices, seed=seed, start_batch=start_batch,
          shard_index=i, num_shards=data_shards) for i in self.shards]
    else:
      self._iters = [BatchIterator(name, table, feature_lengths, per_shard, seed=seed,
                                   start_batch=start_batch, shard_index=i, num_shards=data_shards)
                     for i in self.shards]
    self.position = start_batch

  def __iter__(self) -> "HostBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iters]
    self.position += 1
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # [rows, ...]


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
  """Assembles per-host batches into global jax arrays with the given (batch-axis) sharding."""
  import jax  # The data layer needs jax only here.

  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
