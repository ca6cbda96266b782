"""Checkpoints: async round trip onto another mesh, metadata checks, crash safety, partial load."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mhr_jax import checkpoints, sharding, steps
from mhr_jax.checkpoints import CheckpointManager, CheckpointMismatchError

TASKS = {"cola": 0, "rte": 1}


class Net(nnx.Module):
  """A small model with logical axes, standing in for backbone + adapters."""

  def __init__(self, n_tasks, rngs):
    init = jax.nn.initializers.normal(1.0)
    self.kernel = nnx.Param(init(rngs.params(), (16, 32)), logical_axes=("embed", "mlp"))
    self.router = nnx.Param(init(rngs.params(), (n_tasks, 8)), logical_axes=("tasks", "routing"))
    self.scale = nnx.Param(jnp.ones((32,)), logical_axes=("mlp",))


def sharded_state(mesh_shape, n_tasks=2, seed=0, strategy="fsdp_tp"):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  rules = sharding.logical_rules(strategy)
  model = sharding.init_sharded(lambda: Net(n_tasks, nnx.Rngs(seed)), mesh, rules)
  _, trainable, _ = steps.split_model(model)
  tx = optax.adamw(1e-3)
  opt_state, opt_sh = steps.init_opt_state(tx, trainable, mesh, rules)
  return mesh, rules, trainable, opt_state, opt_sh


def metadata_for(trainable, mode="finetune", tasks=TASKS):
  return checkpoints.make_metadata(
      mode=mode, task_table=tasks, trainable=trainable, backbone="/ckpt/t5_small",
      model_config={"d_model": 16}, adapter_config={"n_skills": 4})


def abstract(tree, mesh, rules):
  return sharding.abstract_with_shardings(tree, sharding.state_shardings(tree, mesh, rules))


def pure(tree):
  return jax.tree.map(np.asarray, tree.to_pure_dict())


def test_async_round_trip_onto_another_mesh(tmp_path):
  _, _, trainable, opt_state, _ = sharded_state((8, 1))
  # Make the optimizer state non-trivial.
  opt_state = jax.tree.map(lambda x: x + 1, opt_state)
  mgr = CheckpointManager(str(tmp_path), max_to_keep=2)
  meta = metadata_for(trainable)
  for step in (10, 20, 30):
    assert mgr.save(step, trainable, opt_state, data_position={"epoch": 0, "index": step},
                    metadata=meta)
  mgr.wait_until_finished()
  assert mgr.all_steps() == [20, 30]  # max_to_keep
  assert os.path.isfile(tmp_path / "30" / "task_table" / "task_table.json")

  mesh, rules, target_tr, target_opt, _ = sharded_state((2, 4), seed=1)
  restored, opt, saved = CheckpointManager(str(tmp_path)).restore(
      mgr.latest_step(), abstract(target_tr, mesh, rules), abstract(target_opt, mesh, rules),
      expected=meta)
  assert saved["data_position"] == {"epoch": 0, "index": 30}
  assert saved["task_table"] == TASKS and saved["backbone"] == "/ckpt/t5_small"
  jax.tree.map(np.testing.assert_array_equal, pure(restored), pure(trainable))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, opt),
               jax.tree.map(np.asarray, opt_state))
  expected_sh = sharding.state_shardings(target_tr, mesh, rules)
  for (_, got), (_, want) in zip(nnx.to_flat_state(restored), nnx.to_flat_state(expected_sh)):
    assert got.get_value().sharding == want.get_value()
  assert restored["kernel"][...].sharding.spec == jax.sharding.PartitionSpec("data", "model")


def test_metadata_mismatch_names_every_difference(tmp_path):
  _, _, trainable, opt_state, _ = sharded_state((8, 1))
  mgr = CheckpointManager(str(tmp_path), async_save=False)
  mgr.save(1, trainable, opt_state, data_position=0, metadata=metadata_for(trainable))
  mesh, rules, tr3, opt3, _ = sharded_state((8, 1), n_tasks=3)
  expected = metadata_for(tr3, mode="mhr_z", tasks={"cola": 1, "boolq": 2, "wnli": 0})
  with pytest.raises(CheckpointMismatchError) as err:
    mgr.restore(1, abstract(tr3, mesh, rules), abstract(opt3, mesh, rules), expected=expected)
  msg = str(err.value)
  assert "mode: checkpoint 'finetune', config 'mhr_z'" in msg
  assert "task 'rte' (id 1) is in the checkpoint" in msg
  assert "task 'boolq' (id 2) is in the config" in msg
  assert "task 'cola' has id 0 in the checkpoint, 1 in the config" in msg
  assert "parameter router has shape (2, 8) in the checkpoint, (3, 8) in the model" in msg
  # Shapes are checked even without expected metadata.
  with pytest.raises(CheckpointMismatchError, match="parameter router"):
    mgr.restore(1, abstract(tr3, mesh, rules), abstract(opt3, mesh, rules))


def test_crash_mid_save_leaves_last_good_checkpoint(tmp_path):
  _, _, trainable, opt_state, _ = sharded_state((8, 1))
  meta = metadata_for(trainable)
  mgr = CheckpointManager(str(tmp_path))
  mgr.save(5, trainable, opt_state, data_position=5, metadata=meta)
  mgr.wait_until_finished()
  # A save of step 6 killed half-way leaves only orbax's temporary directory behind.
  leftover = tmp_path / "6.orbax-checkpoint-tmp-1234567"
  (leftover / "trainable").mkdir(parents=True)
  (leftover / "trainable" / "partial").write_bytes(b"\0" * 10)
  mgr2 = CheckpointManager(str(tmp_path))
  assert mgr2.latest_step() == 5
  mesh, rules = sharding.make_mesh(sharding.MeshConfig(8, 1)), sharding.logical_rules("fsdp_tp")
  restored, _, saved = mgr2.restore(
      5, abstract(trainable, mesh, rules), abstract(opt_state, mesh, rules), expected=meta)
  assert saved["data_position"] == 5
  jax.tree.map(np.testing.assert_array_equal, pure(restored), pure(trainable))
  # The next save of step 6 succeeds despite the leftover.
  mgr2.save(6, trainable, opt_state, data_position=6, metadata=meta)
  mgr2.wait_until_finished()
  assert mgr2.latest_step() == 6


def test_restore_partial_reports_what_it_loaded(tmp_path):
  _, _, pre, pre_opt, _ = sharded_state((8, 1), n_tasks=2, seed=0)
  mgr = CheckpointManager(str(tmp_path), async_save=False)
  mgr.save(100, pre, pre_opt, data_position=None, metadata=metadata_for(pre, mode="pretrain"))

  class FinetuneNet(Net):
    def __init__(self, rngs):
      super().__init__(5, rngs)  # a router for the 5 fine-tuning tasks
      self.head = nnx.Param(jnp.zeros((32, 4)), logical_axes=("mlp", "vocab"))

  mesh, rules = sharding.make_mesh(sharding.MeshConfig(2, 4)), sharding.logical_rules("fsdp_tp")
  model = sharding.init_sharded(lambda: FinetuneNet(nnx.Rngs(7)), mesh, rules)
  _, target, _ = steps.split_model(model)
  loaded, report = mgr.restore_partial(100, target)
  assert report.loaded == ["kernel", "scale"]
  assert report.not_loaded == ["head"]
  assert report.shape_mismatch == {"router": ((2, 8), (5, 8))}
  assert report.unused == []
  np.testing.assert_array_equal(loaded["kernel"][...], pre["kernel"][...])
  np.testing.assert_array_equal(loaded["router"][...], target["router"][...])
  assert loaded["kernel"][...].sharding == target["kernel"][...].sharding


# Damaged checkpoints: named, skipped for the newest intact one, never a silent restart.


def _files(root):
  """{relative path: size} of every file under root."""
  return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
          if p.is_file()}


def _truncate_array_file(step_dir):
  biggest = max((p for p in (step_dir / "trainable").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:10])
  return str(biggest.relative_to(step_dir)), "bytes"


def _truncate_json(step_dir):
  path = step_dir / "metadata" / "metadata"
  path.write_text(path.read_text()[:40])
  return "metadata/metadata", "not valid JSON"


def _drop_commit_marker(step_dir):
  (step_dir / "commit_success.txt").unlink()
  return "commit_success.txt", "no commit marker"


@pytest.mark.parametrize("damage", [_truncate_array_file, _truncate_json, _drop_commit_marker])
def test_damaged_newest_step_is_named_and_the_older_one_restored(tmp_path, capsys, damage):
  _, _, trainable, opt_state, _ = sharded_state((8, 1))
  meta = metadata_for(trainable)
  directory = tmp_path / "checkpoints"
  mgr = CheckpointManager(str(directory), async_save=False)
  for step in (1, 2, 3):
    mgr.save(step, jax.tree.map(lambda x, s=step: x + s, trainable), opt_state,
             data_position=step, metadata=meta)
  mgr.close()
  name, why = damage(directory / "3")
  damaged_files = _files(directory / "3")

  mgr = CheckpointManager(str(directory))
  mesh, rules = sharding.make_mesh(sharding.MeshConfig(8, 1)), sharding.logical_rules("fsdp_tp")
  restored, _, saved = mgr.restore_latest(
      abstract(trainable, mesh, rules), abstract(opt_state, mesh, rules), expected=meta)
  assert saved["step"] == 2 and saved["data_position"] == 2
  jax.tree.map(np.testing.assert_array_equal, pure(restored),
               pure(jax.tree.map(lambda x: x + 2, trainable)))
  err = capsys.readouterr().err
  assert f"step 3 ({directory / '3'})" in err and name in err and why in err
  assert "resuming from step 2" in err
  # Moved aside whole, not deleted; orbax no longer lists it, so step 3 can be saved again.
  aside = tmp_path / "checkpoints_damaged" / "3"
  assert _files(aside) == damaged_files
  assert mgr.all_steps() == [1, 2]
  mgr.save(3, trainable, opt_state, data_position=3, metadata=meta)
  mgr.wait_until_finished()
  assert mgr.all_steps() == [1, 2, 3]
  assert checkpoints.integrity.problems(directory / "3") == []


def test_no_intact_step_stops_and_names_the_folder(tmp_path):
  _, _, trainable, opt_state, _ = sharded_state((8, 1))
  meta = metadata_for(trainable)
  directory = tmp_path / "checkpoints"
  mgr = CheckpointManager(str(directory), async_save=False)
  mgr.save(1, trainable, opt_state, data_position=1, metadata=meta)
  mgr.save(2, trainable, opt_state, data_position=2, metadata=meta)
  mgr.close()
  _truncate_json(directory / "1")
  _truncate_array_file(directory / "2")
  before = _files(tmp_path)
  mgr = CheckpointManager(str(directory))
  mesh, rules = sharding.make_mesh(sharding.MeshConfig(8, 1)), sharding.logical_rules("fsdp_tp")
  with pytest.raises(checkpoints.CheckpointDamagedError) as err:
    mgr.restore_latest(abstract(trainable, mesh, rules), abstract(opt_state, mesh, rules),
                       expected=meta)
  msg = str(err.value)
  assert f"no intact checkpoint in {directory}" in msg
  assert f"step 2 ({directory / '2'})" in msg and f"step 1 ({directory / '1'})" in msg
  assert "metadata/metadata is not valid JSON" in msg and "Nothing was moved or deleted" in msg
  assert _files(tmp_path) == before
  assert isinstance(err.value, checkpoints.CheckpointError)


def test_restore_latest_of_an_empty_folder_is_none(tmp_path):
  _, _, trainable, opt_state, _ = sharded_state((8, 1))
  mesh, rules = sharding.make_mesh(sharding.MeshConfig(8, 1)), sharding.logical_rules("fsdp_tp")
  mgr = CheckpointManager(str(tmp_path / "checkpoints"))
  assert mgr.restore_latest(abstract(trainable, mesh, rules),
                            abstract(opt_state, mesh, rules)) is None
