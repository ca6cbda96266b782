"""Row-sparse (lazy AdamW) update of the routing tables: OptimizerConfig.routing_update="rows"."""

import functools
import shutil

import gin
import jax
import jax.extend
import numpy as np
import optax
import pytest
from flax import nnx
from test_optimizers import batch, tiny_model

from mhr_jax import adapters, checkpoints, models, optimizers, row_sparse, steps, train
from mhr_jax.optimizers import OptimizerConfig

N_TASKS = 8


def _loss(model, b):
  return models.loss_fn(model, b, deterministic=True)


@functools.lru_cache(maxsize=None)
def _setup(opt_config, n_tasks=N_TASKS, seed=0):
  """Model split, optimizer and jitted step; cached so tests with one config compile it once
  (jax arrays are immutable and the step is pure, so sharing is safe)."""
  model = tiny_model(n_tasks=n_tasks, seed=seed)
  graphdef, trainable, frozen = steps.split_model(model, adapters.trainable_filter("mhr"))
  tx, step = _tx_and_step(opt_config, graphdef, trainable)
  return graphdef, trainable, frozen, tx, jax.jit(step)


def _tx_and_step(opt_config, graphdef, trainable):
  """The optimizer and (unjitted) step the trainer builds for ``opt_config``."""
  if row_sparse.applies(opt_config, trainable):
    tx = row_sparse.RowSparseOptimizer(opt_config, trainable)
    return tx, row_sparse.make_train_step(graphdef, tx, _loss)
  tx = optimizers.make_optimizer(opt_config, trainable)
  return tx, steps.make_train_step(graphdef, tx, _loss)


def _rows_config(**kw):
  defaults = {"routing_update": "rows", "warmup_fraction": 0.0, "total_steps": 10,
              "weight_decay": 0.1}
  return OptimizerConfig(**{**defaults, **kw})


def _tables(state):
  """{path: numpy table} of the routing tables of a trainable state (or m / v)."""
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)
          if isinstance(v, adapters.RouterParam)}


def _others(state):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)
          if not isinstance(v, adapters.RouterParam)}


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_rows_mode_gives_the_row_sparse_optimizer_and_state():
  _, trainable, _, tx, _ = _setup(_rows_config())
  assert isinstance(tx, row_sparse.RowSparseOptimizer)
  state = tx.init(trainable)
  tables = _tables(trainable)
  # m and v mirror the routing tables (shape and Variable type, so they shard and save alike).
  for moments in (state.routing.m, state.routing.v):
    got = _tables(moments)
    assert got.keys() == tables.keys()
    assert all(got[p].shape == tables[p].shape and not got[p].any() for p in got)
  # Without routing tables "rows" is the dense optax transformation.
  _, lora_trainable, _ = steps.split_model(tiny_model(mode="lora"),
                                           adapters.trainable_filter("lora"))
  assert not row_sparse.applies(_rows_config(), lora_trainable)
  assert isinstance(optimizers.make_optimizer(_rows_config(), lora_trainable),
                    optax.GradientTransformation)
  # With them, the optax factory and the dense step refuse it, naming the row-sparse module.
  with pytest.raises(ValueError, match="row_sparse"):
    optimizers.make_optimizer(_rows_config(), trainable)
  with pytest.raises(TypeError, match="row_sparse.make_train_step"):
    steps.make_train_step(None, tx, _loss)


