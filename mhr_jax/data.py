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

Rank classification (T0 evaluation and T-Few losses) uses a second batch form, where every example
is repeated once per answer choice, see `rank_classification_batches`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

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
RANK_KEYS = BATCH_KEYS + ("example_ids", "choice_ids", "is_correct")

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
      self._iters = [MultipleChoiceIterator(name, table, feature_lengths, per_shard, n_choices,
                                            seed=seed, start_batch=start_batch, shard_index=i,
                                            num_shards=data_shards)
                     for i in self.shards]
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


# ----------------------------------------------------------------------------- rank classification


def rank_classification_rows(
  examples: Iterable[Mapping[str, Any]],
  vocabulary: seqio.Vocabulary,
  table: TaskIdTable,
  feature_lengths: Mapping[str, int],
) -> dict[str, np.ndarray]:
  """Repeats every example once per answer choice (all rows, unbatched).

  Args:
    examples: dicts with ``inputs`` (token ids), ``answer_choices`` (strings or bytes), ``label``
      (index of the gold choice, -1 if unknown) and ``task_name``.
    vocabulary: encodes the answer choices (EOS is appended).
    table: the run's task-id table.
    feature_lengths: ``{"inputs": Li, "targets": Lt}``.

  Returns:
    The arrays of `BATCH_KEYS` plus ``example_ids`` (running index of the source example),
    ``choice_ids`` and ``is_correct`` (1 on the gold choice's row), one row per (example, choice).
  """
  li, lt = feature_lengths["inputs"], feature_lengths["targets"]
  rows = {k: [] for k in RANK_KEYS}
  names = []
  for ex_id, ex in enumerate(examples):
    inputs = np.asarray(ex["inputs"], np.int32)[:li]
    label = int(ex["label"])
    choices = [c.decode() if isinstance(c, bytes) else c for c in ex["answer_choices"]]
    if label >= len(choices):
      raise ValueError(f"Example {ex_id} of {ex['task_name']!r}: label {label} outside {choices}")
    for c_id, choice in enumerate(choices):
      target = (list(vocabulary.encode(choice)) + [1])[:lt]
      enc = np.zeros(li, np.int32)
      enc[: len(inputs)] = inputs
      tgt = np.zeros(lt, np.int32)
      tgt[: len(target)] = target
      rows["encoder_input_tokens"].append(enc)
      rows["decoder_target_tokens"].append(tgt)
      rows["decoder_input_tokens"].append(np.concatenate([[0], tgt[:-1]]).astype(np.int32))
      rows["decoder_loss_weights"].append((tgt > 0).astype(np.float32))
      rows["example_ids"].append(ex_id)
      rows["choice_ids"].append(c_id)
      rows["is_correct"].append(int(c_id == label))
      names.append(ex["task_name"])
  if not names:
    raise ValueError("No examples to build rank-classification rows from")
  out = {k: np.stack(rows[k]) for k in BATCH_KEYS if k != "task_ids"}
  for k in ("example_ids", "choice_ids", "is_correct"):
    out[k] = np.asarray(rows[k], np.int32)
  out["task_ids"] = table.ids(names)
  return out


