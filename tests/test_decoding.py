"""Greedy and beam-search decoding: HF parity, task ids per beam, cached = uncached decoding.

Each decoding function compiles once per model structure and input shape, so the tests share
shapes where they can.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_beam_reference as br
import hf_t5_reference as ref
from mhr_jax import decoding, hf_import, models, network

try:
  import torch  # noqa: F401
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False

live = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed: live beam parity skipped")


def set_eos_row(model, row):
  """Replaces the EOS row of the output projection, as ``hf_beam_reference`` does in HF."""
  row = jnp.asarray(row)
  if model.config.tie_word_embeddings:
    emb = model.token_embedder.embedding
    emb[...] = emb[...].at[models.EOS_ID].set(row)
  else:
    kernel = model.decoder.logits_dense.kernel
    kernel[...] = kernel[...].at[:, models.EOS_ID].set(row)
  return model


def beam_reference(variant):
  with np.load(ref.FIXTURES / f"t5_tiny_{variant}" / "beam_reference.npz") as f:
    return dict(f)


def fixture_model(variant):
  """A committed tiny fixture with its beam reference, EOS row applied."""
  r = beam_reference(variant)
  return set_eos_row(hf_import.load_t5(ref.FIXTURES / f"t5_tiny_{variant}"), r["eos_row"]), r


def compare_with_hf(model, r):
  enc = jnp.asarray(r["input_ids"], jnp.int32)
  for i, (early_stopping, length_penalty) in enumerate(br.SETTINGS):
    tokens, scores = decoding.beam_search(
        model, enc, None, num_beams=br.NUM_BEAMS, max_decode_len=br.DECODE_STEPS,
        early_stopping=early_stopping, length_penalty=length_penalty)
    where = f"early_stopping={early_stopping}, length_penalty={length_penalty}"
    np.testing.assert_array_equal(np.asarray(tokens), r[f"tokens_{i}"], err_msg=where)
    np.testing.assert_allclose(np.asarray(scores), r[f"scores_{i}"], atol=1e-5, err_msg=where)


def test_reference_exercises_finished_hypotheses():
  """The committed references end beams at several lengths and differ between settings."""
  for variant in ref.VARIANTS:
    r = beam_reference(variant)
    tokens = [r[f"tokens_{i}"] for i in range(len(br.SETTINGS))]
    lengths = {int(np.argmax(row == 1)) for t in tokens for row in t.reshape(-1, t.shape[-1])
               if (row == 1).any()}
    assert len(lengths) >= 4, lengths
    assert len({t.tobytes() for t in tokens}) >= 3


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_beam_search_matches_committed_hf_reference(variant):
  model, r = fixture_model(variant)
  compare_with_hf(model, r)


@pytest.fixture
def one_torch_thread():
  """On models this small, torch's worker threads cost far more than they compute."""
  import torch

  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@live
@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_beam_search_matches_live_hf(variant, tmp_path, one_torch_thread):
  hf_model = ref.build_model(variant, seed=7)
  ref.save_checkpoint(hf_model, variant, tmp_path)
  r = br.reference(hf_model, variant, seed=1)  # changes hf_model's EOS row after saving
  compare_with_hf(set_eos_row(hf_import.load_t5(tmp_path), r["eos_row"]), r)


def test_one_beam_is_greedy():
  model = hf_import.load_t5(ref.FIXTURES / "t5_tiny_v1_1")
  # EOS just above token 71: greedy rows then end after 1, 2 and 6 tokens, or never.
  set_eos_row(model, 1.1 * model.decoder.logits_dense.kernel[:, 71])
  enc = jnp.asarray(beam_reference("v1_1")["input_ids"], jnp.int32)
  steps = br.DECODE_STEPS
  plain = decoding.greedy_decode(model, enc, None, steps, use_cache=False)
  cached = decoding.greedy_decode(model, enc, None, steps)
  beam, _ = decoding.beam_search(model, enc, None, num_beams=1, max_decode_len=steps)
  plain = np.asarray(plain)
  assert (plain == models.EOS_ID).any() and not (plain == models.EOS_ID).any(-1).all()
  np.testing.assert_array_equal(np.asarray(cached), plain)
  np.testing.assert_array_equal(np.asarray(beam)[:, 0], plain)


