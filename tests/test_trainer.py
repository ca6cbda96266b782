"""The trainer: the run kinds, resume after SIGKILL, vmapped fine-tuning, non-finite loss,
mismatched and damaged checkpoints, the records a run writes."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import seqio

from mhr_jax import (adapters, checkpoints, data, errors, optimizers, run_state, sharding, train,
                     trainer)

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4,
        "num_layers": 1, "dropout_rate": 0.1}
LENGTHS = {"inputs": 24, "targets": 24}


def _run(model_dir, *, kind="pretrain", mode="poly", mixture="synthetic_pretrain", steps=3,
         vmap=False, init_from=None, lr=1e-2, eval_tasks=(), **train_kw):
  # Runs that start from the Poly fixture keep its one split (its structure is theirs).
  adapter = None if mode == "full" else adapters.AdapterConfig(
      mode=mode, n_skills=1 if mode == "lora" else 4,
      n_splits=2 if mode.startswith("mhr") and init_from is None else 1,
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


@pytest.fixture(scope="module")
def poly_run(tmp_path_factory):
  """A finished 2-step Poly run with checkpoints at steps 1 and 2 (tests read it or work on
  copies)."""
  run_dir = tmp_path_factory.mktemp("poly") / "run"
  _run(run_dir, mode="poly", steps=2)
  return run_dir


def test_vmapped_finetuning_equals_separate_runs(poly_run, tmp_path):
  heldout = [f"synthetic_heldout_{i:03d}_v1" for i in range(4)]
  if "test_heldout4" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("test_heldout4", heldout, default_rate=1.0)
  res = _run(tmp_path / "vmap", kind="finetune", mixture="test_heldout4", steps=3, vmap=True,
             init_from=str(poly_run))
  stacked = _params(tmp_path / "vmap")
  # One copy per task, in the order of the sorted task names.
  assert all(v.shape[0] == 4 for v in stacked.values())
  assert set(heldout) <= set(res["eval"])
  # The first and the last copy against their own runs (each run compiles: two keep the test
  # short; an ordering mistake between copies and tasks shows at either end).
  for i, task in ((0, heldout[0]), (3, heldout[3])):
    _run(tmp_path / f"single_{i}", kind="finetune", mixture=task, steps=3,
         init_from=str(poly_run))
    single = _params(tmp_path / f"single_{i}")
    # Batched and single programs sum in different orders; Adam's normalised update turns float32
    # rounding into differences of ~1e-6 after 3 steps at lr 1e-2, up to ~1.5e-5 where a gradient
    # element is near zero (copies differ by ~1e-2, checked below).
    _assert_same({k: v[i] for k, v in stacked.items()}, single, atol=5e-5)
  # Copies really differ (each saw its own task).
  gaps = [np.abs(v[0] - v[1]).max() for v in stacked.values()]
  assert max(gaps) > 1e-3


def _records(model_dir):
  """metrics.jsonl as a list of dicts, and the TensorBoard scalars as {tag: [(step, value)]}
  read back from the event files with TensorFlow's reader, oldest file first."""
  import tensorflow as tf

  lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  scalars = {}
  for path in sorted((model_dir / "tensorboard").glob("events.out.tfevents.*"),
                     key=lambda p: p.stat().st_mtime):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return lines, scalars


