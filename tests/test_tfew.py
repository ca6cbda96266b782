"""T-Few losses (models.tfew_losses) against hand-computed values and a NumPy reference, and the
multiple-choice batch layout (choices.multiple_choice_rows)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx

from mhr_jax import choices, data, models, network, run_state, trainer

# One compiled program per configuration: op-by-op dispatch is slower on CPU.
tfew_losses = jax.jit(models.tfew_losses, static_argnums=4,
                      static_argnames=("length_norm", "mc_weight", "unlikely_weight"))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_tfew(logits, targets, weights, gold_choice, n_choices, length_norm=1.0):
  """Reference written from the definitions, one example and one choice at a time."""
  logp = _log_softmax(logits.astype(np.float64))
  n_ex = len(gold_choice)
  lm_sum = lm_n = ul_sum = ul_n = mc_sum = 0.0
  for b in range(n_ex):
    scores = []
    for c in range(n_choices):
      r = b * n_choices + c
      toks = [(t, logp[r, i, t]) for i, t in enumerate(targets[r]) if weights[r, i] > 0]
      if not toks:
        continue
      nll = -sum(lp for _, lp in toks)
      scores.append((c, nll / len(toks) ** length_norm))
      if c == gold_choice[b]:
        lm_sum += nll
        lm_n += len(toks)
      else:
        ul_sum += sum(-math.log(1 - math.exp(lp) + 0.01) for _, lp in toks)
        ul_n += len(toks)
    neg = np.array([-s for _, s in scores])
    gold_pos = [c for c, _ in scores].index(gold_choice[b])
    mc_sum += -(neg[gold_pos] - np.log(np.exp(neg).sum()))
  return lm_sum / lm_n, mc_sum / n_ex, ul_sum / ul_n


def test_uniform_logits_by_hand():
  # One example, two choices, vocabulary of 4 with all-zero logits: every token has p = 1/4.
  # Gold choice: 2 tokens; wrong choice: 3 tokens. Length-normalised scores are both log 4, so
  # MC = log 2; LM = log 4; UL = -log(1 - 1/4 + 0.01) = -log 0.76.
  logits = jnp.zeros((2, 3, 4))
  targets = jnp.array([[2, 1, 0], [3, 2, 1]])
  weights = (targets > 0).astype(jnp.float32)
  loss, m = tfew_losses(logits, targets, weights, jnp.array([1, 0]), 2)
  assert float(m["lm_loss"]) == pytest.approx(math.log(4), abs=1e-6)
  assert float(m["mc_loss"]) == pytest.approx(math.log(2), abs=1e-6)
  assert float(m["unlikely_loss"]) == pytest.approx(-math.log(0.76), abs=1e-6)
  assert float(loss) == pytest.approx(math.log(4) + math.log(2) - math.log(0.76), abs=1e-6)
  # Without length normalisation the 3-token wrong choice scores 3 log 4 against 2 log 4:
  # MC = -log(4^-2 / (4^-2 + 4^-3)) = log(1 + 1/4).
  _, m = tfew_losses(logits, targets, weights, jnp.array([1, 0]), 2, length_norm=0.0)
  assert float(m["mc_loss"]) == pytest.approx(math.log(1.25), abs=1e-6)


def test_matches_numpy_reference_with_padded_choice():
  rng = np.random.default_rng(0)
  n_ex, n_choices, length, vocab = 2, 3, 5, 7
  logits = rng.normal(size=(n_ex * n_choices, length, vocab)).astype(np.float32) * 2
  targets = rng.integers(2, vocab, size=(n_ex * n_choices, length))
  lengths = [3, 5, 1, 4, 2, 0]  # example 1's third choice is padding
  for r, n in enumerate(lengths):
    targets[r, n:] = 0
  weights = (targets > 0).astype(np.float32)
  gold_choice = [2, 0]
  is_correct = np.zeros(n_ex * n_choices, np.int32)
  for b, c in enumerate(gold_choice):
    is_correct[b * n_choices + c] = 1
  for norm in (1.0, 0.5):
    loss, m = tfew_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                 jnp.asarray(is_correct), n_choices, length_norm=norm,
                                 mc_weight=0.5, unlikely_weight=2.0)
    lm, mc, ul = _numpy_tfew(logits, targets, weights, gold_choice, n_choices, norm)
    np.testing.assert_allclose([m["lm_loss"], m["mc_loss"], m["unlikely_loss"]], [lm, mc, ul],
                               rtol=1e-5)
    assert float(loss) == pytest.approx(lm + 0.5 * mc + 2.0 * ul, rel=1e-5)


def test_authors_unlikelihood_differs_by_a_constant():
  """The authors' UL (t0_encoder_decoder.py) sums -log(1.01 - exp(-100)) over masked positions
  too; the difference to ours is that constant times n_masked / n_wrong."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 3, 5)).astype(np.float32)
  targets = np.array([[2, 3, 1], [4, 1, 0], [2, 1, 0], [3, 3, 1]])
  weights = (targets > 0).astype(np.float32)
  is_correct = np.array([1, 0, 0, 1])
  _, m = tfew_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                            jnp.asarray(is_correct), 2)
  logp = np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  cand = np.where(weights > 0, logp, 0.0) + (weights == 0) * -100.0
  cand[is_correct > 0] = -100.0
  theirs = -np.log(1 - np.exp(cand) + 1e-2).sum() / (cand != -100).sum()
  n_masked, n_wrong = (cand == -100).sum(), (cand != -100).sum()
  assert float(m["unlikely_loss"]) == pytest.approx(theirs + math.log(1.01) * n_masked / n_wrong,
                                                    rel=1e-5)


