"""Analysis measures on cases with a known answer, and the plots they draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhr_jax import adapters, analysis, network

LAYERS = r"(self_attention|encoder_decoder_attention)/(q|v)$"  # 4 adapted layers: a quick compile
CFG = network.preset("tiny", vocab_size=259, d_model=16, d_kv=8, d_ff=32, num_heads=2,
                     num_layers=1, dropout_rate=0.0)


def _model(mode, n_tasks=2, n_skills=1):
  cfg = adapters.AdapterConfig(mode=mode, n_tasks=n_tasks, n_skills=n_skills, n_splits=1,
                               lora_rank=2, layers=LAYERS)
  model = network.T5(CFG, rngs=nnx.Rngs(0), adapter_factory=adapters.make_adapter_factory(cfg))
  # lora_b starts at 0, which leaves lora_a without gradient: draw every adapter parameter.
  state = nnx.state(model, adapters.AdapterParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


def _batch(seed, task_id, n=4):
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 259, size=(n, 5)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(3, 259, size=(n, 7)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((n, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets, "decoder_loss_weights": np.ones((n, 5), np.float32),
          "task_ids": np.full((n,), task_id, np.int32)}


def _set_routing(model, rows):
  for router in adapters.routers(model):
    router.router_logits[...] = jnp.asarray(rows, jnp.float32)


def test_identical_data_gives_cosine_one():
  same = {"a": _batch(0, 0), "b": _batch(0, 1)}
  cos = analysis.cosine_matrix(analysis.task_gradients(_model("lora"), same))
  np.testing.assert_allclose(cos, np.ones((2, 2)), atol=1e-6)
  poly = _model("poly", n_skills=2)
  _set_routing(poly, [[0.5, -1.0], [0.5, -1.0]])  # the two tasks route alike
  cos = analysis.cosine_matrix(analysis.task_gradients(poly, same))
  np.testing.assert_allclose(cos, np.ones((2, 2)), atol=1e-6)


def test_tasks_on_disjoint_skills_give_cosine_zero_and_shared_skills_do_not():
  other = {"a": _batch(0, 0), "b": _batch(1, 1)}
  poly = _model("poly", n_skills=2)
  _set_routing(poly, [[30.0, -30.0], [-30.0, 30.0]])  # task 0 -> skill 0, task 1 -> skill 1
  cos = analysis.cosine_matrix(analysis.task_gradients(poly, other))
  assert abs(cos[0, 1]) < 1e-6
  _set_routing(poly, [[0.0, 0.0], [0.0, 0.0]])  # both tasks mix both skills equally
  cos = analysis.cosine_matrix(analysis.task_gradients(poly, other))
  assert abs(cos[0, 1]) > 1e-3


def test_cosine_and_pair_mean_by_hand():
  cos = analysis.cosine_matrix(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]))
  h = 1 / np.sqrt(2)
  np.testing.assert_allclose(cos, [[1, 0, h], [0, 1, h], [h, h, 1]], atol=1e-12)
  assert analysis.mean_off_diagonal(cos) == pytest.approx(2 * h / 3)
  with pytest.raises(ValueError, match="at least 2 tasks"):
    analysis.mean_off_diagonal(np.ones((1, 1)))


def test_routing_entropy_and_task_similarity():
  poly = _model("poly", n_tasks=3, n_skills=4)
  _set_routing(poly, np.zeros((3, 4)))
  weights = analysis.routing_weights(poly)
  assert len(weights) == 4 and all(w.shape == (3, 1, 4) for w in weights.values())
  assert analysis.routing_entropy(weights) == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(analysis.task_similarity(weights), np.ones((3, 3)), atol=1e-6)
  _set_routing(poly, [[40.0, -40, -40, -40], [-40, 40, -40, -40], [-40, -40, 40, -40]])
  weights = analysis.routing_weights(poly)
  assert analysis.routing_entropy(weights) < 1e-6
  np.testing.assert_allclose(analysis.task_similarity(weights), np.eye(3), atol=1e-6)
  with pytest.raises(ValueError, match="no routed adapters"):
    analysis.routing_entropy(analysis.routing_weights(_model("lora")))


def test_plots_are_written_and_not_empty(tmp_path):
  files = [
      analysis.plot_lines({"a": ([0, 1, 2], [3.0, 2.0, 1.5]), "b": ([0, 2], [1.0, 0.5])},
                          tmp_path / "lines.png", title="t", xlabel="x", ylabel="y"),
      analysis.plot_matrix(np.eye(3), ["x", "y", "z"], tmp_path / "matrix.png", title="m"),
      analysis.plot_routing({f"encoder/layers_{i}/attention/q": np.random.rand(4, 2, 3)
                             for i in range(7)}, tmp_path / "routing.png"),
  ]
  for f in files:
    data = f.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f