def test_zeroshot_and_eval_kinds_and_their_records(poly_run, tmp_path):
  """zeroshot: Poly averaged into MHR-mu, trained on the mixture, held-out tasks evaluated with no
  task data; eval: that run's checkpoint evaluated again, beside its files, to the same figures.
  Both leave metrics.jsonl and TensorBoard records that read back as the run reported them."""
  heldout = ["synthetic_heldout_000_v1", "synthetic_heldout_001_v1"]
  zs_dir = tmp_path / "zs"
  zs = _run(zs_dir, kind="zeroshot", mode="mhr_mu", steps=2, init_from=str(poly_run),
            eval_tasks=heldout)
  assert (zs["kind"], zs["mode"], zs["resumed_from"], zs["steps"]) == ("zeroshot", "mhr_mu", 0, 2)
  assert set(zs["eval"]) == set(heldout)
  assert all(r["n_examples"] == 16 for r in zs["eval"].values())
  # The held-out tasks are not in the run's table: they were evaluated through id 0.
  assert not set(heldout) & set(json.loads((zs_dir / "task_ids.json").read_text())["tasks"])
  # MHR-mu holds one plain LoRA per layer: no routing left.
  assert zs["parameters"]["routing"] == 0 and zs["parameters"]["adapters"] > 0

  ev = _run(zs_dir, kind="eval", mode="mhr_mu", steps=2, init_from=str(poly_run),
            eval_tasks=heldout)
  assert (ev["kind"], ev["resumed_from"], ev["steps"]) == ("eval", 2, 2)
  assert ev["eval"] == zs["eval"]
  assert json.loads((zs_dir / "results.json").read_text())["kind"] == "zeroshot"
  assert json.loads((zs_dir / "results_eval.json").read_text())["eval"] == zs["eval"]
  assert (zs_dir / "config_eval.gin").exists()
  assert checkpoints.CheckpointManager(str(zs_dir / "checkpoints")).all_steps() == [1, 2]

  lines, scalars = _records(zs_dir)
  train_lines = [r for r in lines if r["split"] == "train"]
  assert [r["step"] for r in train_lines] == [1, 2]
  assert train_lines[-1]["loss"] == zs["final_loss"]
  for task in heldout:
    evals = [r for r in lines if r["split"] == f"eval/{task}"]
    assert [r["step"] for r in evals] == [2, 2]  # the zeroshot run's and the eval run's
    assert all(r["exact_match"] == zs["eval"][task]["exact_match"] for r in evals)
    assert [s for s, _ in scalars[f"eval/{task}/exact_match"]] == [2, 2]
  # TensorBoard holds the same figures (as float32).
  for key in ("loss", "grad_norm"):
    got = scalars[f"train/{key}"]
    assert [s for s, _ in got] == [1, 2]
    np.testing.assert_allclose([v for _, v in got], [r[key] for r in train_lines], rtol=1e-6)


def test_eval_kind_needs_a_checkpoint(tmp_path):
  with pytest.raises(errors.CheckpointError, match="kind 'eval' needs a checkpoint"):
    _run(tmp_path / "none", kind="eval", mode="poly", steps=0)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError,
                     match=r"non-finite loss at step \d+ .*last good checkpoint"):
    _run(tmp_path / "nan", mode="full", steps=6, lr=1e30)
  step = checkpoints.read_metadata(tmp_path / "nan")["step"]
  assert step is not None and step >= 1
  params = _params(tmp_path / "nan")
  assert all(np.isfinite(v).all() for v in params.values())


def test_mismatched_checkpoint_is_named(tmp_path, poly_run):
  shutil.copytree(poly_run, tmp_path / "run")
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="mode: checkpoint 'poly', config 'mhr'"):
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


def test_modes_start_only_from_their_parents(poly_run, tmp_path):
  with pytest.raises(ValueError, match="init_from"):
    _run(tmp_path / "z", kind="finetune", mode="mhr_z", mixture="synthetic_heldout")
  with pytest.raises(ValueError, match=r"mode 'lora' starts from a run of mode 'lora'.*'poly'"):
    _run(tmp_path / "l", kind="finetune", mode="lora", mixture="synthetic_heldout",
         init_from=str(poly_run))
  with pytest.raises(ValueError, match=r"kind 'zeroshot' .* needs AdapterConfig.mode in"):
    _run(tmp_path / "zs", kind="zeroshot", mode="mhr", init_from=str(poly_run))


def test_structure_conflicting_with_the_checkpoint_is_named(poly_run, tmp_path):
  """A fine-tuning run's adapter structure comes from its checkpoint (rank 2, 4 skills here); a
  value set against it names both."""
  def finetune(**cfg):
    trainer.run(
        kind="finetune", model_dir=str(tmp_path / "ft"),
        model_config=trainer.ModelConfig(size="tiny", overrides=TINY),
        adapter_config=adapters.AdapterConfig(mode="poly", layers="super_ni", **cfg),
        data_config=trainer.DataConfig(mixture="synthetic_heldout", feature_lengths=LENGTHS,
                                       batch_size=8),
        train_config=trainer.TrainConfig(steps=1, init_from=str(poly_run)))

  with pytest.raises(errors.ConfigError, match=r"lora_rank=3.*trained with lora_rank=2"):
    finetune(n_skills=4, lora_rank=3)
  with pytest.raises(errors.ConfigError, match=r"n_skills=6.*trained with n_skills=4"):
    finetune(n_skills=6, lora_rank=2)