def _choice_batch(seed, n_choices, is_correct):
  """A multiple-choice batch of random tokens (vocabulary 32): 2 examples of 6 input tokens,
  each repeated once per choice, and one 4-token target (ending with EOS) per row."""
  rng = np.random.default_rng(seed)
  inputs = np.repeat(rng.integers(2, 32, size=(2, 6)), n_choices, axis=0)  # [B, Li] -> [B*C, Li]
  targets = rng.integers(2, 32, size=(2 * n_choices, 4))
  targets[:, 3] = 1
  return {"encoder_input_tokens": jnp.asarray(inputs, jnp.int32),
          "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
          "decoder_input_tokens": models.shift_right(jnp.asarray(targets, jnp.int32)),
          "is_correct": jnp.array(is_correct)}


def test_loss_fn_encodes_once_per_example():
  cfg = network.preset("tiny", vocab_size=32, dropout_rate=0.0, num_layers=1)
  model = network.T5(cfg, rngs=nnx.Rngs(0))
  n_choices = 3
  batch = _choice_batch(2, n_choices, [0, 1, 0, 0, 0, 1])

  @nnx.jit
  def both(model, batch):  # one compiled program: op-by-op dispatch is slower on CPU
    got, _ = models.tfew_loss_fn(model, batch, n_choices, deterministic=True)
    logits = models.forward(model, batch, deterministic=True)
    want, _ = models.tfew_losses(logits, batch["decoder_target_tokens"],
                                 models.loss_weights(batch), batch["is_correct"], n_choices)
    return got, want

  got, want = both(model, batch)
  assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_train_config_loss_selects_the_step_loss():
  """``TrainConfig.loss`` picks the loss the step minimises: "tfew" gives the T-Few sum with the
  configured weights on a multiple-choice batch, "lm" the token cross-entropy (which differs)."""
  cfg = network.preset("tiny", vocab_size=32, dropout_rate=0.0, num_layers=1)
  model = network.T5(cfg, rngs=nnx.Rngs(0))
  n_choices = 2
  batch = _choice_batch(3, n_choices, [1, 0, 0, 1])
  tfew = run_state._loss(trainer.TrainConfig(loss="tfew", mc_loss=0.5, unlikely_loss=2.0),
                         n_choices)
  lm = run_state._loss(trainer.TrainConfig())

  @nnx.jit
  def losses(model, batch):  # one compiled program: op-by-op dispatch is slower on CPU
    return tfew(model, batch), lm(model, batch)

  (got, metrics), (lm_loss, _) = losses(model, batch)
  want = metrics["lm_loss"] + 0.5 * metrics["mc_loss"] + 2.0 * metrics["unlikely_loss"]
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert float(metrics["mc_loss"]) > 0.1
  assert abs(float(got) - float(lm_loss)) > 0.1


def test_multiple_choice_rows_layout():
  vocab = seqio.ByteVocabulary()
  table = data.TaskIdTable(("a", "b"))
  examples = [{"inputs": [10, 11, 1], "answer_choices": [b"yes", b"no"], "label": 1,
               "task_name": b"b"},
              {"inputs": [12, 1], "answer_choices": ["x", "yy", "zzzzzzzz"], "label": 0,
               "task_name": "a"}]
  rows = choices.multiple_choice_rows(examples, vocab, table, {"inputs": 4, "targets": 5}, 3)
  assert set(rows) == set(choices.MULTIPLE_CHOICE_KEYS)
  assert rows["example_ids"].tolist() == [0, 0, 0, 1, 1, 1]
  assert rows["choice_ids"].tolist() == [0, 1, 2, 0, 1, 2]
  assert rows["is_correct"].tolist() == [0, 1, 0, 1, 0, 0]
  assert rows["choice_mask"].tolist() == [1, 1, 0, 1, 1, 1]
  assert rows["task_ids"].tolist() == [1, 1, 1, 0, 0, 0]
  assert rows["encoder_input_tokens"][2].tolist() == [10, 11, 1, 0]
  assert vocab.decode(rows["decoder_target_tokens"][1].tolist()) == "no"
  assert rows["decoder_target_tokens"][5].tolist()[-1] == 1  # truncated to 5, EOS kept
  assert rows["decoder_loss_weights"][2].sum() == 0
  shifted = [0] + rows["decoder_target_tokens"][1][:4].tolist()
  assert rows["decoder_input_tokens"][1].tolist() == shifted
  with pytest.raises(ValueError, match="3 answer choices.*n_choices=2"):
    choices.multiple_choice_rows(examples, vocab, table, {"inputs": 4, "targets": 5}, 2)
