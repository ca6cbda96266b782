"""The layer's exact paths (per-example, shared, parameters, skills) against a NumPy float64
reference of docs/algorithm.md section 3 with its gradients written out, on several shapes
(S > 1, uneven lengths), values and gradients; the single-task fast path inside the layer,
declared or found, against the per-example path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhr_jax import adapters, routing
from mhr_jax.adapters import AdapterConfig

# (B, L, D, O, Q, K, R): Poly and MHR, lengths 1 (a decoding step) and uneven ones.
SHAPES = [(4, 7, 12, 8, 1, 3, 2), (3, 5, 16, 24, 4, 2, 3), (5, 1, 8, 12, 2, 4, 1),
          (2, 13, 32, 16, 8, 3, 4)]


def _arrays(shape, seed=0, same_task=False):
  b, length, d, o, q, k, r = shape
  rng = np.random.default_rng(seed)
  w = rng.uniform(0.05, 1.0, size=(b, q, k)).astype(np.float32)
  w /= w.sum(-1, keepdims=True)
  if same_task:
    w[:] = w[:1]
  return dict(x=rng.normal(size=(b, length, d)).astype(np.float32), w=w,
              a=rng.normal(size=(q, k, d // q, r)).astype(np.float32),
              b=rng.normal(size=(q, k, r, o // q)).astype(np.float32))


def _numpy(v, dy, scale=0.5):
  """Float64 reference of docs/algorithm.md section 3, value and gradients (w, A, B) for the
  output cotangent ``dy``: per example, the split-wise mixtures concatenated into (D, r) and
  (r, O), then x A_i B_i; the gradients written out by the chain rule."""
  x, w, a, b = (np.asarray(v[k], np.float64) for k in ("x", "w", "a", "b"))
  dy = np.asarray(dy, np.float64)
  n_splits, d_q, o_q = a.shape[0], a.shape[2], b.shape[3]
  ys, gw, ga, gb = [], np.zeros_like(w), np.zeros_like(a), np.zeros_like(b)
  for i in range(x.shape[0]):
    a_i = np.concatenate([np.tensordot(w[i, q], a[q], 1) for q in range(n_splits)], 0)  # (D, r)
    b_i = np.concatenate([np.tensordot(w[i, q], b[q], 1) for q in range(n_splits)], 1)  # (r, O)
    ys.append(x[i] @ a_i @ b_i * scale)
    d_a = scale * x[i].T @ (dy[i] @ b_i.T)  # (D, L) x (L, r) -> (D, r)
    d_b = scale * (x[i] @ a_i).T @ dy[i]  # (r, L) x (L, O) -> (r, O)
    for q in range(n_splits):
      da_q, db_q = d_a[q * d_q:(q + 1) * d_q], d_b[:, q * o_q:(q + 1) * o_q]
      ga[q] += w[i, q][:, None, None] * da_q  # (K, 1, 1) * (D/Q, r) -> (K, D/Q, r)
      gb[q] += w[i, q][:, None, None] * db_q  # (K, 1, 1) * (r, O/Q) -> (K, r, O/Q)
      gw[i, q] = np.einsum("kdr,dr->k", a[q], da_q) + np.einsum("kro,ro->k", b[q], db_q)
  return np.stack(ys), gw, ga, gb


@jax.jit
def _paths(x, w, a, b, dy):
  """Output change and its gradients with respect to (w, A, B), by every path at once."""
  def per_example(w, a, b):  # the path the layer had before the others: mix, low_rank_delta
    return routing.low_rank_delta(x, *routing.mix(w, a, b), 0.5)

  paths = dict(
      per_example=per_example,
      parameters=lambda w, a, b: routing.low_rank_delta_batched(
          x, *routing.mix_per_example(w, a, b), 0.5),
      skills=lambda w, a, b: routing.skills_delta(x, w, a, b, 0.5),
      chosen=lambda w, a, b: routing.mixed_delta(x, w, a, b, 0.5),
      shared=lambda w, a, b: routing.shared_delta(x, *routing.mix_shared(w[0], a, b), 0.5))
  out = {}
  for name, f in paths.items():
    y, vjp = jax.vjp(f, w, a, b)
    out[name] = (y,) + vjp(dy)
  return out


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def _close_to_numpy(got, want):
  """float32 against float64: rtol 1e-5 and atol 1e-5 of the reference's largest entry."""
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_every_path_equals_the_numpy_reference_in_value_and_gradient(shape):
  dy = np.random.default_rng(2).normal(size=shape[:2] + (shape[3],)).astype(np.float32)
  # Mixed tasks: the per-example, parameter and skill paths (and the cost model's choice).
  v = _arrays(shape)
  out = _paths(v["x"], v["w"], v["a"], v["b"], dy)
  want = _numpy(v, dy)
  for path in ("per_example", "parameters", "skills", "chosen"):
    for got, ref in zip(out[path], want):
      _close_to_numpy(np.asarray(got), ref)
  # One task: the shared path; the weights' gradient of every example lands on the one row.
  v = _arrays(shape, seed=1, same_task=True)
  out = _paths(v["x"], v["w"], v["a"], v["b"], dy)
  (y, gw, ga, gb), want = out["shared"], _numpy(v, dy)
  for got, ref in ((y, want[0]), (ga, want[2]), (gb, want[3]), (gw[0], want[1].sum(0))):
    _close_to_numpy(np.asarray(got), ref)
  assert not np.asarray(gw[1:]).any()


