"""The trainer: resume after SIGKILL, vmapped fine-tuning, non-finite loss, mismatched checkpoints."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import seqio

from mhr_jax import adapters, checkpoints, data, optimizers, run_state, sharding, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4,
        "num_layers": 1, "dropout_rate": 0.1}
LENGTHS = {"inputs": 24, "targets": 24}


def _run(model_dir, *, kind="pretrain", mode="poly", mixture="synthetic_pretrain", steps=3,
         vmap=False, init_from=None, lr=1e-2, eval_tasks=(), **train_kw):
  adapter = None if mode == "full" else adapters.AdapterConfig(
      mode=mode, n_skills=1 if mode == "lora" else 4, n_splits=2 if mode.startswith("mhr") else 1,
      lora_rank=2, layers="super_ni")
  return trainer.run(
      kind=kind, model_dir=str(model_dir),
      model_config=trainer.ModelConfig(size="tiny", overrides=TINY),
      adapter_config=adapter,
      optimizer_config=optimizers.OptimizerConfig(learning_rate=lr),
      data_config=trainer.DataConfig(mixture=mixture, eval_tasks=tuple(eval_tasks),
                                     feature_lengths=LENGTHS, batch_size=8, eval_batch_size=16,
                                     max_eval_examples=16),
      train_config=trainer.TrainConfig(steps=steps, checkpoint_every=1, log_every=1,
                                       vmap_tasks=vmap, init_from=init_from, **train_kw))


def _params(model_dir):
  return checkpoints.read_params(model_dir)


def _assert_same(a, b, atol=0.0):
  assert a.keys() == b.keys()
  for k in a:
    if atol:
      np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg="/".join(k))
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


def test_vmapped_finetuning_equals_separate_runs(tmp_path):
  _run(tmp_path / "pre", steps=2)
  heldout = [f"synthetic_heldout_{i:03d}_v1" for i in range(4)]
  if "test_heldout4" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("test_heldout4", heldout, default_rate=1.0)
  res = _run(tmp_path / "vmap", kind="finetune", mixture="test_heldout4", steps=3, vmap=True,
             init_from=str(tmp_path / "pre"))
  stacked = _params(tmp_path / "vmap")
  # One copy per task, in the order of the sorted task names.
  assert all(v.shape[0] == 4 for v in stacked.values())
  assert set(heldout) <= set(res["eval"])
  # The first and the last copy against their own runs (each run compiles: two keep the test
  # short; an ordering mistake between copies and tasks shows at either end).
  for i, task in ((0, heldout[0]), (3, heldout[3])):
    _run(tmp_path / f"single_{i}", kind="finetune", mixture=task, steps=3,
         init_from=str(tmp_path / "pre"))
    single = _params(tmp_path / f"single_{i}")
    # Batched and single programs sum in different orders; Adam's normalised update turns float32
    # rounding into differences of ~1e-6 after 3 steps at lr 1e-2 (copies differ by ~1e-2).
    _assert_same({k: v[i] for k, v in stacked.items()}, single, atol=5e-6)
  # Copies really differ (each saw its own task).
  gaps = [np.abs(v[0] - v[1]).max() for v in stacked.values()]
  assert max(gaps) > 1e-3


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+ .*last good checkpoint"):
    _run(tmp_path / "nan", mode="full", steps=6, lr=1e30)
  step = checkpoints.read_metadata(tmp_path / "nan")["step"]
  assert step is not None and step >= 1
  params = _params(tmp_path / "nan")
  assert all(np.isfinite(v).all() for v in params.values())


@pytest.fixture(scope="module")
def poly_run(tmp_path_factory):
  """A finished 2-step poly run with checkpoints at steps 1 and 2 (tests work on copies)."""
  run_dir = tmp_path_factory.mktemp("poly") / "run"
  _run(run_dir, mode="poly", steps=2)
  return run_dir


def test_mismatched_checkpoint_is_named(tmp_path, poly_run):
  shutil.copytree(poly_run, tmp_path / "run")
  with pytest.raises(checkpoints.CheckpointMismatchError, match="mode: checkpoint 'poly', config 'mhr'"):
    _run(tmp_path / "run", mode="mhr", steps=2)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="task 'synthetic_primitive"):
    _run(tmp_path / "run", mode="poly", mixture="synthetic_primitives", steps=2)


def test_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path, capsys, poly_run):
  run_dir = tmp_path / "run"
  shutil.copytree(poly_run, run_dir)
  ckpts = run_dir / "checkpoints"
  data_file = max((p for p in (ckpts / "2" / "trainable").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
  data_file.write_bytes(data_file.read_bytes()[:7])
  capsys.readouterr()
  # The run resumes from step 1 (1 step to go: asking for 1 step skips compiling it).
  res = _run(run_dir, mode="poly", steps=1)
  assert res["resumed_from"] == 1 and res["steps"] == 1
  err = capsys.readouterr().err
  assert f"step 2 ({ckpts / '2'})" in err and "has 7 bytes" in err
  assert "resuming from step 1" in err
  assert (run_dir / "checkpoints_damaged" / "2").is_dir()
  # Nothing intact: the run stops naming the folder, and deletes nothing.
  meta = ckpts / "1" / "metadata" / "metadata"
  meta.write_text(meta.read_text()[:20])
  before = sorted(p for p in run_dir.rglob("*"))
  with pytest.raises(checkpoints.CheckpointDamagedError, match=f"no intact checkpoint in {ckpts}"):
    _run(run_dir, mode="poly", steps=2)
  assert sorted(p for p in run_dir.rglob("*")) == before


def test_finetune_modes_need_a_parent(tmp_path):
  with pytest.raises(ValueError, match="init_from"):
    _run(tmp_path / "z", kind="finetune", mode="mhr_z", mixture="synthetic_heldout")


CLI = [sys.executable, "-m", "mhr_jax.train", "--gin_file=runs/pretrain.gin",
       "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=adapters/mhr.gin",
       "--gin_file=overlays/cpu_tiny.gin", "--gin.MIXTURE='synthetic_pretrain'",
       "--gin.TRAIN_STEPS=8", "--gin.N_SPLITS=2", "--gin.N_SKILLS=4",
       "--gin.TrainConfig.checkpoint_every=1", "--gin.INPUTS_LENGTH=24", "--gin.TARGETS_LENGTH=24",
       "--gin.ModelConfig.overrides=" + repr(TINY)]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  env = dict(os.environ)
  full = subprocess.run(CLI + [f"--gin.MODEL_DIR='{tmp_path / 'full'}'"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(CLI + [f"--gin.MODEL_DIR='{killed_dir}'"], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and not (killed_dir / "checkpoints" / "3").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = checkpoints.read_metadata(killed_dir)["step"]
  assert done is not None and done < 8, f"the run was not interrupted (latest step {done})"
  resumed = subprocess.run(CLI + [f"--gin.MODEL_DIR='{killed_dir}'"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert checkpoints.read_metadata(killed_dir)["step"] == 8
  _assert_same(_params(tmp_path / "full"), _params(killed_dir))


def test_backbone_loads_from_hugging_face_directory(tmp_path):
  from flax import nnx

  from mhr_jax import hf_import, network

  source = network.T5(network.preset("tiny", **TINY), rngs=nnx.Rngs(11))
  hf_import.save_hf(source, tmp_path / "hf")
  model_config = trainer.ModelConfig(hf_checkpoint=str(tmp_path / "hf"))
  lora = adapters.AdapterConfig(mode="lora", n_skills=1, lora_rank=2, layers="super_ni")
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model = run_state.build_model(model_config, lora, data.TaskIdTable(("t",)), None, 0, mesh,
                                sharding.logical_rules("fsdp"))
  want = hf_import.backbone_params(source)
  got = hf_import.backbone_params(model)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(want[k][...]))
  res = trainer.run(
      kind="pretrain", model_dir=str(tmp_path / "run"), model_config=model_config,
      adapter_config=lora,
      data_config=trainer.DataConfig(mixture="synthetic_pretrain", feature_lengths=LENGTHS,
                                     batch_size=8),
      train_config=trainer.TrainConfig(steps=2, checkpoint_every=2, log_every=1))
  assert res["parameters"]["backbone"] == sum(int(np.prod(v.shape)) for v in want.values())
  # Only adapters were saved: the backbone is referenced, not copied.
  saved = _params(tmp_path / "run")
  assert saved and all("adapter" in k for k in saved)
  assert checkpoints.read_metadata(tmp_path / "run")["backbone"] == str(tmp_path / "hf")


def test_vocabulary_larger_than_the_model_is_refused(tmp_path):
  small = dict(TINY, vocab_size=120)
  with pytest.raises(ValueError, match="vocabulary of 259 ids .* model embeds 120"):
    trainer.run(kind="pretrain", model_dir=str(tmp_path / "run"),
                model_config=trainer.ModelConfig(size="tiny", overrides=small),
                adapter_config=None,
                data_config=trainer.DataConfig(mixture="synthetic_pretrain",
                                               feature_lengths=LENGTHS, batch_size=8),
                train_config=trainer.TrainConfig(steps=1))