def rank_classification_batches(
  rows: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """Splits the rows of `rank_classification_rows` into fixed-size batches.

  The last batch is filled with padding rows (``example_ids`` -1, zero tokens and weights), so
  every batch has the same shapes and compiles once.
  """
  n = len(rows["example_ids"])
  for start in range(0, n, batch_size):
    batch = {k: v[start : start + batch_size] for k, v in rows.items()}
    short = batch_size - len(batch["example_ids"])
    if short:
      for k, v in batch.items():
        fill = -1 if k == "example_ids" else 0
        batch[k] = np.concatenate([v, np.full((short,) + v.shape[1:], fill, v.dtype)])
    yield batch


def rank_classification_predict(
  loglik: np.ndarray,
  target_lengths: np.ndarray,
  example_ids: np.ndarray,
  choice_ids: np.ndarray,
  is_correct: Optional[np.ndarray] = None,
) -> dict[str, np.ndarray]:
  """Picks, for every example, the choice with the highest length-normalised log-likelihood.

  Args:
    loglik: [N] summed target log-likelihood of each row.
    target_lengths: [N] number of target tokens of each row (the sum of its loss weights).
    example_ids: [N] source example of each row; rows with -1 (padding) are ignored.
    choice_ids: [N] answer-choice index of each row.
    is_correct: [N] optional gold marker; gives ``labels`` and ``accuracy``.

  Returns:
    ``example_ids`` (sorted, unique), ``predictions`` (choice index per example), ``scores``
    (per-row normalised scores) and, with ``is_correct``, ``labels`` and ``accuracy`` (in %).
  """
  loglik = np.asarray(loglik, np.float64)
  lengths = np.maximum(np.asarray(target_lengths, np.float64), 1.0)
  example_ids = np.asarray(example_ids)
  choice_ids = np.asarray(choice_ids)
  scores = loglik / lengths
  keep = example_ids >= 0
  ex_unique = np.unique(example_ids[keep])
  preds = np.empty(len(ex_unique), np.int32)
  labels = np.full(len(ex_unique), -1, np.int32)
  for i, ex in enumerate(ex_unique):
    rows = np.nonzero(keep & (example_ids == ex))[0]
    preds[i] = choice_ids[rows[np.argmax(scores[rows])]]
    if is_correct is not None:
      gold = rows[np.asarray(is_correct)[rows] > 0]
      if len(gold):
        labels[i] = choice_ids[gold[0]]
  out = {"example_ids": ex_unique, "predictions": preds, "scores": scores}
  if is_correct is not None:
    out["labels"] = labels
    out["accuracy"] = np.float64(100.0 * np.mean(preds == labels)) if len(preds) else np.nan
  return out


def rank_accuracy(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """Seqio metric: percentage of examples whose predicted choice index equals the gold index."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  if targets.shape != predictions.shape:
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  return {"accuracy": float(100.0 * np.mean(targets == predictions))}


# ----------------------------------------------------------------------------- multiple choice

MULTIPLE_CHOICE_KEYS = BATCH_KEYS + ("example_ids", "choice_ids", "is_correct", "choice_mask")


def _choice_tokens(vocabulary: seqio.Vocabulary, choice: Any, length: int) -> list[int]:
  """A choice's token ids ending with EOS, at most ``length`` of them (EOS kept on truncation)."""
  text = choice.decode() if isinstance(choice, bytes) else str(choice)
  return list(vocabulary.encode(text))[: length - 1] + [1]


def multiple_choice_rows(
  examples: Sequence[Mapping[str, Any]],
  vocabulary: seqio.Vocabulary,
  table: TaskIdTable,
  feature_lengths: Mapping[str, int],
  n_choices: int,
) -> dict[str, np.ndarray]:
  """A T-Few training batch: every example as ``n_choices`` rows, one per answer choice.

  Rows are example-major: row ``b * n_choices + c`` holds example b's inputs and its choice c as
  the target (``models.tfew_losses`` reshapes to [B, C]). An example with fewer choices is padded
  with all-zero rows (``choice_mask`` 0, no loss weight); one with more is an error.

  Args:
    examples: dicts with ``inputs`` (token ids), ``answer_choices`` (strings or bytes), ``label``
      (index of the gold choice) and ``task_name``.
    vocabulary: encodes the answer choices (EOS appended; truncation keeps it).
    table: the run's task-id table.
    feature_lengths: ``{"inputs": Li, "targets": Lt}``.
    n_choices: C, the same for every batch of a run (see `max_choices`).

  Returns:
    The arrays of `MULTIPLE_CHOICE_KEYS`, each with ``len(examples) * n_choices`` rows;
    ``example_ids`` is the example's position in ``examples``.
  """
  li, lt = feature_lengths["inputs"], feature_lengths["targets"]
  n = len(examples) * n_choices
  out = {"encoder_input_tokens": np.zeros((n, li), np.int32),
         "decoder_target_tokens": np.zeros((n, lt), np.int32)}
  for k in ("example_ids", "choice_ids", "is_correct", "choice_mask"):
    out[k] = np.zeros(n, np.int32)
  names = []
  for b, ex in enumerate(examples):
    choices, label = list(ex["answer_choices"]), int(ex["label"])
    name = ex["task_name"].decode() if isinstance(ex["task_name"], bytes) else ex["task_name"]
    if len(choices) > n_choices:
      raise ValueError(f"Example {b} of {name!r} has {len(choices)} answer choices; the batch "
                       f"layout holds n_choices={n_choices}")
    if not 0 <= label < len(choices):
      raise ValueError(f"Example {b} of {name!r}: label {label} is not one of its "
                       f"{len(choices)} choices")
    inputs = np.asarray(ex["inputs"], np.int32)[:li]
    for c in range(n_choices):
      row = b * n_choices + c
      out["encoder_input_tokens"][row, : len(inputs)] = inputs
      out["example_ids"][row], out["choice_ids"][row] = b, c
      names.append(name)
      if c < len(choices):
        target = _choice_tokens(vocabulary, choices[c], lt)
        out["decoder_target_tokens"][row, : len(target)] = target
        out["choice_mask"][row] = 1
        out["is_correct"][row] = int(c == label)
  if not names:
    raise ValueError("No examples to build multiple-choice rows from")
  targets = out["decoder_target_tokens"]
  out["decoder_input_tokens"] = np.concatenate(
    [np.zeros((n, 1), np.int32), targets[:, :-1]], axis=1)  # [N, Lt] shifted right
  out["decoder_loss_weights"] = (targets > 0).astype(np.float32)
  out["task_ids"] = table.ids(names)
  return out


def max_choices(name: str, split: str = "train") -> int:
  """The largest number of answer choices of any example of a task or mixture's split."""
  ds = get_examples(name, split)
  if not {"answer_choices", "label"} <= set(ds.element_spec):
    raise ValueError(f"{name!r} ({split}) has no answer_choices / label features: not a "
                     "multiple-choice task")
  most = 0
  for ex in ds.as_numpy_iterator():
    most = max(most, len(ex["answer_choices"]))
  if not most:
    raise ValueError(f"{name!r} ({split}) has no example with answer choices")
  return most


class MultipleChoiceIterator:
  """Per-host T-Few training batches of a choice task: `multiple_choice_rows` of ``batch_size``
  shuffled examples, repeated forever; resumable from a batch count like `BatchIterator`.

  Args:
    name: a registered seqio task or mixture whose examples carry ``answer_choices`` and
      ``label`` (e.g. ``tasks.t0`` tasks).
    table: the run's task-id table.
    feature_lengths: ``{"inputs": Li, "targets": Lt}``.
    batch_size: examples per host batch (rows: ``batch_size * n_choices``).
    n_choices: C, e.g. ``max_choices(name)``.
    split, seed, shard_index, num_shards: as in `BatchIterator`.
    start_batch: batches already consumed (the saved data position).
  """

  def __init__(self, name: str, table: TaskIdTable, feature_lengths: Mapping[str, int],
               batch_size: int, n_choices: int, *, split: str = "train", seed: int = 0,
               shard_index: int = 0, num_shards: int = 1, start_batch: int = 0):
    provider = get_provider(name)
    missing = [t.name for t in _leaf_tasks(provider) if t.name not in table.as_dict()]
    if missing:
      raise KeyError(f"Tasks of {name!r} missing from the task-id table: {missing}")
    self.table, self.batch_size, self.n_choices = table, batch_size, n_choices
    self.feature_lengths = dict(feature_lengths)
    self.vocabulary = provider.output_features["targets"].vocabulary
    ds = get_examples(name, split, feature_lengths, shuffle=True, seed=seed, num_epochs=None,
                      shard_index=shard_index, num_shards=num_shards)
    options = tf.data.Options()
    options.deterministic = True
    self._it = ds.skip(start_batch * batch_size).with_options(options).as_numpy_iterator()
    self.position = start_batch

  def __iter__(self) -> "MultipleChoiceIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    examples = [next(self._it) for _ in range(self.batch_size)]
    self.position += 1
    return multiple_choice_rows(examples, self.vocabulary, self.table, self.feature_lengths,
                                self.n_choices)


def rank_classification_accuracy(targets: Sequence[int], scores: Sequence[Sequence[float]]
                                 ) -> dict[str, float]:
  """Seqio score metric: percentage of examples whose best-scoring answer choice is the gold one.

  Args:
    targets: the gold choice index of each example (a task's ``postprocess_fn`` gives it from the
      example's ``label``).
    scores: ``[N, C]`` one score per answer choice (the length-normalised log-likelihood that the
      evaluation's ``score_fn`` returns; -inf for choices an example does not have).
  """
  targets = np.asarray(targets)
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or len(scores) != len(targets):
    raise ValueError(f"expected scores [N={len(targets)}, choices], got shape {scores.shape}")
  if not len(targets):
    return {"accuracy": float("nan")}
  return {"accuracy": float(100.0 * np.mean(np.argmax(scores, axis=-1) == targets))}