def test_row_factor_poisons_exactly_its_example():
  v = _arrays(SHAPES[1], same_task=True)
  a_t, b = routing.mix_shared(jnp.asarray(v["w"][0]), jnp.asarray(v["a"]), jnp.asarray(v["b"]))
  guard = jnp.asarray([1.0, np.nan, 1.0], jnp.float32)
  y = np.asarray(routing.shared_delta(jnp.asarray(v["x"]), a_t, b, 0.5, guard))
  assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_cost_model_picks_skills_only_for_short_inputs():
  small = dict(d_in=512, d_out=384, n_skills=8, n_splits=8, rank=8, batch=8)
  assert routing.mixed_path((8, 1, 512), (8, 8, 64, 8), 384) == "skills"
  assert routing.mixed_path((8, 128, 512), (8, 8, 64, 8), 384) == "parameters"
  costs = routing.path_costs(**small, length=32)
  assert costs["parameters"] < costs["skills"]


def _layer(n_splits=2, relaxed_bernoulli=False, single_task=False, seed=0):
  config = AdapterConfig(mode="mhr", n_tasks=4, n_skills=3, n_splits=n_splits, lora_rank=2,
                         relaxed_bernoulli=relaxed_bernoulli)
  layer = adapters.RoutedLoRA(8, 12, config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32)
  layer.router.router_logits[...] = jnp.asarray(rng.normal(size=(4, n_splits * 3)), jnp.float32)
  layer.single_task = single_task
  return layer


def _reference_delta(layer, x, ids):
  w = layer.router(ids, deterministic=True)
  a_b, b_b = routing.mix(w, layer.lora_a[...], layer.lora_b[...])
  return routing.low_rank_delta(x, a_b, b_b, layer.scale)


def _reference(layer, x, ids):
  return np.asarray(_reference_delta(layer, x, ids))


@pytest.mark.parametrize("ids", [[2, 2, 2, 2, 2], [2, 0, 2, 3, 1]])
def test_layer_under_jit_finds_single_task_batches(ids):
  layer = _layer()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 6, 8)), jnp.float32)
  ids = jnp.asarray(ids, jnp.int32)
  graphdef, state = nnx.split(layer)
  run = jax.jit(lambda s, x, ids: nnx.merge(graphdef, s)(x, ids, deterministic=True))
  hlo = run.lower(state, x, ids).as_text()
  assert "conditional" in hlo or "case" in hlo  # the dynamic check
  _close(np.asarray(run(state, x, ids)), _reference(layer, x, ids))
  _close(np.asarray(layer(x, ids, deterministic=True)), _reference(layer, x, ids))  # eager
  # Gradients through the check equal the per-example path's.
  proj = jnp.asarray(np.random.default_rng(5).normal(size=(5, 6, 12)), jnp.float32)
  params, rest = nnx.split_state(state, nnx.Param, ...)

  def loss(params, reference):
    m = nnx.merge(graphdef, params, rest)
    y = _reference_delta(m, x, ids) if reference else m(x, ids, deterministic=True)
    return jnp.sum(y * proj)

  grads = jax.jit(jax.grad(loss), static_argnums=1)
  got, want = grads(params, False), grads(params, True)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(np.asarray(g), np.asarray(w))


def test_declared_single_task_layer_has_no_check_and_poisons_other_tasks():
  layer = _layer(single_task=True)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3, 8)), jnp.float32)
  same = jnp.full((4,), 1, jnp.int32)
  graphdef, state = nnx.split(layer)
  run = jax.jit(lambda s, x, ids: nnx.merge(graphdef, s)(x, ids, deterministic=True))
  assert "conditional" not in run.lower(state, x, same).as_text()
  _close(np.asarray(run(state, x, same)), _reference(layer, x, same))
  y = np.asarray(run(state, x, jnp.asarray([1, 1, 3, 1], jnp.int32)))
  assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
  model = adapters.set_single_task(nnx.Dict(a=_layer()))
  assert model["a"].single_task


def test_single_task_loss_declares_it_on_the_model_it_gets():
  model = nnx.Dict(a=_layer())
  seen = []
  loss = adapters.single_task_loss(lambda m, batch: seen.append(m["a"].single_task) or batch)
  assert loss(model, 3) == 3 and seen == [True]


def test_routing_noise_keeps_per_example_weights_on_one_task():
  layer = _layer(relaxed_bernoulli=True, single_task=True)
  x = jnp.ones((3, 2, 8), jnp.float32)
  y = np.asarray(layer(x, jnp.asarray([1, 1, 1], jnp.int32), deterministic=False))
  assert not np.allclose(y[0], y[1], atol=1e-4)  # each example draws its own noise
