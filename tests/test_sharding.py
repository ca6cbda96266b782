"""Sharding: rule tables, sharded init, and one train step giving the same result on every mesh."""

import functools
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mhr_jax import axes, data, evaluation, models, network, sharding, steps, trainer

MESHES = [(8, 1), (2, 4), (1, 8)]
TINY = dict(vocab_size=128)
# Plain SGD, whose update is the gradient times the learning rate: a gradient that a mesh sums
# wrongly, scales (a mean over the wrong axis) or leaves partial moves the parameters by as much
# as the update itself. (Adam's first steps are about lr * sign(g), blind to a scaled gradient.)
# The rate is large enough that three steps move parameters far beyond the comparison tolerance
# (``test_train_steps_are_mesh_independent`` checks that), small enough to stay stable.
LEARNING_RATE = 2.0
N_STEPS = 3
PARAM_ATOL = 1e-5  # float32 sums in another order over three steps; the updates are ~1e-2


def make_tx():
  return optax.sgd(LEARNING_RATE)


def build_t5(dropout_rate=0.0, seed=0):
  cfg = network.preset("tiny", dropout_rate=dropout_rate, **TINY)
  return lambda: network.T5(cfg, rngs=nnx.Rngs(seed))


def make_batch(seed, batch_size=16, in_len=12, out_len=8):
  """A deterministic random encoder-decoder batch as host numpy arrays."""
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, TINY["vocab_size"], size=(batch_size, in_len)).astype(np.int32)
  enc[:, -3:] = 0  # some padding
  tgt = rs.randint(2, TINY["vocab_size"], size=(batch_size, out_len)).astype(np.int32)
  tgt[::2, -2:] = 0
  dec_in = np.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  return {
      "encoder_input_tokens": enc,
      "decoder_input_tokens": dec_in,
      "decoder_target_tokens": tgt,
      "task_ids": np.zeros((batch_size,), np.int32),
  }


def test_mesh_config_resolves_fill():
  assert sharding.MeshConfig(-1, 4).resolve(8) == (2, 4)
  assert sharding.MeshConfig(2, -1).resolve(8) == (2, 4)
  with pytest.raises(ValueError, match="devices"):
    sharding.MeshConfig(3, 1).resolve(8)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, model=-1))
  assert dict(mesh.shape) == {"data": 2, "model": 4}


def test_rules_map_logical_axes_with_divisibility_fallback():
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 4))
  rules = sharding.logical_rules("fsdp_tp")
  spec = sharding.logical_to_spec((axes.EMBED, axes.MLP), (64, 128), mesh, rules)
  assert spec == jax.sharding.PartitionSpec("data", "model")
  fallbacks = []
  # 6 heads are not divisible by the 4-way model axis: replicated, and reported.
  spec = sharding.logical_to_spec(
      (axes.RELPOS_BUCKETS, axes.HEADS), (32, 6), mesh, rules, fallbacks=fallbacks)
  assert spec == jax.sharding.PartitionSpec(None, None)
  assert fallbacks == [(1, axes.HEADS, "model")]
  dp = sharding.logical_to_spec((axes.EMBED, axes.MLP), (64, 128), mesh, sharding.logical_rules())
  assert dp == jax.sharding.PartitionSpec(None, None)
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    sharding.logical_rules("zero3")


def test_constrain_is_a_noop_without_rules():
  x = jnp.ones((4, 8))
  assert sharding.constrain(x, (axes.BATCH, axes.ACT_EMBED)) is x


# What each strategy shards, stated apart from ``sharding.logical_rules``: parameter axis name ->
# mesh axis (t5x's standard rules, ``partitioning.standard_logical_axis_rules``).
EXPECTED_PARAM_RULES = {
    "dp": {},
    "tp": {axes.VOCAB: "model", axes.MLP: "model", axes.HEADS: "model", axes.JOINED_KV: "model"},
    "fsdp": {axes.EMBED: "data"},
    "fsdp_tp": {axes.VOCAB: "model", axes.MLP: "model", axes.HEADS: "model",
                axes.JOINED_KV: "model", axes.EMBED: "data"},
}


