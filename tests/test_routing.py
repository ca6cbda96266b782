"""Routing math against a plain NumPy reference of docs/algorithm.md (sections 2 and 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhr_jax import routing

T, Q, K, R, D, O, B, L = 5, 4, 3, 2, 8, 12, 6, 3


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_layer(x, z, task_ids, lora_a, lora_b, scale, u=None, tau=1.0):
  """Literal per-example, per-split reference: loops, concatenation, no einsum."""
  out = np.zeros((x.shape[0], x.shape[1], lora_b.shape[0] * lora_b.shape[-1]), np.float64)
  n_splits, n_skills = lora_a.shape[:2]
  for b in range(x.shape[0]):
    l = z[task_ids[b]].reshape(n_splits, n_skills)
    if u is None:
      s = np_sigmoid(l)
    else:
      s = np_sigmoid((l + np.log(u[b]) - np.log(1 - u[b])) / tau)
    w = s / (s.sum(-1, keepdims=True) + 1e-12)
    a_b = np.concatenate(
        [sum(w[q, k] * lora_a[q, k] for k in range(n_skills)) for q in range(n_splits)], axis=0)
    b_b = np.concatenate(
        [sum(w[q, k] * lora_b[q, k] for k in range(n_skills)) for q in range(n_splits)], axis=1)
    out[b] = (x[b] @ a_b) @ b_b * scale
  return out


@pytest.fixture
def arrays():
  rng = np.random.default_rng(0)
  return dict(
      x=rng.normal(size=(B, L, D)).astype(np.float32),
      z=rng.normal(size=(T, Q * K)).astype(np.float32),
      lora_a=rng.normal(size=(Q, K, D // Q, R)).astype(np.float32),
      lora_b=rng.normal(size=(Q, K, R, O // Q)).astype(np.float32),
      task_ids=np.array([0, 4, 2, 2, 1, 3], np.int32),
  )


def _routed(arrays, key=None, temperature=1.0):
  w = routing.routing_weights(
      arrays["z"], arrays["task_ids"], n_splits=Q, n_skills=K, key=key, temperature=temperature)
  a, b = routing.mix(w, arrays["lora_a"], arrays["lora_b"])
  return routing.low_rank_delta(jnp.asarray(arrays["x"]), a, b, 0.5)


def test_noiseless_path_matches_numpy(arrays):
  got = _routed(arrays)
  want = np_layer(
      arrays["x"].astype(np.float64), arrays["z"].astype(np.float64), arrays["task_ids"],
      arrays["lora_a"].astype(np.float64), arrays["lora_b"].astype(np.float64), 0.5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_relaxed_bernoulli_path_matches_numpy(arrays, temperature):
  key = jax.random.key(3)
  got = _routed(arrays, key=key, temperature=temperature)
  # The same uniforms the sampler draws for (B, Q, K).
  u = np.asarray(routing.sample_uniform(key, (B, Q, K)), np.float64)
  want = np_layer(
      arrays["x"].astype(np.float64), arrays["z"].astype(np.float64), arrays["task_ids"],
      arrays["lora_a"].astype(np.float64), arrays["lora_b"].astype(np.float64), 0.5, u=u,
      tau=temperature)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Noise really changes the result.
  assert not np.allclose(np.asarray(got), np.asarray(_routed(arrays)), atol=1e-3)


def test_uniforms_open_interval_and_fresh_per_element():
  u = np.asarray(routing.sample_uniform(jax.random.key(0), (1000, Q, K)))
  eps = np.finfo(np.float32).eps
  assert u.min() >= eps and u.max() <= 1 - eps
  assert len(np.unique(u)) > 0.99 * u.size


def test_weights_normalised_per_split(arrays):
  w = np.asarray(routing.routing_weights(arrays["z"], arrays["task_ids"], n_splits=Q, n_skills=K))
  assert w.shape == (B, Q, K)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  # Row-major view: split q of task t is columns [q*K, (q+1)*K).
  t = arrays["task_ids"][1]
  s = np_sigmoid(arrays["z"][t, K:2 * K].astype(np.float64))
  np.testing.assert_allclose(w[1, 1], s / s.sum(), rtol=1e-6)


def test_mixed_batch_examples_independent(arrays):
  full = np.asarray(_routed(arrays))
  for b in [0, 3]:
    one = dict(arrays, x=arrays["x"][b:b + 1], task_ids=arrays["task_ids"][b:b + 1])
    np.testing.assert_allclose(np.asarray(_routed(one))[0], full[b], rtol=1e-6, atol=1e-6)


def test_delta_kernel_equals_low_rank_product(arrays):
  w = routing.routing_weights(arrays["z"], arrays["task_ids"], n_splits=Q, n_skills=K)
  a, b = routing.mix(w, arrays["lora_a"], arrays["lora_b"])
  y = routing.low_rank_delta(jnp.asarray(arrays["x"]), a, b, 0.5)
  for i in range(B):
    kernel = routing.delta_kernel(w[i], arrays["lora_a"], arrays["lora_b"], 0.5)
    np.testing.assert_allclose(
        np.asarray(arrays["x"][i] @ kernel), np.asarray(y[i]), rtol=1e-5, atol=1e-5)


def test_uniform_weights():
  w = routing.uniform_weights(2, Q, K)
  np.testing.assert_array_equal(np.asarray(w), np.full((2, Q, K), 1.0 / K, np.float32))


def test_check_task_ids_raises_naming_bad_ids():
  routing.check_task_ids(np.array([0, 4]), 5)
  with pytest.raises(ValueError, match=r"\[-1, 5\].*\[0, 5\)"):
    routing.check_task_ids(np.array([0, 5, -1, 5]), 5)
  with pytest.raises(ValueError, match="None"):
    routing.check_task_ids(None, 5)
  with pytest.raises(ValueError, match="integers"):
    routing.check_task_ids(np.array([0.0]), 5)


def test_out_of_range_ids_give_nan_under_jit_not_a_clamp(arrays):
  f = jax.jit(lambda z, ids: routing.routing_weights(z, ids, n_splits=Q, n_skills=K))
  w = np.asarray(f(arrays["z"], jnp.array([0, 5, -1, 4])))
  assert np.isfinite(w[0]).all() and np.isfinite(w[3]).all()
  assert np.isnan(w[1]).all() and np.isnan(w[2]).all()


def test_wrong_width_raises(arrays):
  with pytest.raises(ValueError, match="n_splits"):
    routing.gather_logits(arrays["z"], arrays["task_ids"], Q, K + 1)
