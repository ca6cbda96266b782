"""The synthetic pipeline as data: its stage graph, and every stage of the job at tiny sizes."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from mhr_jax import analysis, trainer
from mhr_jax.experiments import pipeline, synthetic
from tasks import synthetic as tasks_synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = tasks_synthetic.SyntheticConfig(
    n_primitives=4, n_train_tasks=4, n_heldout_tasks=2, train_examples=16, validation_examples=4,
    primitive_examples=16, n_shots=4, heldout_validation=4, heldout_test=4, min_length=3,
    max_length=4, seed=2)
SETTINGS = synthetic.SyntheticSettings(
    task_config=TASKS, prefix="pipe", inputs_length=14, targets_length=8,
    described_inputs_length=22, batch_size=8, finetune_batch_size=8, backbone_steps=2,
    pretrain_steps=2, pretrain_snapshots=2, finetune_steps=1, zeroshot_steps=1, n_skills=2,
    n_splits=2, lora_rank=2, adapted_layers="super_ni")
OVERRIDES = {"vocab_size": 259, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_heads": 2,
             "num_layers": 1, "dropout_rate": 0.0}


def _stage(name, needs=(), **kw):
  parent = needs[0] if needs else None
  return pipeline.Stage(name, "pretrain", "lora", "m", {"inputs": 4, "targets": 4},
                        parent=parent, **kw)


def test_required_stages_come_after_what_they_need_and_unknown_names_are_refused():
  stages = [_stage("a"), _stage("b", ["a"]), _stage("c", ["b"]), _stage("d")]
  assert [s.name for s in pipeline.required(stages, ["c"])] == ["a", "b", "c"]
  assert [s.name for s in pipeline.required(stages, ["d", "b"])] == ["a", "b", "d"]
  with pytest.raises(ValueError, match="unknown stages \\['x'\\]"):
    pipeline.required(stages + [_stage("e", ["x"])], ["e"])
  with pytest.raises(ValueError, match="two stages are named 'a'"):
    pipeline.check_graph([_stage("a"), _stage("a")])
  with pytest.raises(ValueError, match="names the stage it evaluates"):
    pipeline.Stage("z", "eval", "lora", "m", {})


def test_synthetic_stages_need_what_their_methods_use():
  stages = synthetic.synthetic_stages(SETTINGS)
  by_name = {s.name: s for s in stages}
  assert by_name["finetune_mhr_z"].parent == "pretrain_mhr"
  assert by_name["finetune_lora_scratch"].parent is None
  assert by_name["described_zeroshot_lora"].evaluates == "pretrain_lora_described"
  needed = [s.name for s in pipeline.required(stages, synthetic.method_stages(stages, ["mhr_mu"]))]
  assert needed == ["backbone", "pretrain_mhr", "finetune_mhr_mu"]
  assert all(s.eval_split == "test" for s in stages if s.method)
  assert [s.name for s in stages if s.shared] == ["backbone"]
  with pytest.raises(ValueError, match="unknown methods \\['nope'\\]"):
    synthetic.method_stages(stages, ["nope"])


def _gin_overlay(workdir: pathlib.Path) -> str:
  """Bindings that give the default job's gin file the tiny sizes above."""
  lines = [f"SyntheticConfig.{f.name} = {getattr(TASKS, f.name)!r}"
           for f in dataclasses.fields(TASKS)]
  lines += [f"SyntheticSettings.{f.name} = {getattr(SETTINGS, f.name)!r}"
            for f in dataclasses.fields(SETTINGS) if f.name != "task_config"]
  lines += [f"ModelConfig.overrides = {OVERRIDES!r}",
            f"synthetic_benchmark.workdir = {str(workdir)!r}",
            f"synthetic_benchmark.methods = {list(synthetic.METHODS)!r}"]
  return "\n".join(lines) + "\n"


# ~60-100 s on 2 cores; `bash .ci/run` runs every stage of the same job at smoke size (README
# command 1 with overlays/synthetic_smoke.gin) before the tests.
@pytest.mark.slow
def test_every_stage_of_the_job_runs_at_tiny_sizes(tmp_path):
  """The default job's command on its gin file, every method, a step or two per stage.

  One device and XLA's quickest compilation keep it to about a minute of CPU time; the
  pipeline's analysis runs on its MHR pre-training, and a second call reuses every stage.
  """
  workdir = tmp_path / "run"
  overlay = tmp_path / "tiny.gin"
  overlay.write_text(_gin_overlay(workdir))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  out = subprocess.run(
      [sys.executable, "-m", "mhr_jax.train", "--gin_file=experiments/synthetic.gin",
       f"--gin_file={overlay}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  table = json.loads((workdir / "table.json").read_text())
  assert set(table["methods"]) == set(synthetic.METHODS)
  for method, row in table["methods"].items():
    assert len(row["per_task"]) == TASKS.n_heldout_tasks, method
    assert 0.0 <= row["exact_match"] <= 100.0
  assert table["methods"]["mhr_z"]["trainable"] < table["methods"]["mhr"]["trainable"]
  assert table["methods"]["described_zeroshot_lora"]["trainable"] == 0
  assert all("pipe_described_heldout" in t
             for t in table["methods"]["described_zeroshot_mhr_mu"]["per_task"])
  assert table["split"] == "test" and table["backbone_primitives"] is not None
  stage = json.loads((workdir / "pretrain_mhr" / "stage.json").read_text())
  assert stage["seed"] == 0 and stage["needs"]["backbone"] == str(workdir / "backbone")
  assert (workdir / "table.md").read_text().startswith("| method |")
  # The analysis command on the MHR pre-training (two kept checkpoints) and beside LoRA's; it
  # reads the runs' tasks, registered here as in the subprocess.
  SETTINGS.register()
  assert analysis.main([str(workdir / "pretrain_mhr"), str(workdir / "pretrain_lora"),
                        "--compare", str(tmp_path / "plots")]) == 0
  written = {p.name for p in (workdir / "pretrain_mhr" / "analysis").iterdir()}
  assert {"learning_curve.png", "routing_heatmaps.png", "task_similarity.png",
          "gradient_alignment.png", "routing_entropy.png", "over_training.jsonl"} <= written
  rows = [json.loads(x) for x in
          (workdir / "pretrain_mhr" / "analysis" / "over_training.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(-1 <= r["gradient_alignment"] <= 1 and 0 <= r["routing_entropy"] <= 1 for r in rows)
  for png in (tmp_path / "plots").glob("*.png"):
    assert png.stat().st_size > 2000
  assert (tmp_path / "plots" / "gradient_alignment.png").exists()
  # Finished stages are reused: the same call in this process runs nothing.
  again = synthetic.synthetic_benchmark(
      settings=SETTINGS, model_config=trainer.ModelConfig(size="tiny", overrides=OVERRIDES),
      workdir=str(workdir), methods=tuple(synthetic.METHODS))
  assert again["methods"] == table["methods"]