class TaskBias(nnx.Module):
  """Stand-in adapter: adds ``x @ W[task]``, a different linear map for each task."""

  def __init__(self, in_dim, out_dim, num_tasks, rngs):
    init = jax.nn.initializers.normal(3.0 * in_dim ** -0.5)
    self.w = nnx.Param(init(rngs.params(), (num_tasks, in_dim, out_dim)))

  def __call__(self, x, task_ids, *, deterministic):
    del deterministic
    # [N, L, D] x [N, D, O] -> [N, L, O]
    return jnp.einsum("nld,ndo->nlo", x, self.w[...][task_ids])

  def delta_kernel(self, task_id):
    return self.w[...][task_id]


# An encoder layer, a decoder self-attention (cached keys/values) and a cross-attention key
# (computed once per example, then shared by its beams).
ADAPTED = ("encoder/layers_0/mlp/wo", "decoder/layers_0/self_attention/v",
           "decoder/layers_0/encoder_decoder_attention/k")
NUM_TASKS = 3


@functools.lru_cache(maxsize=None)
def routed_model():
  def factory(path, in_dim, out_dim, rngs):
    return TaskBias(in_dim, out_dim, NUM_TASKS, rngs) if path in ADAPTED else None

  cfg = network.T5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      dropout_rate=0.0)
  model = network.T5(cfg, rngs=nnx.Rngs(3), adapter_factory=factory)
  assert sum(isinstance(m, TaskBias) for _, m in nnx.iter_graph(model)) == len(ADAPTED)
  return model


def routed_inputs():
  enc = np.random.default_rng(5).integers(2, 64, (3, 10))
  enc[1, 6:] = 0
  return jnp.asarray(enc, jnp.int32), jnp.asarray([2, 0, 1], jnp.int32)


def test_task_ids_follow_their_example_through_the_beams():
  model = routed_model()
  enc, task_ids = routed_inputs()
  search = functools.partial(decoding.beam_search, model, num_beams=4, max_decode_len=6)
  tokens, scores = search(enc, task_ids)
  n = enc.shape[0]
  for b in range(n):
    # Example b alone (copies of it fill the batch, so the search is not compiled again).
    alone_tokens, alone_scores = search(jnp.repeat(enc[b:b + 1], n, 0), jnp.repeat(task_ids[b], n))
    np.testing.assert_array_equal(np.asarray(tokens[b]), np.asarray(alone_tokens[0]))
    np.testing.assert_allclose(np.asarray(scores[b]), np.asarray(alone_scores[0]), atol=1e-5)

  # Another task for example 1 changes its beams and nothing else.
  other_tokens, other_scores = search(enc, task_ids.at[1].set(1))
  assert not np.array_equal(np.asarray(other_tokens[1]), np.asarray(tokens[1]))
  for b in (0, 2):
    np.testing.assert_array_equal(np.asarray(other_tokens[b]), np.asarray(tokens[b]))
    np.testing.assert_allclose(np.asarray(other_scores[b]), np.asarray(scores[b]), atol=1e-6)

  uncached_tokens, uncached_scores = search(enc, task_ids, use_cache=False)
  np.testing.assert_array_equal(np.asarray(uncached_tokens), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(uncached_scores), np.asarray(scores), atol=1e-5)


@nnx.jit
def _full_logits(model, enc, dec, task_ids):
  return model.decode(model.encode(enc, task_ids), enc, dec, task_ids)


@functools.partial(nnx.jit, static_argnums=3)
def _init_cache(model, enc, task_ids, length):
  return decoding.init_cache(model, model.encode(enc, task_ids), enc, task_ids, length)


@nnx.jit
def _step(model, cache, tokens, position):
  return decoding.decode_step(model, cache, tokens, position)


def test_decode_step_logits_match_full_decoder():
  """Position by position, the cached decoder gives the teacher-forced logits (with adapters)."""
  model = routed_model()
  enc, task_ids = routed_inputs()
  dec = jnp.asarray(np.random.default_rng(6).integers(2, 64, (3, 7)), jnp.int32).at[:, 0].set(0)
  full = np.asarray(_full_logits(model, enc, dec, task_ids))
  cache = _init_cache(model, enc, task_ids, dec.shape[1])
  for i in range(dec.shape[1]):
    logits, cache = _step(model, cache, dec[:, i], jnp.int32(i))
    np.testing.assert_allclose(np.asarray(logits), full[:, i], rtol=1e-5, atol=1e-5)


def test_bad_early_stopping():
  model, r = fixture_model("v1_1")
  with pytest.raises(ValueError, match="early_stopping"):
    decoding.beam_search(model, jnp.asarray(r["input_ids"]), None, num_beams=2,
                         max_decode_len=3, early_stopping="sometimes")