def expected_spec(logical, shape, mesh, strategy):
  """Each dimension on its rule's mesh axis where that axis divides it and is still free."""
  used, spec = set(), []
  for name, size in zip(logical, shape):
    axis = EXPECTED_PARAM_RULES[strategy].get(name)
    ok = axis is not None and axis not in used and size % mesh.shape[axis] == 0
    spec.append(axis if ok else None)
    used.update([axis] if ok else [])
  return tuple(spec)


@pytest.mark.parametrize("strategy", sharding.STRATEGIES)
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_every_param_gets_the_sharding_of_its_axis_names(strategy, mesh_shape):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  abstract = nnx.eval_shape(build_t5())
  state = nnx.state(abstract, nnx.Param)
  shardings = sharding.state_shardings(state, mesh, sharding.logical_rules(strategy))
  n_sharded = 0
  for (path, var), (_, sh) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
    logical = var.get_metadata().get("logical_axes")
    assert logical is not None and len(logical) == var.ndim, path
    named = sh.get_value()
    assert isinstance(named, jax.sharding.NamedSharding), path
    spec = tuple(named.spec) + (None,) * (var.ndim - len(named.spec))
    assert spec == expected_spec(logical, var.shape, mesh, strategy), (path, var.shape, spec)
    n_sharded += any(axis is not None and mesh.shape[axis] > 1 for axis in spec)
  # Every strategy but dp splits something over a mesh axis of more than one device.
  uses = {axis for axis in EXPECTED_PARAM_RULES[strategy].values() if mesh.shape[axis] > 1}
  assert (n_sharded > 0) == bool(uses), n_sharded


def test_fsdp_init_splits_params_across_devices():
  mesh = sharding.make_mesh(sharding.MeshConfig(8, 1))
  model = sharding.init_sharded(
      build_t5(), mesh, sharding.logical_rules("fsdp"), compiler_options=sharding.FAST_COMPILE)
  kernel = model.encoder.layers_0.mlp.wi_0.kernel[...]  # (embed 64, mlp 128)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 128)}
  assert len({s.device for s in kernel.addressable_shards}) == 8
  # Same values as an unsharded build.
  ref = nnx.to_pure_dict(host_model(0.0)[1])
  np.testing.assert_allclose(
      np.asarray(kernel), ref["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"], atol=1e-6, rtol=0)


def host_tree(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


@functools.lru_cache(maxsize=None)
def host_model(dropout_rate):
  """The tiny T5 built once on the host: (graphdef, state with numpy parameters)."""
  graphdef, state = nnx.split(build_t5(dropout_rate)())
  is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return graphdef, jax.tree.map(lambda x: x if is_key(x) else np.asarray(x), state)


def place(mesh_shape, strategy, dropout_rate):
  """The tiny T5 placed on a mesh: (mesh, graphdef, trainable, frozen, opt_state, opt_shardings).

  init_sharded has its own test; placing one host copy keeps each case to one compilation.
  """
  devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), devices=devices)
  rules = sharding.logical_rules(strategy)
  graphdef, state = host_model(dropout_rate)
  model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
  graphdef, trainable, frozen = steps.split_model(model, nnx.Param)
  opt_state, opt_sh = steps.init_opt_state(make_tx(), trainable, mesh, rules)
  return mesh, graphdef, trainable, frozen, opt_state, opt_sh


@functools.lru_cache(maxsize=None)
def jitted_step(mesh_shape, strategy, dropout_rate):
  """The jitted full fine-tuning step of the tiny T5 on a mesh, built once per case."""
  mesh, graphdef, trainable, frozen, _, opt_sh = place(mesh_shape, strategy, dropout_rate)
  rules = sharding.logical_rules(strategy)
  loss_fn = functools.partial(models.loss_fn, deterministic=dropout_rate == 0.0)
  return steps.jit_train_step(
      steps.make_train_step(graphdef, make_tx(), loss_fn), mesh,
      sharding.state_shardings(trainable, mesh, rules),
      sharding.state_shardings(frozen, mesh, rules), opt_sh, rules=rules,
      compiler_options=sharding.FAST_COMPILE)


