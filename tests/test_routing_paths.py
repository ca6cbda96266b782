"""The layer's three exact paths (shared, parameters, skills) against the per-example path of
docs/algorithm.md section 3 and a NumPy float64 reference, on several shapes (S > 1, uneven
lengths), values and gradients; the single-task fast path inside the layer, declared or found."""

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


def _per_example(v, scale=0.5):
  """The path the layer had before the others: ``mix`` then ``low_rank_delta``."""
  a_b, b_b = routing.mix(jnp.asarray(v["w"]), jnp.asarray(v["a"]), jnp.asarray(v["b"]))
  return np.asarray(routing.low_rank_delta(jnp.asarray(v["x"]), a_b, b_b, scale))


def _numpy(v, scale=0.5):
  """Per example: concatenate the split-wise mixtures into (D, r) and (r, O) and multiply."""
  x, w, a, b = (np.asarray(v[k], np.float64) for k in ("x", "w", "a", "b"))
  out = []
  for i in range(x.shape[0]):
    a_i = np.concatenate([np.tensordot(w[i, q], a[q], 1) for q in range(a.shape[0])], 0)
    b_i = np.concatenate([np.tensordot(w[i, q], b[q], 1) for q in range(b.shape[0])], 1)
    out.append(x[i] @ a_i @ b_i * scale)
  return np.stack(out)


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_and_skill_paths_equal_the_per_example_path(shape):
  v = _arrays(shape)
  want = _per_example(v)
  np.testing.assert_allclose(want, _numpy(v), rtol=1e-5, atol=1e-5)
  args = (jnp.asarray(v["x"]), jnp.asarray(v["w"]), jnp.asarray(v["a"]), jnp.asarray(v["b"]))
  _close(np.asarray(routing.skills_delta(*args, 0.5)), want)
  a_t, b_b = routing.mix_per_example(*args[1:])
  _close(np.asarray(routing.low_rank_delta_batched(args[0], a_t, b_b, 0.5)), want)
  _close(np.asarray(routing.mixed_delta(*args, 0.5)), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_shared_path_equals_the_per_example_path_on_one_task(shape):
  v = _arrays(shape, same_task=True)
  a, b = routing.mix_shared(jnp.asarray(v["w"][0]), jnp.asarray(v["a"]), jnp.asarray(v["b"]))
  _close(np.asarray(routing.low_rank_delta_batched(jnp.asarray(v["x"]), a, b, 0.5)), _per_example(v))
  # A NaN row factor poisons exactly that example.
  guard = jnp.asarray([1.0] * (shape[0] - 1) + [np.nan], jnp.float32)
  y = np.asarray(routing.low_rank_delta_batched(jnp.asarray(v["x"]), a, b, 0.5, guard))
  assert np.isnan(y[-1]).all() and np.isfinite(y[:-1]).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_of_every_path_are_equal(shape):
  v = _arrays(shape, seed=1, same_task=True)
  x, w, a, b = (jnp.asarray(v[k]) for k in ("x", "w", "a", "b"))
  proj = jnp.asarray(np.random.default_rng(2).normal(size=(shape[0], shape[1], shape[3])),
                     jnp.float32)

  def loss(path):
    def f(w, a, b):
      if path == "shared":
        return jnp.sum(routing.low_rank_delta_batched(x, *routing.mix_shared(w[0], a, b), 0.5) * proj)
      if path == "skills":
        return jnp.sum(routing.skills_delta(x, w, a, b, 0.5) * proj)
      a_b, b_b = routing.mix(w, a, b)
      return jnp.sum(routing.low_rank_delta(x, a_b, b_b, 0.5) * proj)
    return f

  want = jax.grad(loss("per_example"), argnums=(1, 2))(w, a, b)
  for path in ("shared", "skills"):
    got = jax.grad(loss(path), argnums=(1, 2))(w, a, b)
    for g, ref in zip(got, want):
      _close(np.asarray(g), np.asarray(ref))
  # The weight gradient: every example's (per-example path) lands on the shared row.
  gw = jax.grad(loss("per_example"))(w, a, b)
  gw_shared = jax.grad(loss("shared"))(w, a, b)
  _close(np.asarray(gw_shared[0]), np.asarray(gw).sum(0))


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

  got = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
  want = jax.grad(loss)(params, True)
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
