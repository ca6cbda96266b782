"""The study's statistics and report, on scores with known answers; the whole study (slow)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mhr_jax.experiments import stats, study, study_report

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_t_interval_by_hand():
  mean, low, high = stats.t_interval([1.0, 2.0, 3.0, 4.0])
  half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3) from a table
  assert mean == 2.5 and low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)
  with pytest.raises(ValueError, match="at least 2"):
    stats.t_interval([1.0])


def test_paired_difference_pairs_tasks_within_seeds():
  a = {0: {"t1": 50.0, "t2": 30.0}, 1: {"t1": 40.0, "t2": 20.0}}
  b = {0: {"t1": 45.0, "t2": 30.0}, 1: {"t1": 30.0, "t2": 25.0}}
  d = stats.paired_difference(a, b)
  assert d["mean"] == pytest.approx((5 + 0 + 10 - 5) / 4)
  assert d["per_seed"] == {0: 2.5, 1: 2.5}
  assert (d["wins"], d["ties"], d["losses"], d["n_pairs"]) == (2, 1, 1, 4)
  with pytest.raises(ValueError, match="same \\(seed, task\\) pairs"):
    stats.paired_difference(a, {0: b[0]})


def test_verdicts():
  assert stats.verdict({"low": 0.5, "high": 4.0}, "better") == "agrees"
  assert stats.verdict({"low": -4.0, "high": -0.5}, "better") == "disagrees"
  assert stats.verdict({"low": -1.0, "high": 2.0}, "better") == "not resolved"
  assert stats.verdict({"low": -2.0, "high": 2.5}, "similar") == "agrees"
  assert stats.verdict({"low": -9.0, "high": -4.0}, "similar") == "disagrees"
  assert stats.verdict({"low": -5.0, "high": 1.0}, "similar") == "not resolved"


def _table(seed):
  rng = np.random.default_rng(seed)
  base = {"lora": 20.0, "poly": 30.0, "mhr": 35.0, "mhr_z": 34.0, "mhr_mu": 35.0,
          "described_zeroshot_lora": 10.0, "described_zeroshot_mhr_mu": 15.0}
  methods = {}
  for m, level in base.items():
    per_task = {f"task_{i}": float(level + rng.normal(0, 2)) for i in range(4)}
    methods[m] = {"per_task": per_task, "exact_match": float(np.mean(list(per_task.values()))),
                  "trainable": 0 if "zeroshot" in m else 100, "trained_shared": 100,
                  "zero_shot": "zeroshot" in m}
  return {"methods": methods, "backbone_primitives": 80.0, "split": "test", "seconds": 1.0}


def test_summary_and_report():
  summary = study.summarize({0: _table(0), 1: _table(1), 2: _table(2)})
  assert summary["methods"]["mhr"]["mean"] == pytest.approx(np.mean(
      [_table(s)["methods"]["mhr"]["exact_match"] for s in range(3)]))
  paired = {(d["a"], d["b"]): d for d in summary["paired"]}
  assert set(paired) == {(a, b) for a, b, _, _ in study.COMPARISONS}
  assert paired[("mhr", "poly")]["n_pairs"] == 12 and paired[("mhr", "poly")]["verdict"] == "agrees"
  summary.update(command="cmd", date="2026-12-01", machine={
      "cpu": "cpu", "cores": 2, "memory": "1 GiB", "load_average": (1.0, 1.0, 1.0)},
      load_average_end=(2.0, 2.0, 2.0), wall_seconds=600.0, cpu_seconds=900.0,
      analysis={"plots": {"Training loss": "learning_curves.png"},
                "alignment": {"pretrain_mhr": {"steps": [1, 2], "mean_cosine": [0.1, 0.3]}}})
  page = study_report.markdown(summary, plots_dir=pathlib.Path("/x/plots"), base=pathlib.Path("/x"))
  assert "| MHR | " in page and "[+" in page and "](plots/learning_curves.png)" in page
  assert "| pretrain_mhr | 0.200 | 0.300 |" in page
  assert study_report.INTERPRETATION_PLACEHOLDER in page


@pytest.mark.slow
def test_study_command_end_to_end(tmp_path):
  """The study's gin command over 2 seeds at the pipeline test's tiny sizes."""
  from tests import test_experiments

  overlay = tmp_path / "tiny.gin"
  overlay.write_text(test_experiments._gin_overlay(tmp_path / "unused") + (
      f"synthetic_study.seeds = [0, 1]\nsynthetic_study.workdir = '{tmp_path / 'study'}'\n"
      f"synthetic_study.results_doc = '{tmp_path / 'docs' / 'results.md'}'\n"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run(
      [sys.executable, "-m", "mhr_jax.train", "--gin_file=experiments/synthetic_study.gin",
       f"--gin_file={overlay}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "study" / "study.json").read_text())
  assert summary["seeds"] == [0, 1] and len(summary["paired"]) == len(study.COMPARISONS)
  assert (tmp_path / "study" / "backbone").is_dir()
  assert not (tmp_path / "study" / "seed_1" / "backbone").exists()
  page = (tmp_path / "docs" / "results.md").read_text()
  assert "![Gradient alignment during pre-training](results_plots/gradient_alignment.png)" in page
  assert (tmp_path / "docs" / "results_plots" / "gradient_alignment.png").stat().st_size > 2000
