"""Shared-encoder rank classification equals scoring every (input, choice) pair on its own."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhr_jax import adapters, decoding, models, network


def _routed_model():
  cfg = adapters.AdapterConfig(mode="mhr", n_tasks=3, n_skills=3, n_splits=2, lora_rank=2)
  model = network.T5(network.preset("tiny", vocab_size=50, num_layers=1),
                     rngs=nnx.Rngs(0), adapter_factory=adapters.make_adapter_factory(cfg))
  rng = np.random.default_rng(1)
  for _, var in nnx.iter_graph(model):  # lora_b starts at 0: make every adapter matter
    if isinstance(var, (adapters.AdapterParam, adapters.RouterParam)):
      var[...] = jnp.asarray(0.5 * rng.normal(size=var.shape), var.dtype)
  return model


def _inputs(b=4, c=3, li=10, lt=5, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, 50, (b, li)).astype(np.int32)
  enc[:, 7:] = 0  # padding
  enc[1, 4:] = 0
  choices = rng.integers(2, 50, (b, c, lt)).astype(np.int32)
  lengths = rng.integers(1, lt + 1, (b, c))  # choices of different lengths, EOS last
  for i in range(b):
    for j in range(c):
      choices[i, j, lengths[i, j] - 1] = decoding.EOS_ID
      choices[i, j, lengths[i, j]:] = 0
  choices[3, 2] = 0  # an all-padding choice (an example with fewer choices)
  task_ids = np.array([2, 0, 1, 2], np.int32)
  return enc, choices, task_ids


def test_shared_encoder_scores_equal_the_repeated_path():
  model = _routed_model()
  enc, choices, task_ids = _inputs()
  b, c, lt = choices.shape
  ll, n = decoding.score_choices(model, jnp.asarray(enc), jnp.asarray(task_ids),
                                 jnp.asarray(choices))
  # Repeated path: every (input, choice) pair as its own row through the whole model.
  rows = {"encoder_input_tokens": jnp.asarray(np.repeat(enc, c, 0)),
          "decoder_target_tokens": jnp.asarray(choices.reshape(b * c, lt)),
          "decoder_input_tokens": models.shift_right(jnp.asarray(choices.reshape(b * c, lt))),
          "task_ids": jnp.asarray(np.repeat(task_ids, c))}
  ref_ll, ref_n = nnx.jit(models.score_targets)(model, rows)
  ref_ll, ref_n = np.asarray(ref_ll).reshape(b, c), np.asarray(ref_n).reshape(b, c)
  np.testing.assert_allclose(np.asarray(ll), ref_ll, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(n), ref_n)
  scores = np.asarray(ll) / np.maximum(np.asarray(n), 1)
  ref_scores = ref_ll / np.maximum(ref_n, 1)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  valid = ref_n > 0
  pred = np.argmax(np.where(valid, scores, -np.inf), -1)
  np.testing.assert_array_equal(pred, np.argmax(np.where(valid, ref_scores, -np.inf), -1))
  # The routing follows each input's task id: another id for input 0 changes only its scores.
  other, _ = decoding.score_choices(model, jnp.asarray(enc), jnp.asarray(task_ids).at[0].set(1),
                                    jnp.asarray(choices))
  assert not np.allclose(np.asarray(other)[0], np.asarray(ll)[0])
  np.testing.assert_allclose(np.asarray(other)[1:], np.asarray(ll)[1:], rtol=1e-5, atol=1e-5)
