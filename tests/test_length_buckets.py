"""Length buckets: a batch is cut to the smallest bucket that holds it, which drops padding only."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhr_jax import errors, length_buckets, models, network, trainer

LENGTHS = {"inputs": 16, "targets": 8}


def _batch(input_lengths, target_lengths, seed=0):
  rng = np.random.default_rng(seed)
  b = len(input_lengths)
  enc = np.zeros((b, LENGTHS["inputs"]), np.int32)
  tgt = np.zeros((b, LENGTHS["targets"]), np.int32)
  for i, (li, lt) in enumerate(zip(input_lengths, target_lengths)):
    enc[i, :li] = rng.integers(2, 40, li)
    tgt[i, :lt] = rng.integers(2, 40, lt)
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
          "decoder_input_tokens": np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
          "decoder_loss_weights": (tgt > 0).astype(np.float32),
          "task_ids": np.arange(b, dtype=np.int32)}


def test_bucket_choice_and_cut():
  buckets = length_buckets.check({"inputs": [8, 4], "targets": [3]}, LENGTHS)
  assert buckets == {"inputs": (4, 8), "targets": (3,)}
  batch = _batch([5, 2, 7], [3, 1, 2])
  cut = length_buckets.trim(batch, buckets)
  assert cut["encoder_input_tokens"].shape == (3, 8)  # longest input 7 -> bucket 8
  assert cut["decoder_target_tokens"].shape == (3, 3)
  assert cut["decoder_input_tokens"].shape == cut["decoder_loss_weights"].shape == (3, 3)
  np.testing.assert_array_equal(cut["encoder_input_tokens"], batch["encoder_input_tokens"][:, :8])
  np.testing.assert_array_equal(cut["task_ids"], batch["task_ids"])
  # Longer than every bucket: the feature length. Stacked (vmapped) batches cut on the last axis.
  long = length_buckets.trim(_batch([16, 1], [4, 1]), buckets)
  assert long["encoder_input_tokens"].shape == (2, 16)
  assert long["decoder_target_tokens"].shape == (2, 8)
  stacked = {k: np.stack([v, v]) for k, v in batch.items()}
  assert length_buckets.trim(stacked, buckets)["encoder_input_tokens"].shape == (2, 3, 8)
  # No buckets: unchanged.
  assert length_buckets.trim(batch, {})["encoder_input_tokens"].shape == (3, 16)


def test_bad_buckets_are_refused():
  with pytest.raises(errors.ConfigError, match=r"'inputs' buckets \[0, 20\].*'labels' is not a feature"):
    length_buckets.check({"inputs": (0, 8, 20), "labels": (4,)}, LENGTHS)
  with pytest.raises(errors.ConfigError, match="Bad length buckets"):
    trainer.DataConfig(mixture="m", feature_lengths=LENGTHS, length_buckets={"targets": (9,)})


def test_cut_batch_gives_the_same_loss():
  model = network.T5(network.preset("tiny", vocab_size=40, num_layers=1, dropout_rate=0.0),
                     rngs=nnx.Rngs(0))
  batch = _batch([5, 2, 7], [3, 1, 2])
  loss = nnx.jit(lambda m, b: models.loss_fn(m, b, deterministic=True)[0])
  full = loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
  cut = length_buckets.trim(batch, {"inputs": (8,), "targets": (4,)})
  np.testing.assert_allclose(loss(model, {k: jnp.asarray(v) for k, v in cut.items()}), full,
                             rtol=1e-5)


def test_cut_multiple_choice_batch_gives_the_same_tfew_loss():
  """T-Few batches (``choices.multiple_choice_rows``: a row per (example, choice)) cut to their
  buckets give the same LM, choice and unlikelihood losses as at the fixed lengths."""
  model = network.T5(network.preset("tiny", vocab_size=40, num_layers=1, dropout_rate=0.0),
                     rngs=nnx.Rngs(1))
  n_choices = 2
  batch = _batch([5, 5, 9, 9], [3, 2, 1, 4], seed=3)  # two examples, each input on its 2 rows
  batch["encoder_input_tokens"][1] = batch["encoder_input_tokens"][0]
  batch["encoder_input_tokens"][3] = batch["encoder_input_tokens"][2]
  batch["is_correct"] = np.array([1, 0, 0, 1], np.int32)

  @nnx.jit
  def losses(model, b):
    return models.tfew_loss_fn(model, b, n_choices, deterministic=True)

  full_loss, full_aux = losses(model, {k: jnp.asarray(v) for k, v in batch.items()})
  cut = length_buckets.trim(batch, {"inputs": (4, 12), "targets": (2, 4)})
  assert cut["encoder_input_tokens"].shape[-1] == 12 and cut["decoder_target_tokens"].shape[-1] == 4
  cut_loss, cut_aux = losses(model, {k: jnp.asarray(v) for k, v in cut.items()})
  np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-5)
  for name in full_aux:
    np.testing.assert_allclose(cut_aux[name], full_aux[name], rtol=1e-5, atol=1e-7, err_msg=name)
