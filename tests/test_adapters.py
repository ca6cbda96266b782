"""Routed LoRA layers: the layer math, the identities of algorithm.md, modes and transitions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhr_jax import adapters, axes, layers, routing
from mhr_jax.adapters import AdapterConfig

D, F, B, L = 8, 16, 5, 3
PATHS = [  # (path, in_dim, out_dim): a small chain of dense layers
    ("encoder/layers_0/attention/q", D, D),
    ("encoder/layers_0/mlp/wi_0", D, F),
    ("encoder/layers_0/mlp/wo", F, D),
    ("decoder/layers_0/encoder_decoder_attention/o", D, D),
]


class Chain(nnx.Module):
  """Dense layers with adapter slots applied one after the other (a stand-in for a network)."""

  def __init__(self, factory, rngs: nnx.Rngs):
    precision = layers.Precision()
    self.layers = nnx.List([
        layers.Dense(din, dout, ("embed", "mlp"), precision=precision, init_std=0.3, rngs=rngs,
                     adapter=factory(path, din, dout, rngs))
        for path, din, dout in PATHS])

  def __call__(self, x, task_ids, *, deterministic=True):
    for layer in self.layers:
      x = layer(x, task_ids, deterministic=deterministic)
    return x


def randomize(model, seed=1, scale=0.5):
  """Non-zero values for every adapter and routing parameter (lora_b starts at zero)."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(model):
    if isinstance(var, (adapters.AdapterParam, adapters.RouterParam)):
      var[...] = jnp.asarray(scale * rng.normal(size=var.shape), var.dtype)
  return model


def make(mode="mhr", n_tasks=4, n_skills=3, n_splits=2, rank=2, seed=0, **kw):
  config = AdapterConfig(mode=mode, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                         lora_rank=rank, **kw)
  return randomize(Chain(adapters.make_adapter_factory(config), nnx.Rngs(seed))), config


def x_and_ids(n_tasks=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, n_tasks, size=(B,)), jnp.int32).at[:2].set(
      jnp.asarray([0, n_tasks - 1]))
  return x, ids


def np_routed_layer(x, z, ids, lora_a, lora_b, scale, u=None):
  """Literal NumPy reference of algorithm.md sections 2-3 for one layer."""
  x, z, lora_a, lora_b = (np.asarray(v, np.float64) for v in (x, z, lora_a, lora_b))
  s_, k_ = lora_a.shape[:2]
  out = []
  for b in range(x.shape[0]):
    l = z[ids[b]].reshape(s_, k_)
    if u is not None:
      l = l + np.log(u[b]) - np.log1p(-u[b])
    s = 1 / (1 + np.exp(-l))
    w = s / (s.sum(-1, keepdims=True) + 1e-12)
    a = np.concatenate([np.tensordot(w[q], lora_a[q], 1) for q in range(s_)], 0)  # (D, r)
    bb = np.concatenate([np.tensordot(w[q], lora_b[q], 1) for q in range(s_)], 1)  # (r, O)
    out.append(x[b] @ a @ bb * scale)
  return np.stack(out)


def test_layer_matches_numpy_noiseless():
  model, config = make()
  x, ids = x_and_ids()
  ad = model.layers[0].adapter
  got = ad(x, ids, deterministic=True)
  want = np_routed_layer(x, ad.router.logits(), np.asarray(ids), ad.lora_a[...], ad.lora_b[...],
                         config.scale)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_layer_matches_numpy_relaxed_bernoulli_and_noise_is_fresh():
  model, config = make(relaxed_bernoulli=True)
  x, ids = x_and_ids()
  ad = model.layers[0].adapter
  stream = ad.router.rngs
  key = jax.random.fold_in(stream.key[...], stream.count[...])
  u = np.asarray(routing.sample_uniform(key, (B, config.n_splits, config.n_skills)))
  got = np.asarray(ad(x, ids, deterministic=False))
  want = np_routed_layer(x, ad.router.logits(), np.asarray(ids), ad.lora_a[...], ad.lora_b[...],
                         config.scale, u=u)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The next call draws new noise; deterministic calls have none.
  assert not np.allclose(np.asarray(ad(x, ids, deterministic=False)), got, atol=1e-4)
  det = ad(x, ids, deterministic=True)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(ad(x, ids, deterministic=True)))
  # Every layer has its own stream; reseeding makes the noise reproducible.
  keys = [r.rngs.key[...] for r in adapters.routers(model)]
  assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}) == len(keys)
  nnx.reseed(model, routing=7)
  y1 = model(x, ids, deterministic=False)
  nnx.reseed(model, routing=7)
  np.testing.assert_array_equal(np.asarray(model(x, ids, deterministic=False)), np.asarray(y1))