def run_steps(mesh_shape, strategy, dropout_rate, n_steps=N_STEPS, seed_batch=0):
  """Full fine-tuning of the tiny T5 for ``n_steps`` on a mesh; returns (losses, params)."""
  mesh, _, trainable, frozen, opt_state, _ = place(mesh_shape, strategy, dropout_rate)
  step = jitted_step(mesh_shape, strategy, dropout_rate)
  losses = []
  for i in range(n_steps):
    batch = sharding.global_batch(make_batch(seed_batch + i), mesh)
    rng = jax.random.fold_in(jax.random.key(123), i)
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, rng)
    assert bool(metrics["is_finite"])
    losses.append(float(metrics["loss"]))
  return losses, host_tree(trainable), trainable


@functools.lru_cache(maxsize=None)
def reference(dropout_rate):
  losses, params, _ = run_steps((1, 1), "dp", dropout_rate)
  return losses, params


def assert_trees_close(a, b, atol=PARAM_ATOL):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


# Each mesh once in the default suite; the full product of meshes and strategies is slow.
FAST_CASES = [((8, 1), "dp"), ((8, 1), "fsdp"), ((2, 4), "fsdp_tp"), ((1, 8), "tp")]
ALL_CASES = [(m, s) for m in MESHES for s in ("dp", "tp", "fsdp", "fsdp_tp")]
CASES = [pytest.param(m, s, marks=[] if (m, s) in FAST_CASES else [pytest.mark.slow])
         for m, s in ALL_CASES]


@pytest.mark.parametrize("mesh_shape,strategy", CASES)
def test_train_steps_are_mesh_independent(mesh_shape, strategy):
  ref_losses, ref_params = reference(0.0)
  losses, params, trainable = run_steps(mesh_shape, strategy, 0.0)
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert_trees_close(params, ref_params)
  # The comparison can tell: the steps moved the parameters by 100 times the tolerance.
  initial = host_tree(host_model(0.0)[1].filter(nnx.Param))
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(initial)))
  assert moved > 100 * PARAM_ATOL, moved
  if strategy == "fsdp" and mesh_shape[0] > 1:
    kernel = trainable["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"][...]
    assert kernel.sharding.spec[0] == "data"  # the step kept the parameter sharding


@pytest.mark.parametrize("mesh_shape", [(2, 4), pytest.param((8, 1), marks=pytest.mark.slow)])
def test_dropout_steps_are_mesh_independent(mesh_shape):
  ref_losses, ref_params = reference(0.1)
  losses, params, _ = run_steps(mesh_shape, "fsdp_tp", 0.1)
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert_trees_close(params, ref_params)
  # Dropout is on: the loss differs from the deterministic one.
  assert abs(losses[0] - reference(0.0)[0][0]) > 1e-4


def test_tensor_parallel_step_constrains_and_shards_the_activations():
  """The step carries t5x's activation constraints (queries, keys, values and attention output by
  heads, the MLP hidden units, the logits by vocabulary over 'model'; every layer's input by
  batch over 'data'), and the compiled program holds those activations split: per device half
  the batch, 1 of the 4 heads and a quarter of the MLP's 128 hidden units."""
  mesh_shape, strategy = (2, 4), "fsdp_tp"  # the default suite's tensor-parallel case
  mesh, _, trainable, frozen, opt_state, _ = place(mesh_shape, strategy, 0.0)
  lowered = jitted_step(mesh_shape, strategy, 0.0).lower(
      trainable, frozen, opt_state, sharding.global_batch(make_batch(0), mesh),
      jax.random.key(0))
  # Batch 16, lengths 12 (encoder) and 8 (decoder), 4 heads x 16, d_model 64, d_ff = vocab = 128.
  constraints = set(re.findall(
      r"sdy.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<([^>]+)>", lowered.as_text()))
  heads = '[{"data"}, {}, {"model"}, {}]'
  hidden = '[{"data"}, {}, {"model"}]'
  embed = '[{"data"}, {}, {}]'
  for length in (12, 8):
    assert (heads, f"16x{length}x4x16xf32") in constraints, constraints
    assert (hidden, f"16x{length}x128xf32") in constraints, constraints
    assert (embed, f"16x{length}x64xf32") in constraints, constraints
  compiled = lowered.compile().as_text()
  assert "f32[8,1,12,12]" in compiled  # encoder attention scores: [B/2, H/4, Lq, Lk]
  assert "f32[8,12,32]" in compiled  # encoder MLP hidden: [B/2, L, d_ff/4]