def test_rows_absent_from_every_batch_keep_their_values_and_moments_bit_for_bit():
  _, trainable, _, tx, step = _setup(_rows_config())
  _, _, frozen, dense_tx, dense_step = _setup(_rows_config(routing_update="dense"))
  init_tables = _tables(trainable)
  state = tx.init(trainable)
  init_m, init_v = _tables(state.routing.m), _tables(state.routing.v)
  dense_trainable, dense_state = trainable, dense_tx.init(trainable)
  seen = [1, 3, 5]
  for i, ids in enumerate([[3, 1, 3, 5], [5, 5, 1, 1], [1, 3, 3, 3]]):
    trainable, state, metrics = step(trainable, frozen, state, batch(ids, seed=i),
                                     jax.random.key(i))
    dense_trainable, dense_state, _ = dense_step(dense_trainable, frozen, dense_state,
                                                 batch(ids, seed=i), jax.random.key(i))
    assert bool(metrics["is_finite"])
  absent = [t for t in range(N_TASKS) if t not in seen]
  tables, m, v = _tables(trainable), _tables(state.routing.m), _tables(state.routing.v)
  dense_tables = _tables(dense_trainable)
  assert int(state.routing.count) == 3
  for p in init_tables:
    assert tables[p][absent].tobytes() == init_tables[p][absent].tobytes(), p
    assert m[p][absent].tobytes() == init_m[p][absent].tobytes(), p
    assert v[p][absent].tobytes() == init_v[p][absent].tobytes(), p
    assert (tables[p][seen] != init_tables[p][seen]).all(), p
    assert (m[p][seen] != 0).all() and (v[p][seen] != 0).all(), p
    # The dense AdamW moves absent rows too (weight decay): the two modes really differ.
    assert (dense_tables[p][absent] != init_tables[p][absent]).all(), p


@functools.lru_cache(maxsize=None)
def _grad_fns(graphdef):
  """Jitted gradients of the dense tables and of the gathered rows, compiled once per model
  (the batch and the rows are arguments, not closure constants, so each step reuses them)."""
  def dense(trainable, frozen, b):
    return _loss(nnx.merge(graphdef, trainable, frozen, copy=True), b)[0]

  def rows(row_tables, rest, frozen, b):
    return _loss(nnx.merge(graphdef, rest, row_tables, frozen, copy=True), b)[0]
  return jax.jit(jax.grad(dense)), jax.jit(jax.grad(rows))


def _dense_grads(graphdef, trainable, frozen, b):
  return _grad_fns(graphdef)[0](trainable, frozen, b)


def _row_grads(graphdef, trainable, frozen, b, n_tasks):
  """Gradients of the gathered rows, through the step's renumbering of the task ids."""
  tables, rest = row_sparse.split_routing(trainable)
  rows, local_ids = row_sparse.batch_rows(b["task_ids"], n_tasks)
  row_tables = jax.tree.map(lambda t: row_sparse.take_rows(t, rows), tables)
  grads = _grad_fns(graphdef)[1](row_tables, rest, frozen, dict(b, task_ids=local_ids))
  return np.asarray(rows), _tables(grads)