def test_mhr_with_one_split_is_poly():
  model, config = make(mode="mhr", n_splits=1, n_skills=4)
  x, ids = x_and_ids()
  ad = model.layers[1].adapter
  z = np.asarray(ad.router.logits(), np.float64)
  w = 1 / (1 + np.exp(-z))
  w = w / (w.sum(-1, keepdims=True) + 1e-12)  # (T, K)
  a = np.asarray(ad.lora_a[...], np.float64)[0]  # (K, D, r)
  b = np.asarray(ad.lora_b[...], np.float64)[0]  # (K, r, O)
  want = np.stack([
      np.asarray(x[i], np.float64) @ np.tensordot(w[ids[i]], a, 1) @ np.tensordot(w[ids[i]], b, 1)
      * config.scale for i in range(B)])
  np.testing.assert_allclose(np.asarray(ad(x, ids, deterministic=True)), want, atol=1e-6)
  # And the poly mode builds the very same layer.
  poly, _ = make(mode="poly", n_splits=1, n_skills=4)
  np.testing.assert_array_equal(
      np.asarray(poly(x, ids)), np.asarray(model(x, ids)))


@pytest.mark.parametrize("n_splits", [1, 4])
def test_one_skill_is_lora(n_splits):
  model, config = make(n_skills=1, n_splits=n_splits)
  x, ids = x_and_ids()
  for layer in model.layers:
    ad = layer.adapter
    s, _, dq, r = ad.lora_a.shape
    a = ad.lora_a[...][:, 0].reshape(s * dq, r)  # (S, D/S, r) -> (D, r)
    b = jnp.transpose(ad.lora_b[...][:, 0], (1, 0, 2)).reshape(r, -1)  # -> (r, O)
    lora = adapters.LoRA(a, b, config.scale)
    xi = jnp.ones((B, L, ad.in_dim)) * jnp.arange(ad.in_dim) / ad.in_dim
    np.testing.assert_allclose(
        np.asarray(ad(xi, ids, deterministic=True)),
        np.asarray(lora(xi, ids, deterministic=True)), rtol=1e-6, atol=1e-6)


def test_mhr_mu_collapse_equals_uniform_routing():
  model, config = make(n_skills=4, n_splits=4)
  x, ids = x_and_ids()
  for layer in model.layers:
    ad = layer.adapter
    xi = jax.random.normal(jax.random.key(2), (B, L, ad.in_dim))
    uniform = ad.apply_weights(xi, routing.uniform_weights(B, 4, 4))
    collapsed = ad.averaged()
    np.testing.assert_allclose(
        np.asarray(collapsed(xi, ids, deterministic=True)), np.asarray(uniform), atol=1e-6)
  want = model.layers  # after the transition no routing remains and outputs are uniform-routed
  adapters.to_mhr_mu(model)
  assert not jax.tree.leaves(nnx.state(model, adapters.RouterParam))
  assert not jax.tree.leaves(nnx.state(model, adapters.FrozenRouterParam))
  assert all(isinstance(layer.adapter, adapters.LoRA) for layer in want)
  counts = adapters.parameter_counts(model, "mhr_mu")
  assert counts["routing"] == 0 and counts["trainable"] == counts["adapters"]
  assert counts["adapters"] == sum(config.lora_rank * (i + o) for _, i, o in PATHS)


