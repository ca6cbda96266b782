"""Evaluation through seqio.Evaluator: a user's task with every kind of metric, checked by hand.

The task's postprocess_fn reads a field of the example, it has a predict metric, a score metric
and a metric with auxiliary values, and some targets are longer than the targets feature length.
The expected metrics are computed here without the evaluation module: greedy decoding as a loop of
whole-model calls and log-likelihoods from NumPy log-softmax, with the routing id of the task.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

from mhr_jax import adapters, data, errors, evaluation, network, trainer

TASK = "evalseqio_user_task_v1"
VOCAB = seqio.ByteVocabulary()
LENGTHS = {"inputs": 12, "targets": 6}
EXAMPLES = [  # targets of 3 to 10 characters: with EOS, 6 tokens cut several of them
    {"inputs": "abcdef", "targets": "fed", "tag": "x"},
    {"inputs": "qrstuvw", "targets": "wvutsrqpon", "tag": "y"},
    {"inputs": "hello", "targets": "olleh!!", "tag": "x"},
    {"inputs": "zz", "targets": "zzzzzzzz", "tag": "z"},
    {"inputs": "mnop", "targets": "ponm", "tag": "y"},
]


def _postprocess(output, example=None, is_target=False):
  """Pairs the decoded string with the example's tag (seqio hands the example to both sides)."""
  del is_target
  return example["tag"].decode() + ":" + (output.decode() if isinstance(output, bytes) else output)


def tagged_match(targets, predictions):
  return {"tagged_match": 100.0 * np.mean([t == p for t, p in zip(targets, predictions)]),
          "target_chars": float(np.mean([len(t) for t in targets]))}


def mean_score(targets, scores):
  del targets
  return {"mean_score": float(np.mean(scores))}


def mean_prediction_loglik(targets, predictions, aux_values):
  del targets, predictions
  return {"mean_prediction_loglik": float(np.mean(aux_values["scores"]))}


def _register():
  if TASK in seqio.TaskRegistry.names():
    return

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({k: [ex[k] for ex in EXAMPLES] for k in EXAMPLES[0]})

  features = {"inputs": seqio.Feature(VOCAB, add_eos=True),
              "targets": seqio.Feature(VOCAB, add_eos=True)}
  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=features, postprocess_fn=_postprocess,
      metric_fns=[tagged_match, mean_score, mean_prediction_loglik])


def _model():
  cfg = adapters.AdapterConfig(mode="poly", n_tasks=3, n_skills=2, lora_rank=2)
  model = network.T5(network.preset("tiny", vocab_size=VOCAB.vocab_size, num_layers=1),
                     rngs=nnx.Rngs(0), adapter_factory=adapters.make_adapter_factory(cfg))
  rng = np.random.default_rng(0)
  for _, var in nnx.iter_graph(model):  # lora_b starts at 0: make the routing matter
    if isinstance(var, (adapters.AdapterParam, adapters.RouterParam)):
      var[...] = jnp.asarray(rng.normal(size=var.shape), var.dtype)
  return model


def _tokens(text, length):
  ids = list(VOCAB.encode(text))[:length - 1] + [1]  # seqio: trim, then EOS (append_eos_after_trim)
  return np.pad(ids, (0, length - len(ids)))


def _by_hand(model, task_id):
  """(predicted strings, their log-likelihoods, target log-likelihoods), without the evaluator."""
  forward = nnx.jit(lambda m, enc, dec, ids: m(enc, dec, ids))
  enc = np.stack([_tokens(ex["inputs"], LENGTHS["inputs"]) for ex in EXAMPLES]).astype(np.int32)
  tgt = np.stack([_tokens(ex["targets"], LENGTHS["targets"]) for ex in EXAMPLES]).astype(np.int32)
  ids = np.full(len(EXAMPLES), task_id, np.int32)

  def loglik(targets):
    dec = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    logits = np.asarray(forward(model, enc, dec, ids), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (token * (targets > 0)).sum(-1)

  pred = np.zeros_like(tgt)  # greedy: one whole-model call per position
  done = np.zeros(len(EXAMPLES), bool)
  for i in range(LENGTHS["targets"]):
    dec = np.pad(pred[:, :-1], ((0, 0), (1, 0)))
    nxt = np.asarray(forward(model, enc, dec, ids))[:, i].argmax(-1)
    pred[:, i] = np.where(done, 0, nxt)
    done |= pred[:, i] == 1
  strings = [VOCAB.decode([t for t in row.tolist() if t != 0]) for row in pred]
  return strings, loglik(pred), loglik(tgt)


def test_user_task_metrics_through_seqio_evaluator(tmp_path):
  _register()
  model = _model()
  table = data.TaskIdTable(("another_task", TASK, "third_task"))  # the task's routing id is 1
  cfg = trainer.DataConfig(mixture=TASK, eval_tasks=(TASK,), feature_lengths=LENGTHS,
                           eval_batch_size=4, length_buckets={"inputs": (8,)})
  got = evaluation.evaluate(model, table, cfg, log_dir=str(tmp_path), step=7)[TASK]

  predictions, prediction_ll, target_ll = _by_hand(model, task_id=1)
  targets = [f"{ex['tag']}:{ex['targets']}" for ex in EXAMPLES]  # whole, not cut to 6 tokens
  hits = [f"{ex['tag']}:{p}" == t for ex, p, t in zip(EXAMPLES, predictions, targets)]
  assert got["n_examples"] == len(EXAMPLES)
  assert got["target_chars"] == np.mean([len(t) for t in targets])
  assert got["tagged_match"] == 100.0 * np.mean(hits)
  np.testing.assert_allclose(got["mean_score"], np.mean(target_ll), rtol=1e-5)
  np.testing.assert_allclose(got["mean_prediction_loglik"], np.mean(prediction_ll), rtol=1e-5)
  # Through another routing row the scores change: the task id reached the model.
  _, _, other_ll = _by_hand(model, task_id=2)
  assert not np.isclose(np.mean(other_ll), got["mean_score"], rtol=1e-4)

  # seqio's loggers, as t5x writes them: metrics JSON lines, TensorBoard events per task.
  lines = (tmp_path / f"{TASK}-metrics.jsonl").read_text().splitlines()
  logged = json.loads(lines[-1])
  assert logged["step"] == 7
  np.testing.assert_allclose(logged["mean_score"], got["mean_score"], rtol=1e-6)
  assert list((tmp_path / TASK).glob("events.out.tfevents.*"))
  # The examples with their postprocessed predictions: the greedy strings computed by hand.
  rows = [json.loads(line) for line in (tmp_path / f"{TASK}-000007.jsonl").read_text().splitlines()]
  assert [r["prediction"] for r in rows] == [
      f"{ex['tag']}:{p}" for ex, p in zip(EXAMPLES, predictions)]
  assert [r["target"] for r in rows] == targets


def test_task_outside_the_table_is_refused():
  _register()
  cfg = trainer.DataConfig(mixture=TASK, eval_tasks=(TASK,), feature_lengths=LENGTHS)
  with pytest.raises(errors.DataError, match=f"routes through \\['{TASK}'\\].*task_id_override"):
    evaluation.make_evaluators(data.TaskIdTable(("another_task",)), cfg)
