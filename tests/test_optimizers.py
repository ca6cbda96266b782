"""Parameter groups, schedule, clipping, and what stays frozen after optimizer steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mhr_jax import adapters, models, network, optimizers, steps
from mhr_jax.adapters import AdapterConfig
from mhr_jax.optimizers import OptimizerConfig

VOCAB = 50


def tiny_model(mode="mhr", n_tasks=3, seed=0, **kw):
  cfg = network.preset("tiny", vocab_size=VOCAB, dropout_rate=0.0, num_layers=1)
  config = AdapterConfig(mode=mode, n_tasks=n_tasks, n_skills=3, n_splits=2 if mode != "poly"
                         else 1, lora_rank=2, layers="super_ni", **kw)
  factory = adapters.make_adapter_factory(config)
  model = network.T5(cfg, rngs=nnx.Rngs(seed), adapter_factory=factory)
  rng = np.random.default_rng(seed + 1)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, adapters.AdapterParam):  # lora_b starts at 0: make every path matter
      var[...] = jnp.asarray(0.3 * rng.normal(size=var.shape), var.dtype)
  return model


def batch(task_ids, seed=0):
  rng = np.random.default_rng(seed)
  b = len(task_ids)
  targets = jnp.asarray(rng.integers(2, VOCAB, (b, 5)), jnp.int32)
  return {
      "encoder_input_tokens": jnp.asarray(rng.integers(2, VOCAB, (b, 7)), jnp.int32),
      "decoder_input_tokens": models.shift_right(targets),
      "decoder_target_tokens": targets,
      "task_ids": jnp.asarray(task_ids, jnp.int32),
  }


def train(model, mode, opt_config, data, n_steps=3, key=None):
  """The train step of the optimizers module docstring, run ``n_steps`` times."""
  graphdef, trainable, frozen = steps.split_model(model, adapters.trainable_filter(mode))
  tx = optimizers.make_optimizer(opt_config, trainable)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, frozen, opt_state, batch, key):
    def loss(trainable):
      m = nnx.merge(graphdef, trainable, frozen)
      if key is not None:
        nnx.reseed(m, routing=key)
      return models.loss_fn(m, batch, deterministic=key is None)[0]
    grads = jax.grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  for i in range(n_steps):
    trainable, opt_state = step(
        trainable, frozen, opt_state, data, None if key is None else jax.random.fold_in(key, i))
  return nnx.merge(graphdef, trainable, frozen), opt_state


def flat(model):
  return {path: (type(v), np.asarray(v[...])) for path, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_schedule_warmup_then_linear_decay():
  sched = optimizers.warmup_linear_decay(0.1, 100, 0.06)
  np.testing.assert_allclose(
      [float(sched(s)) for s in (0, 3, 6, 53, 100, 120)], [0, 0.05, 0.1, 0.05, 0, 0], atol=1e-7)
  assert float(optimizers.warmup_linear_decay(1.0, 10, 0.0)(0)) == 1.0


def test_mhr_z_steps_change_only_new_task_routing_bit_for_bit():
  model = tiny_model()
  adapters.to_mhr_z(model, 1, jax.random.key(3))
  before = flat(model)
  opt = OptimizerConfig(name="adamw", weight_decay=0.01, total_steps=10, warmup_fraction=0.1)
  # Mixed batch: old tasks (frozen rows) and the new task 3.
  trained, opt_state = train(model, "mhr_z", opt, batch([3, 0, 3, 2]), n_steps=4)
  after = flat(trained)
  assert before.keys() == after.keys()
  changed = [p for p in before if not np.array_equal(before[p][1], after[p][1])]
  assert changed and all(after[p][0] is adapters.RouterParam for p in changed)
  n_layers = len(list(adapters.adapter_slots(model)))
  assert len(changed) == n_layers  # every layer's new row moved
  for p, (kind, value) in before.items():
    if kind is not adapters.RouterParam:
      assert after[p][1].tobytes() == value.tobytes(), p
  # Optimizer state exists for the new rows only.
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0)
  assert n_state == 2 * n_layers * 2 * 3  # Adam's two moments of each (1, S*K) row


def test_mhr_mu_has_no_routing_and_trains_adapters_only():
  model = adapters.to_mhr_mu(tiny_model())
  assert not jax.tree.leaves(nnx.state(model, adapters.RouterParam))
  assert not jax.tree.leaves(nnx.state(model, adapters.FrozenRouterParam))
  before = flat(model)
  opt = OptimizerConfig(name="adafactor", learning_rate=1e-2, total_steps=10, warmup_fraction=0.1)
  trained, _ = train(model, "mhr_mu", opt, batch([0, 1, 2]))  # task ids are ignored
  after = flat(trained)
  for p, (kind, value) in before.items():
    moved = not np.array_equal(value, after[p][1])
    if kind is adapters.AdapterParam:
      assert moved, p
    else:
      assert not moved, p


def test_group_learning_rates_and_weight_decay_on_routing():
  model = tiny_model()
  _, trainable, _ = steps.split_model(model, adapters.trainable_filter("mhr"))
  grads = jax.tree.map(jnp.ones_like, trainable)
  opt = OptimizerConfig(learning_rate=1e-3, routing_learning_rate=0.1, warmup_fraction=0.0,
                        weight_decay=0.0, grad_clip_norm=None)
  tx = optimizers.make_optimizer(opt, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  labels = optimizers.param_labels(trainable)
  for (path, u), (_, label) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(labels)):
    want = 0.1 if label == optimizers.ROUTING else 1e-3
    np.testing.assert_allclose(np.asarray(u[...]), -want, rtol=1e-4, err_msg=str(path))
  assert {label for _, label in nnx.to_flat_state(labels)} == {"routing", "adapters"}
  # Weight decay reaches the routing logits too.
  opt = OptimizerConfig(warmup_fraction=0.0, weight_decay=0.5, grad_clip_norm=None)
  tx = optimizers.make_optimizer(opt, trainable)
  zero = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = tx.update(zero, tx.init(trainable), trainable)
  for (path, u), (_, p) in zip(nnx.to_flat_state(updates), nnx.to_flat_state(trainable)):
    lr = 0.1 if isinstance(p, adapters.RouterParam) else 1e-3
    np.testing.assert_allclose(np.asarray(u[...]), -lr * 0.5 * np.asarray(p[...]), rtol=1e-5)


def test_gradient_clipping_by_global_norm():
  params = {"a": adapters.AdapterParam(jnp.ones(3)), "b": adapters.AdapterParam(jnp.ones(3))}
  grads = {"a": adapters.AdapterParam(jnp.full(3, 1e6)),
           "b": adapters.AdapterParam(jnp.full(3, 1e-6))}
  def b_update(clip):
    opt = OptimizerConfig(warmup_fraction=0.0, weight_decay=0.0, grad_clip_norm=clip)
    tx = optimizers.make_optimizer(opt, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return float(updates["b"][...][0])
  # Unclipped Adam normalises each entry (|update| = lr); clipped to norm 1 the small gradient
  # drops below Adam's epsilon and its update nearly vanishes.
  np.testing.assert_allclose(b_update(None), -1e-3, rtol=1e-2)
  assert abs(b_update(1.0)) < 1e-6


def test_frozen_entries_get_zero_update_and_no_state():
  params = {"w": nnx.Param(jnp.ones((4, 4))), "z": adapters.RouterParam(jnp.ones((2, 3)))}
  tx = optimizers.make_optimizer(OptimizerConfig(warmup_fraction=0.0), params)
  state = tx.init(params)
  assert sum(x.size for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0) == 2 * 6
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert not np.asarray(updates["w"][...]).any() and np.asarray(updates["z"][...]).all()


def test_bad_config_raises():
  with pytest.raises(ValueError, match="adamw"):
    OptimizerConfig(name="sgd")