class TinyDropoutNet(nnx.Module):
  """Any nnx model works with the steps: a linear layer with dropout."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 2, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.linear(x))


def mse(model, batch):
  loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
  return loss, {}


def test_step_rng_reseeds_dropout_without_touching_frozen_state():
  graphdef, trainable, frozen = steps.split_model(TinyDropoutNet(nnx.Rngs(0)))
  tx = optax.sgd(0.1)
  step = jax.jit(steps.make_train_step(graphdef, tx, mse))
  batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 2))}
  frozen_before = jax.tree.map(lambda x: x, frozen)
  runs = [step(trainable, frozen, tx.init(trainable), batch, jax.random.key(k))[2]["loss"]
          for k in (1, 1, 2)]
  assert float(runs[0]) == float(runs[1])
  assert float(runs[0]) != float(runs[2])
  assert jax.tree.all(jax.tree.map(
      lambda a, b: bool(jnp.all(jax.random.key_data(a) == jax.random.key_data(b)))
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else bool(jnp.all(a == b)),
      frozen, frozen_before))


def test_non_finite_step_keeps_the_state():
  graphdef, trainable, frozen = steps.split_model(TinyDropoutNet(nnx.Rngs(0)))
  tx = optax.adamw(1e-3)
  opt_state = tx.init(trainable)

  def nan_loss(model, batch):
    loss, metrics = mse(model, batch)
    return loss * jnp.nan, metrics

  before = host_tree(trainable)
  step = jax.jit(steps.make_train_step(graphdef, tx, nan_loss))
  batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 2))}
  new, new_opt, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(0))
  assert not bool(metrics["is_finite"])
  assert_trees_close(host_tree(new), before, atol=0)
  assert int(new_opt[0].count) == 0


def test_eval_step_is_mesh_independent():
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 4))
  rules = sharding.logical_rules("fsdp_tp")
  graphdef, state = host_model(0.0)
  model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
  graphdef, trainable, frozen = steps.split_model(model)
  ev = steps.jit_eval_step(
      steps.make_eval_step(graphdef, models.score_targets), mesh,
      sharding.state_shardings(trainable, mesh, rules),
      sharding.state_shardings(frozen, mesh, rules), rules=rules,
      compiler_options=sharding.FAST_COMPILE)
  ll, length = ev(trainable, frozen, sharding.global_batch(make_batch(0), mesh))
  assert ll.shape == length.shape == (16,)
  # The same scores on one device, from the unsharded model.
  want_ll, want_length = jax.jit(models.score_targets)(
      nnx.merge(*host_model(0.0)), jax.tree.map(jnp.asarray, make_batch(0)))
  np.testing.assert_allclose(np.asarray(ll), np.asarray(want_ll), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(length, want_length)
  np.testing.assert_array_equal(length, (make_batch(0)["decoder_target_tokens"] > 0).sum(-1))
  assert np.ptp(np.asarray(want_ll)) > 1.0  # rows differ: a row mix-up would show


def test_evaluation_is_mesh_independent(prediction_task):
  """Greedy evaluation of a model sharded over a (2, 4) mesh predicts what it does unsharded."""
  lengths = {"inputs": 16, "targets": 10}
  host = network.T5(network.preset("tiny", vocab_size=259, dropout_rate=0.0), rngs=nnx.Rngs(1))
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 4))
  graphdef, state = nnx.split(host)
  state = jax.device_put(state, sharding.state_shardings(state, mesh,
                                                         sharding.logical_rules("fsdp_tp")))
  sharded = nnx.merge(graphdef, state)
  assert sharded.encoder.layers_0.mlp.wi_0.kernel[...].sharding.spec == P("data", "model")
  table = data.TaskIdTable((prediction_task,))
  cfg = trainer.DataConfig(mixture=prediction_task, eval_tasks=(prediction_task,),
                           feature_lengths=lengths, eval_batch_size=8)
  want = evaluation.evaluate(host, table, cfg, split="test")[prediction_task]["predictions"]
  got = evaluation.evaluate(sharded, table, cfg, split="test")[prediction_task]["predictions"]
  assert got == want
  assert len(want) == 8 and len(set(want)) > 1  # several different predictions to compare


def test_split_model_rejects_bad_filters():
  model = build_t5(0.1)()
  with pytest.raises(ValueError, match="RNG state"):
    steps.split_model(model, ...)
  with pytest.raises(ValueError, match="no variables"):
    steps.split_model(model, nnx.LoRAParam)


# Multi-process: two processes x 4 CPU devices train the same steps as one process with 8.

WORKER = textwrap.dedent("""
    import os, sys
    import jax
    sys.path.insert(0, {repo!r})
    from mhr_jax import sharding
    sharding.maybe_initialize_distributed({coord!r}, 2, int(sys.argv[1]))
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_sharding import host_tree, make_batch, run_multihost
    params = run_multihost()
    if jax.process_index() == 0:
      np.savez({out!r}, **{{jax.tree_util.keystr(p): x for p, x in
                            jax.tree_util.tree_leaves_with_path(params)}})
