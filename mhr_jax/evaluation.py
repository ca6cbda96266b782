"""Evaluation through ``seqio.Evaluator``, as t5x runs it, with routing task ids on every example.

Each evaluation task gets a ``seqio.Evaluator`` that caches its pretokenized examples of the
evaluation split and runs the task's own metrics: ``metric_fns`` on predictions (decoded by the
task's vocabulary, then its ``postprocess_fn`` with the example), ``score_metric_fns`` on scores,
metrics that ask for auxiliary values, and metric objects; targets come from the examples'
``targets_pretokenized`` through ``postprocess_fn(..., is_target=True)``, so a target longer than
the feature length is scored whole. Results go to seqio's loggers (Python logging, TensorBoard,
JSON) in ``log_dir``, which the trainer sets to ``MODEL_DIR/inference_eval`` as t5x does.

One ``seqio.Evaluator`` per task, not one per mixture, each with its own feature converter
(`RoutedFeatureConverter`) that adds the routing id to every example as ``task_ids``: the id in
the run's task table of the name the example carries in its ``task_name`` feature (a task may
route through another task's row, as T0's per-template evaluation tasks route through their
dataset's few-shot task), of the task's own name when its examples carry none, or the zero-shot
override. The model functions read the ids from the batch.

The model functions (`ModelFns`), the ``predict_fn`` / ``predict_with_aux_fn`` / ``score_fn``
that ``seqio.Evaluator.evaluate`` calls with a task's cached, enumerated examples:

* ``predict_fn``: greedy decoding, or beam search with ``num_beams > 1`` (the best beam).
* ``predict_with_aux_fn``: the same predictions and ``{"scores": ...}``, each prediction's summed
  token log-likelihood under the model.
* ``score_fn``: for a task whose examples carry ``answer_choices`` (rank classification, T0),
  the length-normalised log-likelihood of every choice (``[C]`` per example, the input encoded
  once: ``decoding.score_choices``), which `mhr_jax.choices.rank_classification_accuracy` turns
  into accuracy; for any other task, the summed log-likelihood of the target (t5x's
  ``score_batch``).

With length buckets configured, the examples are batched in order of input length and each
batch is cut to its buckets (``length_buckets.trim``) before the model sees it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from flax import nnx

from mhr_jax import data, decoding, errors, length_buckets, models, network, protocol

log = logging.getLogger("mhr_jax.evaluation")

LOG_SUBDIR = "inference_eval"


class TensorBoardLogger(seqio.Logger):
  """seqio's ``TensorBoardLogger`` layout (``<log_dir>/<task>``, tags ``eval/<metric>``), written
  through tensorboardX: seqio's own logger needs the ``tensorboard`` package for ``tf.summary``,
  which this project does not install. Scalars and text are written; other values are skipped.
  """

  def __init__(self, output_dir: str):
    super().__init__(output_dir)
    self._writers = {}

  def __call__(self, task_name, step, metrics, dataset, inferences, targets) -> None:
    del dataset, inferences, targets
    from tensorboardX import SummaryWriter

    if task_name not in self._writers:
      self._writers[task_name] = SummaryWriter(os.path.join(self.output_dir, task_name))
    writer = self._writers[task_name]
    step = -1 if step is None else step
    for name, value in metrics.items():
      if isinstance(value, seqio.metrics.Scalar):
        writer.add_scalar(f"eval/{name}", float(np.asarray(value.value)), step)
      elif isinstance(value, seqio.metrics.Text):
        writer.add_text(f"eval/{name}", value.textdata, step)
    writer.flush()


# The loggers t5x's gin configs give seqio.Evaluator (t5x/configs/runs/*.gin).
LOGGERS = (seqio.PyLoggingLogger, TensorBoardLogger, seqio.JSONLogger)


class RoutedFeatureConverter(seqio.EncDecFeatureConverter):
  """seqio's unpacked encoder-decoder features plus ``task_ids``, each example's routing id.

  Args:
    table: the run's task-id table.
    task: the task converted; its name routes examples without a ``task_name`` feature.
    override: the id every example gets instead (zero-shot evaluation through one row).

  An example whose routing name is not in ``table`` gets id -1; `TaskEvaluator` refuses it.
  """

  MODEL_FEATURES = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      "task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
  }

  def __init__(self, table: data.TaskIdTable, task: str, override: Optional[int] = None,
               **kwargs):
    super().__init__(pack=False, **kwargs)
    self.default_id = (override if override is not None
                       else table.as_dict().get(task, -1))
    self.lookup = None
    if override is None and table.names:
      self.lookup = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
          tf.constant(table.names), tf.range(table.n_tasks, dtype=tf.int32)), default_value=-1)

  def _task_id(self, features) -> tf.Tensor:
    if self.lookup is not None and data.TASK_NAME in features:
      return self.lookup.lookup(features[data.TASK_NAME])
    return tf.constant(self.default_id, tf.int32)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
    ds = ds.map(lambda ex: {**ex, "task_ids": self._task_id(ex)})
    return super()._convert_features(ds, task_feature_lengths)

  def _convert_example(self, features):
    return {**super()._convert_example(features), "task_ids": features["task_ids"]}

  def get_model_feature_lengths(self, task_feature_lengths) -> dict[str, int]:
    return {**super().get_model_feature_lengths(task_feature_lengths), "task_ids": 0}


# ----------------------------------------------------------------------------- compiled model calls


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_decode_len", "num_beams", "eos_id"))
def _generate(graphdef, state, encoder_input_tokens, task_ids, *, max_decode_len, num_beams,
              eos_id):
  model = nnx.merge(graphdef, state)
  if num_beams > 1:
    tokens, _ = decoding.beam_search(model, encoder_input_tokens, task_ids, num_beams=num_beams,
                                     max_decode_len=max_decode_len, eos_id=eos_id)
    return tokens[:, 0]  # [B, K, T] -> the best beam [B, T]
  return decoding.greedy_decode(model, encoder_input_tokens, task_ids, max_decode_len,
                                eos_id=eos_id)


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, batch):
  return models.score_targets(nnx.merge(graphdef, state), batch)


@functools.partial(jax.jit, static_argnums=0)
def _score_choices(graphdef, state, encoder_input_tokens, task_ids, choice_tokens):
  return decoding.score_choices(
      nnx.merge(graphdef, state), encoder_input_tokens, task_ids, choice_tokens)


def _batches(ds: tf.data.Dataset, batch_size: int, by_length: bool):
  """(indices [n], features padded to ``batch_size`` rows, n) of an enumerated dataset.

  With ``by_length`` the examples are batched in order of their input length, so that each
  batch's longest input is close to its others and length buckets cut away most padding; the
  indices carry every output back to its example, as ``seqio.Evaluator`` provides them for.
  """
  parts = list(ds.batch(1024).as_numpy_iterator())
  if not parts:
    return
  indices = np.concatenate([p[0] for p in parts])
  feats = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
  order = np.arange(len(indices))
  if by_length:
    tokens = feats["encoder_input_tokens"]
    # Position after the last non-padding token of each row.
    lengths = tokens.shape[1] - np.argmax(tokens[:, ::-1] != 0, axis=1)
    order = np.argsort(lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    n = len(rows)
    batch = {k: v[rows] for k, v in feats.items()}
    if n < batch_size:  # one program for every batch: fill with all-padding rows
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield indices[rows], batch, n


def _choice_tokens(choices: Sequence[Sequence[Any]], vocabulary: seqio.Vocabulary,
                   length: int) -> np.ndarray:
  """Answer choices of each example, tokenized with EOS and cut to ``length``: [N, C, length]."""
  n_choices = max(len(c) for c in choices)
  out = np.zeros((len(choices), n_choices, length), np.int32)
  for i, example_choices in enumerate(choices):
    for j, choice in enumerate(example_choices):
      choice = choice.decode() if isinstance(choice, bytes) else str(choice)
      ids = (list(vocabulary.encode(choice)) + [decoding.EOS_ID])[:length]
      out[i, j, :len(ids)] = ids
  return out


class ModelFns:
  """The ``predict_fn``, ``predict_with_aux_fn`` and ``score_fn`` of one task for one model.

  Args:
    model: the T5 evaluated (split once; every call runs compiled programs on its state).
    batch_size: examples per batch.
    max_decode_len: tokens generated per prediction (the targets feature length).
    num_beams: 1 for greedy decoding, more for beam search.
    buckets: length buckets (`length_buckets.check`); empty keeps the fixed lengths.
    choices: for rank classification, ``[N, C, Lt]`` tokens of every example's answer choices
      (index i of the task's cached examples), all-padding for missing choices.
    eos_id: the token that ends a prediction; -1 ends none, so every prediction runs
      ``max_decode_len`` tokens (the generation benchmark's equal work on both sides).
  """

  def __init__(self, model: network.T5, *, batch_size: int, max_decode_len: int,
               num_beams: int = 1, buckets: Optional[Mapping[str, Sequence[int]]] = None,
               choices: Optional[np.ndarray] = None, eos_id: int = decoding.EOS_ID):
    self._graphdef, self._state = nnx.split(model)
    self.eos_id = eos_id
    self.batch_size = batch_size
    self.max_decode_len = max_decode_len
    self.num_beams = num_beams
    self.buckets = dict(buckets or {})
    self.choices = choices

  def _decode(self, feats) -> np.ndarray:
    feats = length_buckets.trim(feats, self.buckets)
    return np.asarray(_generate(
        self._graphdef, self._state, jnp.asarray(feats["encoder_input_tokens"]),
        jnp.asarray(feats["task_ids"]), max_decode_len=self.max_decode_len,
        num_beams=self.num_beams, eos_id=self.eos_id))

  def _target_loglik(self, feats) -> np.ndarray:
    feats = length_buckets.trim(feats, self.buckets)
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "task_ids")
    ll, _ = _score(self._graphdef, self._state, {k: jnp.asarray(feats[k]) for k in keys})
    return np.asarray(ll)

  def predict_fn(self, ds: tf.data.Dataset, model_feature_shapes=None):
    """[(index, predicted tokens)] of every example."""
    del model_feature_shapes
    out = []
    for indices, feats, n in _batches(ds, self.batch_size, bool(self.buckets)):
      out.extend(zip(indices.tolist(), self._decode(feats)[:n].tolist()))
    return out

  def predict_with_aux_fn(self, ds: tf.data.Dataset, model_feature_shapes=None):
    """``predict_fn``'s output and ``{"scores": summed log-likelihood of each prediction}``."""
    del model_feature_shapes
    out, scores = [], []
    for indices, feats, n in _batches(ds, self.batch_size, bool(self.buckets)):
      tokens = self._decode(feats)
      scored = {"encoder_input_tokens": feats["encoder_input_tokens"],
                "task_ids": feats["task_ids"], "decoder_target_tokens": tokens,
                "decoder_input_tokens": np.asarray(models.shift_right(jnp.asarray(tokens)))}
      out.extend(zip(indices.tolist(), tokens[:n].tolist()))
      scores.extend(self._target_loglik(scored)[:n].tolist())
    return out, {"scores": scores}

  def score_fn(self, ds: tf.data.Dataset, model_feature_shapes=None):
    """[(index, score)]: per-choice normalised log-likelihoods, or the target's log-likelihood."""
    del model_feature_shapes
    out = []
    for indices, feats, n in _batches(ds, self.batch_size, bool(self.buckets)):
      if self.choices is None:
        out.extend(zip(indices.tolist(), self._target_loglik(feats)[:n].tolist()))
        continue
      out.extend(zip(indices.tolist(), self._choice_scores(indices, feats)[:n].tolist()))
    return out

  def _choice_scores(self, indices: np.ndarray, feats) -> np.ndarray:
    """[B, C] length-normalised log-likelihood of each answer choice; -inf for missing ones."""
    choices = np.zeros((self.batch_size,) + self.choices.shape[1:], np.int32)
    choices[:len(indices)] = self.choices[indices]
    lt = length_buckets.bucket_length(length_buckets.real_length(choices),
                                      self.buckets.get("targets", ()), choices.shape[-1])
    feats = length_buckets.trim(feats, self.buckets)
    ll, n = _score_choices(self._graphdef, self._state,
                           jnp.asarray(feats["encoder_input_tokens"]),
                           jnp.asarray(feats["task_ids"]), jnp.asarray(choices[..., :lt]))
    ll, n = np.asarray(ll, np.float64), np.asarray(n, np.float64)
    return np.where(n > 0, ll / np.maximum(n, 1.0), -np.inf)


# ----------------------------------------------------------------------------- evaluators


def leaf_tasks(names: Sequence[str]) -> list[str]:
  """The tasks of the listed seqio tasks and mixtures, each once, in order."""
  out = []
  for name in names:
    for task in data._leaf_tasks(data.get_provider(name)):
      if task.name not in out:
        out.append(task.name)
  return out


class TaskEvaluator:
  """A ``seqio.Evaluator`` for one task with its routing id, reusable across evaluations.

  Args:
    task: a registered seqio task.
    table: the run's task-id table (see `RoutedFeatureConverter`).
    data_cfg: the trainer's ``DataConfig`` (feature lengths, split, batch size, beams, cap,
      length buckets).
    split: the split evaluated (default ``data_cfg.eval_split``).
    task_id_override: evaluate every example through this routing row.
    log_dir: where seqio's loggers write; None logs nothing.

  Raises:
    errors.DataError: when an example routes through a name the table does not hold.
  """

  def __init__(self, task: str, table: data.TaskIdTable, data_cfg, *,
               split: Optional[str] = None, task_id_override: Optional[int] = None,
               log_dir: Optional[str] = None):
    self.task = seqio.TaskRegistry.get(task)
    self.data_cfg = data_cfg
    self.evaluator = seqio.Evaluator(
        task, feature_converter=RoutedFeatureConverter(table, task, task_id_override),
        eval_split=split or data_cfg.eval_split, sequence_length=dict(data_cfg.feature_lengths),
        num_examples=data_cfg.max_eval_examples, logger_cls=LOGGERS if log_dir else (),
        log_dir=log_dir, async_compute_metrics=False)
    self.n_examples = 0
    self.choices = self.labels = self.example_ids = self.outcome = None
    if self.evaluator.eval_tasks:
      examples = list(self.evaluator.cached_task_datasets[task].as_numpy_iterator())
      self.n_examples = len(examples)
      self._check_routing(examples, table)
      if examples and "answer_choices" in examples[0]:
        vocab = self.task.output_features["targets"].vocabulary
        self.choices = _choice_tokens([ex["answer_choices"] for ex in examples], vocab,
                                      data_cfg.feature_lengths["targets"])
        self.labels = np.asarray([int(ex["label"]) for ex in examples], np.int64)
        # The source example of each: its own feature where the task gives one, else its index.
        self.example_ids = np.asarray([int(ex.get(protocol.EXAMPLE_ID, i))
                                       for i, ex in enumerate(examples)], np.int64)

  def _check_routing(self, examples, table: data.TaskIdTable) -> None:
    ids = self.evaluator.cached_model_datasets[self.task.name].map(lambda i, ex: ex["task_ids"])
    if min(ids.as_numpy_iterator(), default=0) >= 0:
      return
    names = sorted({routing_name(ex, self.task.name) for ex in examples} - set(table.names))
    raise errors.DataError(f"Evaluation task {self.task.name!r} routes through {names}, which the "
                   f"task-id table {list(table.names)} does not hold (set a task_id_override "
                   "to evaluate it through one row)")

  def evaluate(self, model: network.T5, step: int = 0) -> Optional[dict[str, Any]]:
    """The task's metrics for ``model`` (None when the task has no split or metric to run).

    For rank classification it also keeps ``self.outcome``: ``example_ids`` (the source
    examples), ``predictions`` (the best-scoring choice) and ``labels`` of the examples, in the
    order of the evaluator's cache, for the dataset scores of `mhr_jax.protocol`.
    """
    if not self.evaluator.eval_tasks:
      return None
    cfg = self.data_cfg
    fns = ModelFns(model, batch_size=cfg.eval_batch_size,
                   max_decode_len=cfg.feature_lengths["targets"], num_beams=cfg.eval_num_beams,
                   buckets=length_buckets.check(cfg.length_buckets, cfg.feature_lengths),
                   choices=self.choices)
    scores = {}

    def score_fn(ds, model_feature_shapes=None):
      out = fns.score_fn(ds, model_feature_shapes)
      scores.update(out)
      return out

    metrics, _ = self.evaluator.evaluate(
        compute_metrics=True, step=step, predict_fn=fns.predict_fn, score_fn=score_fn,
        predict_with_aux_fn=fns.predict_with_aux_fn)
    self.outcome = None
    if self.choices is not None and len(scores) == self.n_examples:
      # [N, C] -> [N] the best choice of each example, by cache index.
      best = np.argmax(np.asarray([scores[i] for i in range(self.n_examples)]), axis=-1)
      self.outcome = {"example_ids": self.example_ids, "predictions": best,
                      "labels": self.labels}
    out = {k: _plain(v) for k, v in metrics.result()[self.task.name].items()}
    out["n_examples"] = self.n_examples
    return out


def routing_name(example: Mapping[str, Any], task: str) -> str:
  """The name an example routes through: its ``task_name`` feature, else its task's name."""
  name = example.get(data.TASK_NAME, task)
  return name.decode() if isinstance(name, bytes) else str(name)


def _plain(value):
  """A metric value as a Python number where it is one (for JSON results and reporters)."""
  if isinstance(value, seqio.metrics.Scalar):
    value = value.value
  if isinstance(value, (np.floating, np.integer)) or (
      isinstance(value, np.ndarray) and value.ndim == 0):
    return value.item()
  return value


def make_evaluators(table: data.TaskIdTable, data_cfg, *, split: Optional[str] = None,
                    tasks: Optional[Sequence[str]] = None,
                    task_id_override: Optional[int] = None,
                    log_dir: Optional[str] = None) -> list[TaskEvaluator]:
  """One `TaskEvaluator` per task of ``tasks`` (default ``data_cfg.eval_tasks``).

  Each example gets its routing id from ``table`` (`RoutedFeatureConverter`), or
  ``task_id_override`` (zero-shot MHR-mu has no routing, and LoRA ignores task ids; both accept
  any id).
  """
  names = leaf_tasks(tasks if tasks is not None else data_cfg.eval_tasks)
  if log_dir and jax.process_index() != 0:
    log_dir = None  # one host writes the logs
  return [TaskEvaluator(n, table, data_cfg, split=split, task_id_override=task_id_override,
                        log_dir=log_dir) for n in names]


def evaluate(model: network.T5, table: data.TaskIdTable, data_cfg, *,
             split: Optional[str] = None, tasks: Optional[Sequence[str]] = None,
             task_id_override: Optional[int] = None, log_dir: Optional[str] = None,
             step: int = 0, dataset_of: Optional[Callable[[str], Optional[str]]] = None,
             seed: int = 0) -> dict[str, dict[str, Any]]:
  """Every evaluation task's seqio metrics, ``{task: {metric: value, "n_examples": n}}``.

  With ``dataset_of``, the rank-classification tasks it maps to a held-out dataset (T0's
  templates, ``tasks.t0.dataset_of``) are also scored per dataset, under both protocols of
  `mhr_jax.protocol` (one template drawn per example with ``seed``, and the median over
  templates): ``{"t0_<dataset>": protocol.dataset_scores(...)}`` beside the templates' entries.

  Args:
    model: the T5 evaluated.
    table: the run's task-id table (routing ids of the tasks).
    data_cfg: the trainer's ``DataConfig``.
    split: the split evaluated (default ``data_cfg.eval_split``).
    tasks: tasks or mixtures (default ``data_cfg.eval_tasks``).
    task_id_override: evaluate every task through this routing row.
    log_dir: where seqio's loggers write (TensorBoard under ``log_dir/<task>``,
      ``<task>-metrics.jsonl``, and the examples with their predictions per step); None: no logs.
    step: the step the logs record.
    dataset_of: a task's held-out dataset, None for a task of none.
    seed: the run's seed, which draws the random template of each example.
  """
  results, outcomes = {}, {}
  for ev in make_evaluators(table, data_cfg, split=split, tasks=tasks,
                            task_id_override=task_id_override, log_dir=log_dir):
    metrics = ev.evaluate(model, step)
    if metrics is None:
      log.info("%s: no %s split or no metric; not evaluated", ev.task.name,
               split or data_cfg.eval_split)
      continue
    results[ev.task.name] = metrics
    if ev.outcome is not None:
      outcomes[ev.task.name] = ev.outcome
  if dataset_of is not None:
    results.update(protocol.grouped_dataset_scores(outcomes, dataset_of, seed=seed))
  return results


def log_dir_of(model_dir: str | os.PathLike) -> str:
  """Where a run's evaluation logs go: ``MODEL_DIR/inference_eval`` (t5x's place)."""
  return os.path.join(str(model_dir), LOG_SUBDIR)
