"""The trainer's evaluation: rank classification against a direct computation, generation
against the decoders."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx

from mhr_jax import data, decoding, evaluation, models, network, protocol, trainer

TASK = "t0_rte_mnli_crowdsource"


@pytest.fixture(scope="module")
def t0_root(shared_data):
  if not (shared_data / "t0_heldout").is_dir() or not (shared_data / "tokenizer").is_dir():
    pytest.skip(f"T0 data or tokenizer not under {shared_data}")
  return shared_data


def test_rank_classification_matches_direct_scoring(t0_root):
  cfg = trainer.DataConfig(mixture=TASK, eval_tasks=(TASK,), t0_data_dir=str(t0_root),
                           feature_lengths={"inputs": 96, "targets": 8}, eval_batch_size=8,
                           max_eval_examples=6)
  cfg.register()
  model = network.T5(network.preset("tiny", vocab_size=32128, d_model=32, d_kv=8, d_ff=64,
                                    num_layers=1), rngs=nnx.Rngs(3))
  table = data.TaskIdTable((TASK,))
  got = evaluation.evaluate(model, table, cfg)[TASK]
  # Direct: every (example, choice) scored alone, length-normalised, best choice against the label.
  examples = list(data.get_examples(TASK, "validation", cfg.feature_lengths).as_numpy_iterator())
  examples = examples[:6]
  vocab = seqio.TaskRegistry.get(TASK).output_features["targets"].vocabulary
  hits = []
  for ex in examples:
    scores = []
    for choice in ex["answer_choices"]:
      target = np.asarray(list(vocab.encode(choice.decode())) + [1], np.int32)[None]
      enc = np.asarray(ex["inputs"], np.int32)[None, :96]
      logits = np.asarray(model(enc, np.asarray(models.shift_right(target))), np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      ll = np.take_along_axis(logp, target[..., None], -1).sum()
      scores.append(ll / target.shape[1])
    hits.append(int(np.argmax(scores)) == int(ex["label"]))
  assert got["n_examples"] == 6
  assert got["accuracy"] == pytest.approx(100.0 * np.mean(hits))


def test_generation_evaluation_gives_the_decoders_predictions(prediction_task):
  """Greedy and beam-search evaluation predict what the decoders give for the same inputs."""
  lengths = {"inputs": 16, "targets": 10}
  model = network.T5(network.preset("tiny", vocab_size=259, d_model=32, d_kv=8, d_ff=64,
                                    num_layers=1), rngs=nnx.Rngs(0))
  table = data.TaskIdTable((prediction_task,))
  examples = list(data.get_examples(prediction_task, "test", lengths).as_numpy_iterator())
  enc = np.zeros((8, lengths["inputs"]), np.int32)
  for row, ex in zip(enc, examples):
    row[:len(ex["inputs"])] = ex["inputs"][:lengths["inputs"]]
  ids = jnp.zeros((8,), jnp.int32)
  vocab = seqio.TaskRegistry.get(prediction_task).output_features["targets"].vocabulary
  direct = {1: decoding.greedy_decode(model, jnp.asarray(enc), ids, lengths["targets"]),
            2: decoding.beam_search(model, jnp.asarray(enc), ids, num_beams=2,
                                    max_decode_len=lengths["targets"])[0][:, 0]}
  for beams, tokens in direct.items():
    want = [vocab.decode([t for t in row.tolist()[:(row.tolist() + [1]).index(1)] if t])
            for row in np.asarray(tokens)]
    cfg = trainer.DataConfig(mixture=prediction_task, eval_tasks=(prediction_task,),
                             feature_lengths=lengths, eval_batch_size=8, eval_num_beams=beams)
    got = evaluation.evaluate(model, table, cfg, split="test")[prediction_task]
    assert got["n"] == 8
    assert got["predictions"] == want, beams
    assert any(want), "an untrained model still predicts some text"


def _direct_predictions(model, examples, vocab, lengths):
  """Best choice of each example, every (example, choice) pair through the whole model at the
  fixed lengths (one compiled call), length-normalised log-likelihood in NumPy."""
  rows = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex["answer_choices"]))]
  enc = np.zeros((len(rows), lengths["inputs"]), np.int32)
  tgt = np.zeros((len(rows), lengths["targets"]), np.int32)
  for r, (i, c) in enumerate(rows):
    inputs = examples[i]["inputs"][:lengths["inputs"]]
    enc[r, :len(inputs)] = inputs
    target = (list(vocab.encode(examples[i]["answer_choices"][c].decode())) + [1])
    tgt[r, :len(target)] = target[:lengths["targets"]]
  logits = np.asarray(nnx.jit(lambda m, e, d: m(e, d))(
      model, jnp.asarray(enc), models.shift_right(jnp.asarray(tgt))), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  ll = (np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * (tgt > 0)).sum(-1)
  normalised = ll / (tgt > 0).sum(-1)
  best = np.zeros(len(examples), np.int64)
  for i in range(len(examples)):
    mine = [r for r, (j, _) in enumerate(rows) if j == i]
    best[i] = int(np.argmax(normalised[mine]))
  return best


def test_t0_dataset_scores_from_source_rows(t0_root):
  """COPA's templates as one dataset score: each example's id is its row of the validation file
  (some templates skip rows), predictions are the direct scoring's, and the dataset entry is the
  protocol's scores of those outcomes with the given seed."""
  from tasks import t0

  lengths = {"inputs": 64, "targets": 16}
  cfg = trainer.DataConfig(mixture="t0_copa", eval_tasks=("t0_copa",), t0_data_dir=str(t0_root),
                           feature_lengths=lengths, eval_batch_size=8, max_eval_examples=4)
  cfg.register()
  model = network.T5(network.preset("tiny", vocab_size=32128, d_model=32, d_kv=8, d_ff=64,
                                    num_layers=1), rngs=nnx.Rngs(3))
  table = data.TaskIdTable.from_mixture("t0_copa")
  # All rows, "effect" rows only, "cause" rows only.
  tasks = ["t0_copa_exercise", "t0_copa_what_could_happen_next_c1_or_c2",
           "t0_copa_which_may_be_caused_by"]
  got = evaluation.evaluate(model, table, cfg, tasks=tasks, dataset_of=t0.dataset_of, seed=5)
  source = [json.loads(line) for line in
            (t0_root / "t0_heldout/eval/super_glue/COPA/val.jsonl").read_text().splitlines()]
  per_template = {}
  for task in tasks:
    examples = list(data.get_examples(task, "validation", lengths).as_numpy_iterator())[:4]
    ids = np.asarray([ex["example_id"] for ex in examples])
    for ex, i in zip(examples, ids):  # the id names the row the prompt was rendered from
      assert source[i]["premise"][:-1] in ex["inputs_pretokenized"].decode(), (task, i)
    vocab = seqio.TaskRegistry.get(task).output_features["targets"].vocabulary
    per_template[task] = {"example_ids": ids, "labels": np.asarray([ex["label"] for ex in examples]),
                          "predictions": _direct_predictions(model, examples, vocab, lengths)}
  # The cause-only template starts at the first "cause" row (the first rows are "effect" ones).
  assert per_template[tasks[2]]["example_ids"][0] > per_template[tasks[0]]["example_ids"][0]
  want = protocol.dataset_scores(per_template, seed=5, dataset="copa")
  assert got["t0_copa"] == pytest.approx(want)
  assert want["n_templates"] == 3 and want["n_examples"] > 4