# The command line, as the README runs it, on the CPU overlay.
CLI_ARGS = ["--gin_file=runs/pretrain.gin", "--gin_file=models/t5_1_1_tiny.gin",
            "--gin_file=adapters/mhr.gin", "--gin_file=overlays/cpu_tiny.gin",
            "--gin.MIXTURE='synthetic_pretrain'", "--gin.TRAIN_STEPS=8", "--gin.N_SPLITS=2",
            "--gin.N_SKILLS=4", "--gin.TrainConfig.checkpoint_every=1",
            "--gin.INPUTS_LENGTH=24", "--gin.TARGETS_LENGTH=24",
            "--gin.ModelConfig.overrides=" + repr(TINY)]


def _main(*args) -> int:
  """``python -m mhr_jax.train`` in this process (no JAX start-up), gin cleared around it."""
  gin.clear_config()
  try:
    return train.main(list(args))
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The command line's 8-step MHR run, uninterrupted."""
  model_dir = tmp_path_factory.mktemp("cli") / "full"
  assert _main(*CLI_ARGS, f"--gin.MODEL_DIR='{model_dir}'") == 0
  return model_dir


def test_resume_after_sigkill_starts_from_its_checkpoint_and_is_bit_identical(
    cli_run, tmp_path, capsys):
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(
      [sys.executable, "-m", "mhr_jax.train", *CLI_ARGS, f"--gin.MODEL_DIR='{killed_dir}'"],
      cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and not (killed_dir / "checkpoints" / "3").exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = checkpoints.read_metadata(killed_dir)["step"]
  assert done is not None and 0 < done < 8, f"the run was not interrupted (latest step {done})"
  capsys.readouterr()
  assert _main(*CLI_ARGS, f"--gin.MODEL_DIR='{killed_dir}'") == 0
  # It says where it resumed, started there (not at step 0), and ended where the
  # uninterrupted run ended, to the bit.
  assert f"resuming from step {done}" in capsys.readouterr().err
  results = json.loads((killed_dir / "results.json").read_text())
  assert (results["resumed_from"], results["steps"]) == (done, 8)
  assert checkpoints.read_metadata(killed_dir)["step"] == 8
  _assert_same(_params(cli_run), _params(killed_dir))


def test_command_line_names_a_mode_mismatch_on_resume(cli_run, tmp_path, capsys):
  shutil.copytree(cli_run, tmp_path / "run")
  args = [a.replace("adapters/mhr.gin", "adapters/poly.gin") for a in CLI_ARGS]
  capsys.readouterr()
  assert _main(*args, f"--gin.MODEL_DIR='{tmp_path / 'run'}'") == 1
  err = capsys.readouterr().err
  assert err.startswith("error: checkpoint does not match the config")
  assert "mode: checkpoint 'mhr', config 'poly'" in err and "Traceback" not in err


def test_command_line_names_damaged_checkpoints_in_one_message(cli_run, tmp_path, capsys):
  """With every checkpoint damaged the run stops with one message naming them (resuming from the
  newest intact one when there is one is ``test_damaged_newest_checkpoint_resumes_...``)."""
  run_dir = tmp_path / "run"
  shutil.copytree(cli_run, run_dir)
  ckpts = run_dir / "checkpoints"
  for step in sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()):
    meta = ckpts / step / "metadata" / "metadata"
    meta.write_text(meta.read_text()[:20])
  capsys.readouterr()
  assert _main(*CLI_ARGS, f"--gin.MODEL_DIR='{run_dir}'") == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: no intact checkpoint in {ckpts}"), err
  assert "Traceback" not in err and f"step 8 ({ckpts / '8'})" in err, err


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
