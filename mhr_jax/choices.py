"""Batches of answer-choice tasks: every example repeated once per answer choice.

Rank classification (T0's evaluation: the answer is the choice the model scores highest) and the
T-Few training losses (unlikelihood on wrong choices, a length-normalised multiple-choice loss)
read a task's ``answer_choices`` and ``label`` features. The rows here extend the batch contract of
`mhr_jax.data` with ``example_ids`` (which example a row repeats), ``choice_ids`` and
``is_correct``; T-Few batches add ``choice_mask`` (0 on rows that pad an example with fewer
choices).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from mhr_jax.data import BATCH_KEYS, TaskIdTable, _leaf_tasks, get_examples, get_provider

RANK_KEYS = BATCH_KEYS + ("example_ids", "choice_ids", "is_correct")


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