def test_touched_rows_follow_a_numpy_lazy_adamw_with_summed_duplicate_gradients():
  clip, wd, peak, total = 0.05, 0.1, 0.1, 10
  config = _rows_config(grad_clip_norm=clip, weight_decay=wd, routing_learning_rate=peak,
                        total_steps=total)
  graphdef, trainable, frozen, tx, step = _setup(config)
  state = tx.init(trainable)
  ref_p = {p: x.astype(np.float64) for p, x in _tables(trainable).items()}
  ref_m = {p: np.zeros_like(x) for p, x in ref_p.items()}
  ref_v = {p: np.zeros_like(x) for p, x in ref_p.items()}
  # Task 5 first appears at step 2: its bias correction uses the global count, not its own.
  for t, ids in enumerate([[3, 1, 3, 0], [5, 3, 5, 5]]):
    b = batch(ids, seed=t)
    dense = _dense_grads(graphdef, trainable, frozen, b)
    dense_tables = _tables(dense)
    uniq = sorted(set(ids))
    rows, row_grads = _row_grads(graphdef, trainable, frozen, b, N_TASKS)
    assert rows[:len(uniq)].tolist() == uniq and (rows[len(uniq):] == N_TASKS).all()
    for p, g in dense_tables.items():
      assert not np.delete(g, uniq, axis=0).any(), p  # absent rows: zero dense gradient
      # Two programs fused differently: float32 rounding of sums that cancel, relative to the
      # table's largest gradient (a wrong row or sum is off by percents).
      np.testing.assert_allclose(row_grads[p][:len(uniq)], g[uniq], rtol=1e-5,
                                 atol=1e-6 * np.abs(g).max(), err_msg=str(p))
      assert not row_grads[p][len(uniq):].any(), p
    # NumPy lazy AdamW on the dense gradient's rows, clipped by the dense global norm.
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(dense)))
    scale = 1.0 if norm < clip else clip / norm
    lr = peak * (1 - t / total)
    for p, table in ref_p.items():
      g = dense_tables[p][uniq].astype(np.float64) * scale
      m = 0.9 * ref_m[p][uniq] + 0.1 * g
      v = 0.999 * ref_v[p][uniq] + 0.001 * g * g
      m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
      table[uniq] -= lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + wd * table[uniq])
      ref_m[p][uniq], ref_v[p][uniq] = m, v
    trainable, state, metrics = step(trainable, frozen, state, b, jax.random.key(t))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    assert norm > clip  # clipping took part
    got_p, got_m, got_v = (_tables(trainable), _tables(state.routing.m),
                           _tables(state.routing.v))
    for p, table in ref_p.items():
      # Adam divides by sqrt(v): float32 rounding of tiny gradients (the jitted reference and
      # the step fuse differently) shows at ~1e-5 relative in the update, far below a semantic
      # error (a wrong bias-correction count or decay moves rows by percents).
      np.testing.assert_allclose(got_p[p], table, rtol=1e-4, atol=1e-6, err_msg=str(p))
      np.testing.assert_allclose(got_m[p], ref_m[p], rtol=1e-5, atol=1e-10, err_msg=str(p))
      np.testing.assert_allclose(got_v[p], ref_v[p], rtol=1e-5, atol=1e-14, err_msg=str(p))