def test_mixed_task_batch_equals_one_example_at_a_time():
  model, _ = make()
  x, ids = x_and_ids()
  full = np.asarray(model(x, ids))
  for i in range(B):
    np.testing.assert_allclose(
        np.asarray(model(x[i:i + 1], ids[i:i + 1]))[0], full[i], rtol=1e-5, atol=1e-6)
  # A repeated example (answer choices, beams) carries its task id with it.
  rep = np.asarray(model(jnp.repeat(x, 3, axis=0), jnp.repeat(ids, 3)))
  np.testing.assert_allclose(rep[::3], full, rtol=1e-5, atol=1e-6)


def test_merged_layer_equals_routed_layer():
  model, _ = make()
  x, _ = x_and_ids()
  for task in range(4):
    ids = jnp.full((B,), task, jnp.int32)
    merged = adapters.merge(model, task)
    assert not list(adapters.adapter_slots(merged))
    assert not jax.tree.leaves(nnx.state(merged, adapters.AdapterParam))
    np.testing.assert_allclose(
        np.asarray(merged(x, ids)), np.asarray(model(x, ids)), rtol=1e-5, atol=1e-6)
  assert list(adapters.adapter_slots(model))  # the routed model is untouched
  with pytest.raises(ValueError, match=r"\[7\]"):
    adapters.merge(model, 7)


def test_task_id_out_of_range_raises_eagerly_and_is_nan_under_jit():
  model, _ = make()
  x, _ = x_and_ids()
  with pytest.raises(ValueError, match=r"task ids \[4\] are outside \[0, 4\)"):
    model(x, jnp.asarray([0, 1, 4, 2, 3]))
  with pytest.raises(ValueError, match="None"):
    model(x, None)

  @nnx.jit
  def f(m, x, ids):
    return m(x, ids)

  y = np.asarray(f(model, x, jnp.asarray([0, 1, 4, -1, 3])))
  assert np.isfinite(y[[0, 1, 4]]).all()
  assert np.isnan(y[2]).all() and np.isnan(y[3]).all()


def test_every_parameter_has_logical_axes_and_a_type():
  model, _ = make()
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      logical = var.get_metadata().get("logical_axes")
      assert logical is not None and len(logical) == var.ndim, path
  for r in adapters.routers(model):
    assert r.router_logits.get_metadata()["logical_axes"] == (axes.TASKS, axes.ROUTING)
  ad = model.layers[0].adapter
  assert ad.lora_a.get_metadata()["logical_axes"] == (
      axes.SPLITS, axes.SKILLS, axes.ADAPTER_IN, axes.RANK)
  assert isinstance(ad.lora_b, adapters.AdapterParam)


def test_layer_presets_and_regex():
  t0 = re.compile(adapters.LAYER_PRESETS["t0"])
  sni = re.compile(adapters.LAYER_PRESETS["super_ni"])
  for stack, kinds in [("encoder", ["attention"]),
                       ("decoder", ["self_attention", "encoder_decoder_attention"])]:
    for kind in kinds:
      for name in "qkvo":
        path = f"{stack}/layers_3/{kind}/{name}"
        assert t0.search(path) and sni.search(path), path
    for name in ["wi_0", "wi_1", "wo", "wi"]:
      path = f"{stack}/layers_3/mlp/{name}"
      assert t0.search(path) and not sni.search(path), path
  assert not t0.search("encoder/layers_3/attention/qq")
  factory = adapters.make_adapter_factory(AdapterConfig(layers="super_ni", n_splits=2))
  model = Chain(factory, nnx.Rngs(0))
  assert [layer.adapter is not None for layer in model.layers] == [True, False, False, True]
  factory = adapters.make_adapter_factory(AdapterConfig(layers=r"mlp/wo$", n_splits=2))
  model = Chain(factory, nnx.Rngs(0))
  assert [layer.adapter is not None for layer in model.layers] == [False, False, True, False]


