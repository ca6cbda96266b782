"""The few-shot sweep: its plan, checks and resumption, and (slow) a tiny sweep end to end."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mhr_jax import report, sweep

REPO = pathlib.Path(__file__).resolve().parents[1]


def fake_parent(path, mode="mhr"):
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(json.dumps({"kind": "pretrain", "mode": mode, "eval": {}}))
  return path


def sweep_args(tmp_path, shared_data, *extra):
  return ["--gin_file=experiments/t0_fewshot.gin", f"--init_from={tmp_path / 'pre'}",
          f"--t0_data_dir={shared_data}", f"--out={tmp_path / 'sweep'}", *extra]


def test_dry_run_plans_the_grid_and_skips_finished_runs(tmp_path, shared_data, capsys):
  fake_parent(tmp_path / "pre")
  args = sweep_args(tmp_path, shared_data, "--datasets=rte,cb", "--seeds=0,1",
                    "--methods=mhr,mhr_z", "--dry_run")
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert "8 runs planned, 8 to run" in out and "mhr_z/cb/seed_1" in out
  assert not (tmp_path / "sweep").exists()  # a dry run writes nothing
  # A finished run (results.json) is skipped; the plan of an earlier invocation is kept.
  finished = tmp_path / "sweep" / "mhr" / "rte" / "seed_0"
  finished.mkdir(parents=True)
  (finished / "results.json").write_text("{}")
  config = {"init_from": "x"}
  earlier = [{"method": "mhr", "dataset": "wic", "seed": 0, "dir": "mhr/wic/seed_0"}]
  (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"config": config, "runs": earlier}))
  plan = sweep.merge_plan(tmp_path / "sweep", config, [
      {"method": "mhr", "dataset": d, "seed": 0, "dir": f"mhr/{d}/seed_0"} for d in ("rte", "cb")])
  assert [r["dir"] for r in plan["runs"]] == ["mhr/wic/seed_0", "mhr/rte/seed_0", "mhr/cb/seed_0"]
  assert [r["dir"] for r in sweep.pending(tmp_path / "sweep", plan)] == [
      "mhr/wic/seed_0", "mhr/cb/seed_0"]
  with pytest.raises(ValueError, match="another configuration .*'init_from': \\('x', 'y'\\)"):
    sweep.merge_plan(tmp_path / "sweep", {"init_from": "y"}, [])


def test_refuses_what_cannot_run_naming_it(tmp_path, shared_data):
  fake_parent(tmp_path / "pre", mode="mhr")
  config = {"init_from": str(tmp_path / "pre"), "t0_data_dir": str(shared_data), "shots": None}
  with pytest.raises(ValueError) as e:
    sweep.check_request(config, ["rte", "anli_r1", "mnli"], [0, 7], ["mhr_z", "lora"])
  text = str(e.value)
  assert "unknown datasets ['mnli']" in text
  assert "['anli_r1'] have no evaluation set" in text
  assert "rte/32_shot/7_seed.jsonl" in text and "rte/32_shot/0_seed.jsonl" not in text
  assert "methods ['lora'] cannot be fine-tuned from" in text and "mode 'mhr'" in text
  with pytest.raises(ValueError, match="has no results.json"):
    sweep.check_request({**config, "init_from": str(tmp_path)}, ["rte"], [0], ["mhr"])


TINY = """
ModelConfig.size = "tiny"
ModelConfig.hf_checkpoint = None
ModelConfig.overrides = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4, "num_layers": 1,
                         "dropout_rate": 0.0}
N_SKILLS = 2
N_SPLITS = 2
TRAIN_STEPS = 2
BATCH_SIZE = 4
INPUTS_LENGTH = 64
TARGETS_LENGTH = 8
OptimizerConfig.name = "adamw"
TrainConfig.checkpoint_every = 100
TrainConfig.log_every = 1
DataConfig.max_eval_examples = 2
DataConfig.eval_batch_size = 8
MeshConfig.data = 1
MeshConfig.model = 1
"""


@pytest.mark.slow
def test_tiny_sweep_two_datasets_two_seeds_two_methods_then_report(tmp_path, shared_data):
  """README's three steps at a tiny size: pre-train MHR on COPA, sweep, report."""
  (tmp_path / "tiny.gin").write_text(TINY)
  # One CPU device; the sweep's workers share compiled programs in OUT/jax_cache.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  common = [f"--gin_file={tmp_path / 'tiny.gin'}"]
  subprocess.run([sys.executable, "-m", "mhr_jax.train", "--gin_file=runs/pretrain.gin",
                  "--gin_file=adapters/mhr.gin", *common, f"--gin.MODEL_DIR='{tmp_path / 'pre'}'",
                  "--gin.MIXTURE='t0_copa'", f"--gin.DataConfig.t0_data_dir='{shared_data}'"],
                 cwd=REPO, env=env, check=True)
  cmd = [sys.executable, "-m", "mhr_jax.sweep",
         *sweep_args(tmp_path, shared_data, "--datasets=rte,wic", "--seeds=0,1",
                     "--methods=mhr,mhr_z"), "--gin_file=overlays/cpu_tiny.gin", *common]
  subprocess.run(cmd, cwd=REPO, env=env, check=True)
  out = tmp_path / "sweep"
  runs = sorted(str(p.parent.relative_to(out)) for p in out.rglob("results.json"))
  assert runs == [f"{m}/{d}/seed_{s}" for m in ("mhr", "mhr_z") for d in ("rte", "wic")
                  for s in (0, 1)]
  declared = json.loads((out / "mhr_z" / "wic" / "seed_1" / "run.json").read_text())
  assert (declared["method"], declared["dataset"], declared["seed"]) == ("mhr_z", "wic", 1)
  one = out / "mhr_z" / "wic" / "seed_1"
  results = json.loads((one / "results.json").read_text())
  templates = [k for k in results["eval"] if k.startswith("t0_wic_")]
  assert results["mode"] == "mhr_z" and len(templates) == 10  # one entry per template
  # and one per dataset under both protocols, the authors' drawn with the run's seed.
  wic = results["eval"]["t0_wic"]
  assert (wic["n_templates"], wic["n_examples"]) == (10, 2)
  assert set(wic) >= {"accuracy_random_template", "accuracy_median_template"}
  # Started again, it finds nothing to do.
  again = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
  assert "8 runs planned, 0 to run" in again.stdout
  # A run repeated (its results removed: resumed at its last step, evaluated again) draws the
  # same templates: the same scores.
  (one / "results.json").unlink()
  again = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
  assert "8 runs planned, 1 to run" in again.stdout
  assert json.loads((one / "results.json").read_text())["eval"] == results["eval"]
  # The table under the authors' protocol: per dataset the median over seeds, then the mean.
  tables = report.report([out], metric="random_template")
  t0 = tables["t0"]
  assert t0["datasets"] == ["rte", "wic"] and t0["seeds"] == [0, 1]
  assert list(t0["methods"]) == ["mhr", "mhr_z"]
  for method, row in t0["methods"].items():
    medians = [np.median([json.loads((out / method / d / f"seed_{s}" / "results.json").read_text())
                          ["eval"][f"t0_{d}"]["accuracy_random_template"] for s in (0, 1)])
               for d in ("rte", "wic")]
    assert row["mean"] == pytest.approx(np.mean(medians))
  text = report.format_markdown(tables)
  assert "| method | rte | wic | mean |" in text