def test_one_step_matches_the_dense_update_on_adapters_and_touched_rows():
  config = _rows_config(grad_clip_norm=0.05)
  _, trainable, frozen, tx, step = _setup(config)
  _, _, _, dense_tx, dense_step = _setup(_rows_config(grad_clip_norm=0.05,
                                                      routing_update="dense"))
  ids = [6, 2, 6, 6]
  b = batch(ids, seed=3)
  rows, _, metrics = step(trainable, frozen, tx.init(trainable), b, jax.random.key(0))
  dense, _, dense_metrics = dense_step(trainable, frozen, dense_tx.init(trainable), b,
                                       jax.random.key(0))
  np.testing.assert_allclose(float(metrics["loss"]), float(dense_metrics["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(dense_metrics["grad_norm"]),
                             rtol=1e-5)
  assert float(metrics["grad_norm"]) > 0.05  # the clipping scale is shared
  got, want = _others(rows), _others(dense)
  assert got.keys() == want.keys() and got
  for p in got:
    np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6, err_msg=str(p))
  assert any(np.abs(got[p] - _others(trainable)[p]).max() > 1e-4 for p in got)  # they moved
  got, want = _tables(rows), _tables(dense)
  for p in got:  # from zero moments the first step of a touched row is the dense one
    np.testing.assert_allclose(got[p][[2, 6]], want[p][[2, 6]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [N_TASKS, -1])
def test_out_of_range_task_id_is_not_finite_and_leaves_the_state_unchanged(bad):
  _, trainable, frozen, tx, step = _setup(_rows_config())
  state = tx.init(trainable)
  trainable, state, _ = step(trainable, frozen, state, batch([1, 2, 2, 4]), jax.random.key(0))
  before_t, before_s = jax.tree.map(np.asarray, (trainable, state))
  _, _, metrics = step(trainable, frozen, state, batch([1, bad, 2, 4]), jax.random.key(1))
  assert not bool(metrics["is_finite"])
  assert not np.isfinite(float(metrics["loss"]))
  new_t, new_s, _ = step(trainable, frozen, state, batch([1, bad, 2, 4]), jax.random.key(1))
  assert _leaves_equal(new_t, before_t) and _leaves_equal(new_s, before_s)


def test_no_full_table_gradient_is_formed():
  """The transpose of the routing gather is a scatter-add into a table-shaped gradient in the
  dense step; the rows step must have none (13 rows: a size nothing else has)."""
  def scatter_adds(routing_update):
    graphdef, trainable, frozen, tx, _ = _setup(_rows_config(routing_update=routing_update),
                                                n_tasks=13)
    _, fn = _tx_and_step(_rows_config(routing_update=routing_update), graphdef, trainable)
    jaxpr = jax.make_jaxpr(fn)(trainable, frozen, tx.init(trainable), batch([1, 2, 2, 4]),
                               jax.random.key(0))
    found = []

    def walk(jp):
      for eqn in jp.eqns:
        if eqn.primitive.name == "scatter-add":
          found.extend(v.aval.shape for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    return [s for s in found if s and s[0] == 13]
  assert scatter_adds("dense")
  assert not scatter_adds("rows")


def test_bad_configurations_raise():
  with pytest.raises(ValueError, match="'sparse'"):
    OptimizerConfig(routing_update="sparse")
  with pytest.raises(ValueError, match="'adafactor'"):
    OptimizerConfig(name="adafactor", routing_update="rows")
  model = tiny_model(n_tasks=3)
  adapters.to_mhr_z(model, 1, jax.random.key(3))
  graphdef, trainable, frozen = steps.split_model(model, adapters.trainable_filter("mhr_z"))
  tx, step = _tx_and_step(_rows_config(), graphdef, trainable)
  with pytest.raises(ValueError, match="FrozenRouterParam"):
    step(trainable, frozen, tx.init(trainable), batch([3, 3]), jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# Through the trainer and gin.

TINY = {"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4,
        "num_layers": 1, "dropout_rate": 0.0}


def _gin_run(model_dir, *extra):
  gin.clear_config()
  try:
    train.parse_gin(
        ["runs/pretrain.gin", "models/t5_1_1_tiny.gin", "adapters/mhr.gin",
         "overlays/cpu_tiny.gin"],
        [f"MODEL_DIR='{model_dir}'", "MIXTURE='synthetic_pretrain'", "TRAIN_STEPS=4",
         "N_SPLITS=2", "N_SKILLS=4", "INPUTS_LENGTH=16", "TARGETS_LENGTH=16",
         f"ModelConfig.overrides={TINY!r}", "TrainConfig.checkpoint_every=2",
         "OptimizerConfig.routing_update='rows'", *extra], [])
    return train.main_entry()
  finally:
    gin.clear_config()


@pytest.mark.slow  # two gin runs with compilation on 8 fake devices: about 110 s
def test_trainer_runs_rows_mode_through_gin_and_resumes_from_its_checkpoint(tmp_path):
  full = tmp_path / "full"
  res = _gin_run(full)
  assert res["steps"] == 4 and np.isfinite(res["final_loss"])
  assert "routing_update = 'rows'" in (full / "config.gin").read_text()
  # Resume: the same run with its last checkpoint removed restarts from step 2 (restoring the
  # row-sparse optimizer state) and must end where the uninterrupted run ended.
  resumed = tmp_path / "resumed"
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  assert checkpoints.read_metadata(resumed)["step"] == 2
  _gin_run(resumed)
  a, b = checkpoints.read_params(full), checkpoints.read_params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))
  # The dense and row-sparse optimizer states differ: switching mode on resume is named.
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="routing_update: checkpoint 'rows', config 'dense'"):
    _gin_run(resumed, "OptimizerConfig.routing_update='dense'", "TRAIN_STEPS=6")
  with pytest.raises(ValueError, match="vmap_tasks"):
    _gin_run(tmp_path / "vmap", "TrainConfig.vmap_tasks=True")