def test_init_authors_and_peft():
  for init, bound in [("authors", 1 / np.sqrt(3 * 64)), ("peft", np.sqrt(4 / 64))]:
    config = AdapterConfig(n_tasks=3, n_skills=8, n_splits=4, lora_rank=4, init=init)
    ad = adapters.RoutedLoRA(64, 32, config, rngs=nnx.Rngs(0))
    a = np.asarray(ad.lora_a[...])
    assert a.shape == (4, 8, 16, 4)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert not np.asarray(ad.lora_b[...]).any() and ad.lora_b.shape == (4, 8, 4, 8)
    z = np.asarray(ad.router.router_logits[...])
    assert z.shape == (3, 32) and np.abs(z).max() <= 1e-3 and np.abs(z).max() > 5e-4


def test_splits_must_divide_dims():
  with pytest.raises(ValueError, match="divisible by n_splits 3"):
    adapters.RoutedLoRA(8, 9, AdapterConfig(n_splits=3), rngs=nnx.Rngs(0), path="a/q")
  with pytest.raises(ValueError, match="n_splits must be 1"):
    AdapterConfig(mode="poly", n_splits=2)
  with pytest.raises(ValueError, match="mode"):
    AdapterConfig(mode="mhr-z")


def test_add_tasks_keeps_old_rows_frozen_and_old_outputs():
  model, config = make()
  x, ids = x_and_ids()
  before = np.asarray(model(x, ids))
  old_z = [np.asarray(r.logits()) for r in adapters.routers(model)]
  adapters.add_tasks(model, 2, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(model(x, ids)), before)
  for r, z in zip(adapters.routers(model), old_z):
    assert r.n_tasks == 6
    np.testing.assert_array_equal(np.asarray(r.frozen_router_logits[...]), z)
    new = np.asarray(r.router_logits[...])
    assert new.shape == (2, 6) and np.abs(new).max() <= 1e-3
  # New ids route; an id past the new rows does not.
  assert np.isfinite(np.asarray(model(x, jnp.full((B,), 5)))).all()
  with pytest.raises(ValueError, match=r"\[6\]"):
    model(x, jnp.full((B,), 6))
  counts = adapters.parameter_counts(model, "mhr_z")
  assert counts["trainable"] == counts["routing"] == len(PATHS) * 2 * 2 * 3
  # The authors' resize: the matrix is replaced, ids restart at 0.
  adapters.add_tasks(model, 1, jax.random.key(6), keep_existing=False)
  assert all(r.n_tasks == 1 and r.frozen_router_logits is None for r in adapters.routers(model))


def test_trainable_filters_per_mode():
  model, _ = make()
  n_router = len(PATHS) * 4 * 6
  counts = adapters.parameter_counts(model, "mhr")
  assert counts["routing"] == n_router
  assert counts["trainable"] == counts["routing"] + counts["adapters"]
  assert counts["backbone"] == sum(i * o for _, i, o in PATHS)
  assert adapters.parameter_counts(model, "mhr_z")["trainable"] == n_router
  lora, _ = make(mode="lora")
  assert all(isinstance(layer.adapter, adapters.LoRA) for layer in lora.layers)
  c = adapters.parameter_counts(lora, "lora")
  assert c["routing"] == 0 and c["trainable"] == sum(2 * (i + o) for _, i, o in PATHS)


# ---------------------------------------------------------------------------------------------
# Whole T5.


def tiny_t5(mode="mhr", **kw):
  from mhr_jax import network

  cfg = network.preset("tiny", vocab_size=40, dropout_rate=0.0, num_layers=1)
  config = AdapterConfig(mode=mode, n_tasks=3, n_skills=3, n_splits=2, lora_rank=2, layers="t0",
                         **kw)
  model = network.T5(cfg, rngs=nnx.Rngs(0), adapter_factory=adapters.make_adapter_factory(config))
  return randomize(model, scale=0.3)