""")

MULTIHOST_MESH = (4, 2)
MULTIHOST_STEPS = 3
GLOBAL_BATCH = 16


def run_multihost():
  """3 steps of fsdp_tp training where each process feeds only its own rows of each batch."""
  from jax.experimental import multihost_utils
  mesh = sharding.make_mesh(sharding.MeshConfig(*MULTIHOST_MESH))
  rules = sharding.logical_rules("fsdp_tp")
  model = sharding.init_sharded(build_t5(0.1), mesh, rules, compiler_options=sharding.FAST_COMPILE)
  graphdef, trainable, frozen = steps.split_model(model)
  tx = make_tx()
  opt_state, opt_sh = steps.init_opt_state(tx, trainable, mesh, rules)
  step = steps.jit_train_step(
      steps.make_train_step(graphdef, tx, models.loss_fn), mesh,
      sharding.state_shardings(trainable, mesh, rules),
      sharding.state_shardings(frozen, mesh, rules), opt_sh, rules=rules,
      compiler_options=sharding.FAST_COMPILE)
  rows = sharding.host_batch_rows(mesh, GLOBAL_BATCH)
  for i in range(MULTIHOST_STEPS):
    local = jax.tree.map(lambda x: x[rows], make_batch(i, GLOBAL_BATCH))
    batch = sharding.global_batch(local, mesh)
    trainable, opt_state, _ = step(
        trainable, frozen, opt_state, batch, jax.random.fold_in(jax.random.key(123), i))
  return multihost_utils.process_allgather(nnx.to_pure_dict(trainable), tiled=True)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  tests_dir = pathlib.Path(__file__).resolve().parent
  out = tmp_path / "params.npz"
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(
      repo=str(tests_dir.parent), tests=str(tests_dir), coord=f"localhost:{_free_port()}",
      out=str(out)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = np.load(out)
  expected = run_multihost()  # the same program, one process with 8 devices
  flat = jax.tree_util.tree_leaves_with_path(expected)
  assert len(flat) == len(got.files)
  for path, x in flat:
    np.testing.assert_allclose(got[jax.tree_util.keystr(path)], x, atol=PARAM_ATOL, rtol=0)