def t5_inputs(b=3):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(2, 40, (b, 6)), jnp.int32),
          jnp.asarray(rng.integers(2, 40, (b, 4)), jnp.int32))


def test_merged_t5_equals_routed_t5_for_its_task():
  model = tiny_t5()
  enc, dec = t5_inputs()
  assert len(list(adapters.adapter_slots(model))) == 1 * 7 + 1 * 11
  forward = nnx.jit(lambda m, ids: m(enc, dec, ids))
  task = 2
  routed = np.asarray(forward(model, jnp.full((3,), task)))
  merged = adapters.merge(model, task)
  adapter_vars = nnx.Any(adapters.AdapterParam, adapters.RouterParam)
  assert not jax.tree.leaves(nnx.state(merged, adapter_vars))
  np.testing.assert_allclose(np.asarray(merged(enc, dec)), routed, rtol=1e-5, atol=1e-5)
  # Merging for task 2 is not merging for task 0.
  assert not np.allclose(np.asarray(forward(model, jnp.full((3,), 0))), routed, atol=1e-4)


def test_t5_transitions_mhr_z_and_mhr_mu():
  model = tiny_t5()
  enc, dec = t5_inputs()
  ids = jnp.asarray([0, 2, 1])
  before = np.asarray(model(enc, dec, ids))
  adapters.to_mhr_z(model, 1, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(model(enc, dec, ids)), before)  # old tasks untouched
  assert np.isfinite(np.asarray(model(enc, dec, jnp.asarray([3, 3, 0])))).all()
  counts = adapters.parameter_counts(model, "mhr_z")
  assert counts["trainable"] == 18 * 2 * 3  # n_layers * S * K for the one new task
  adapters.to_mhr_mu(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.Any(adapters.RouterParam,
                                                      adapters.FrozenRouterParam)))
  # The averaged model ignores task ids (zero-shot MHR-mu).
  out = np.asarray(model(enc, dec, jnp.asarray([0, 1, 2])))
  np.testing.assert_array_equal(np.asarray(model(enc, dec, None)), out)


def _xl_counts(num_layers):
  """Counts of the T0 setting on T5-XL-shaped layers (abstract: nothing is allocated)."""
  from mhr_jax import network

  cfg = network.preset("xl", num_layers=num_layers)

  def build(mode, **kw):
    config = AdapterConfig(mode=mode, n_tasks=1, lora_rank=1, layers="t0", **kw)
    return nnx.eval_shape(lambda: network.T5(
        cfg, rngs=nnx.Rngs(0), adapter_factory=adapters.make_adapter_factory(config)))

  lora, mhr = build("lora"), build("mhr", n_skills=8, n_splits=64)
  return dict(
      n_linears=len(list(adapters.adapter_slots(lora))),
      lora=adapters.parameter_counts(lora, "lora")["trainable"],
      skills=adapters.parameter_counts(mhr, "mhr")["adapters"],
      routing=adapters.parameter_counts(mhr, "mhr")["routing"],
      mhr_z=adapters.parameter_counts(mhr, "mhr_z")["trainable"])


def _check_xl_counts(counts):
  assert counts["n_linears"] == 432
  assert counts["lora"] == 2_211_840  # one LoRA
  assert counts["skills"] == 17_694_720  # K = 8 skills (splitting does not change the size)
  assert counts["routing"] == counts["mhr_z"] == 221_184  # MHR-z, S = 64: per task


def test_trainable_counts_t0_setting_at_t5_xl_shape():
  """algorithm.md section 6: 432 adapted linears, rank 1, K = 8, S = 64 for MHR-z.

  All 24 encoder and 24 decoder layers of T5-XL have the same shapes, so one of each is built
  and the counts scaled; the slow test builds all 48.
  """
  one = _xl_counts(num_layers=1)
  _check_xl_counts({k: 24 * v for k, v in one.items()})


@pytest.mark.slow
def test_trainable_counts_full_t5_xl():
  _check_xl_counts(_xl_counts(num_layers=24))
