"""The report command: run directories with known scores -> the paper's table, computed by hand."""

import json

import pytest

from mhr_jax import report

# Per-run T0 scores, accuracy_random_template (%): {method: {dataset: {seed: score}}}.
T0_SCORES = {
    "mhr": {"rte": {0: 60.0, 1: 70.0, 42: 65.0}, "cb": {0: 50.0, 1: 80.0, 42: 90.0}},
    "mhr_z": {"rte": {0: 55.0, 1: 58.0, 42: 61.0}, "cb": {0: 70.0, 1: 40.0, 42: 60.0}},
}


def gin_text(seed, *, eval_tasks=("t0_rte",), mixture="t0_rte", max_eval_examples=None,
             split="validation", beams=1):
  return "\n".join([
      f"SEED = {seed}", f"EVAL_TASKS = {list(eval_tasks)!r}", f"MIXTURE = {mixture!r}",
      "DataConfig.eval_tasks = %EVAL_TASKS", "DataConfig.mixture = %MIXTURE",
      f"DataConfig.eval_split = {split!r}", f"DataConfig.max_eval_examples = {max_eval_examples}",
      f"DataConfig.eval_num_beams = {beams}", "TrainConfig.seed = %SEED",
      "run.data_config = @DataConfig()", ""])


def write_run(path, *, results, gin, declared=None):
  path.mkdir(parents=True)
  (path / "results.json").write_text(json.dumps(results))
  (path / "config.gin").write_text(gin)
  if declared is not None:
    (path / "run.json").write_text(json.dumps(declared))


def t0_sweep(root, scores=T0_SCORES, **gin_kw):
  """A sweep folder as mhr_jax.sweep lays it out, with dataset-level scores."""
  planned = []
  for method, by_dataset in scores.items():
    for dataset, by_seed in by_dataset.items():
      for seed, score in by_seed.items():
        rel = f"{method}/{dataset}/seed_{seed}"
        planned.append({"method": method, "dataset": dataset, "seed": seed, "dir": rel})
        results = {"kind": "finetune", "mode": method, "eval": {
            f"t0_{dataset}_tmpl_a": {"accuracy": 0.0},
            f"t0_{dataset}": {"accuracy_random_template": score,
                              "accuracy_median_template": 100 - score}}}
        write_run(root / rel, results=results, gin=gin_text(seed, **gin_kw), declared={
            "benchmark": "t0", "method": method, "seed": seed,
            "datasets": {dataset: [f"t0_{dataset}_tmpl_a"]}})
  (root / "sweep.json").write_text(json.dumps({"runs": planned}))
  return root


def test_t0_table_is_median_over_seeds_then_mean_over_datasets(tmp_path):
  tables = report.report([t0_sweep(tmp_path / "sweep")])
  t0 = tables["t0"]
  assert t0["seeds"] == [0, 1, 42] and t0["datasets"] == ["cb", "rte"]
  assert t0["protocol"] == {"eval_split": "validation", "max_eval_examples": None,
                            "metric": "accuracy_random_template"}
  mhr, mhr_z = t0["methods"]["mhr"], t0["methods"]["mhr_z"]
  # By hand: mhr rte median(60, 70, 65) = 65, cb median(50, 80, 90) = 80, mean 72.5.
  assert mhr["datasets"]["rte"]["median"] == 65.0
  assert mhr["datasets"]["cb"]["median"] == 80.0
  assert mhr["mean"] == 72.5
  # mhr_z: rte median(55, 58, 61) = 58, cb median(70, 40, 60) = 60, mean 59.
  assert mhr_z["mean"] == 59.0
  # Spread over seeds: rte (60, 70, 65) has sample variance 25; the per-seed means of mhr are
  # 55, 75, 77.5 (sample std sqrt(152.083) = 12.332); medians 65 and 80 differ by std 10.607.
  assert mhr["datasets"]["rte"]["std_over_seeds"] == pytest.approx(5.0)
  assert mhr["per_seed_mean"] == {"0": 55.0, "1": 75.0, "42": 77.5}
  assert mhr["std_over_seeds"] == pytest.approx(12.332, abs=1e-3)
  assert mhr["std_over_datasets"] == pytest.approx(10.607, abs=1e-3)
  text = report.format_markdown(tables)
  assert "| method | cb | rte | mean |" in text
  assert "| mhr | 80.0 (20.8) | 65.0 (5.0) | 72.5 (12.3) |" in text
  # T0's protocol reads its own dataset-level entry.
  median = report.report([tmp_path / "sweep"], metric="median_template")["t0"]["methods"]["mhr"]
  assert median["datasets"]["rte"]["median"] == 35.0  # 100 - 65


def test_cli_prints_and_writes_json_and_markdown(tmp_path, capsys):
  sweep = t0_sweep(tmp_path / "sweep")
  assert report.main([str(sweep), "--json", str(tmp_path / "t.json"),
                      "--markdown", str(tmp_path / "t.md")]) == 0
  # mhr_z per-seed means 62.5, 49, 60.5: sample std sqrt(53.083) = 7.29.
  assert "| mhr_z | 60.0 (15.3) | 58.0 (3.0) | 59.0 (7.3) |" in capsys.readouterr().out
  assert json.loads((tmp_path / "t.json").read_text())["t0"]["methods"]["mhr"]["mean"] == 72.5
  assert (tmp_path / "t.md").read_text().startswith("### T0 held-out")


def test_hand_made_runs_are_read_from_results_and_config_gin(tmp_path):
  # Two seeds of one hand-made LoRA run on RTE, with per-template accuracies only.
  for seed, accs in ((0, [40.0, 70.0, 50.0]), (1, [60.0, 80.0, 90.0])):
    results = {"kind": "finetune", "mode": "lora", "eval": {
        f"t0_rte_{name}": {"accuracy": acc} for name, acc in zip("abc", accs)}}
    write_run(tmp_path / f"lora_{seed}", results=results, gin=gin_text(seed))
  # A pre-training run next to them evaluated nothing and is left out.
  write_run(tmp_path / "pretrain", results={"kind": "pretrain", "mode": "mhr", "eval": {}},
            gin=gin_text(0))
  t0 = report.report([tmp_path], metric="median_template")["t0"]
  row = t0["methods"]["lora"]["datasets"]["rte"]
  # Medians over templates 50 and 80, then the median over the two seeds: 65.
  assert row["scores"] == {"0": 50.0, "1": 80.0} and row["median"] == 65.0
  with pytest.raises(report.ReportError, match="no accuracy_random_template .*lora_0"):
    report.report([tmp_path])


def test_refuses_missing_runs_naming_them(tmp_path):
  scores = json.loads(json.dumps(T0_SCORES))  # a copy
  del scores["mhr_z"]["cb"]["1"]
  root = t0_sweep(tmp_path / "a", {m: {d: {int(s): v for s, v in by.items()}
                                       for d, by in ds.items()} for m, ds in scores.items()})
  with pytest.raises(report.ReportError, match="missing runs .*mhr_z / cb / seed 1"):
    report.report([root])
  # A run the sweep planned that has no results yet.
  (root / "mhr" / "rte" / "seed_42" / "results.json").unlink()
  with pytest.raises(report.ReportError, match="planned but not finished: .*seed_42 \\(mhr, rte"):
    report.report([root])


def test_refuses_mixed_protocols_and_duplicates(tmp_path):
  root = t0_sweep(tmp_path / "a")
  capped = root / "mhr" / "cb" / "seed_0" / "config.gin"
  capped.write_text(gin_text(0, max_eval_examples=16))
  with pytest.raises(report.ReportError, match="different protocols.*max_eval_examples': 16.*"
                     "mhr/cb/seed_0"):
    report.report([root])
  capped.write_text(gin_text(0))
  other = t0_sweep(tmp_path / "b", {"mhr": {"rte": {0: 1.0}}})
  with pytest.raises(report.ReportError, match="mhr / rte / seed 0 comes from several runs"):
    report.report([root, other])


def test_super_ni_rouge_l_median_over_seeds_then_mean_over_tasks(tmp_path):
  rouge = {"mhr": {0: {"a": 40.0, "b": 60.0}, 1: {"a": 50.0, "b": 30.0}},
           "poly": {0: {"a": 20.0, "b": 20.0}, 1: {"a": 30.0, "b": 40.0}}}
  for method, by_seed in rouge.items():
    for seed, by_task in by_seed.items():
      results = {"kind": "finetune", "mode": method, "eval": {
          f"super_ni_{t}": {"rougeL": v, "n_examples": 100} for t, v in by_task.items()}}
      write_run(tmp_path / f"{method}_{seed}", results=results,
                gin=gin_text(seed, eval_tasks=(), mixture="super_ni_test", beams=4))
  table = report.report([tmp_path])["super_ni"]
  assert table["protocol"] == {"eval_split": "validation", "max_eval_examples": None,
                               "eval_num_beams": 4}
  mhr = table["methods"]["mhr"]
  # Task a: median(40, 50) = 45, task b: median(60, 30) = 45; mean 45. Runs: 50 and 40.
  assert mhr["mean"] == 45.0 and mhr["per_seed_mean"] == {"0": 50.0, "1": 40.0}
  assert table["methods"]["poly"]["mean"] == 27.5
  text = report.format_markdown({"super_ni": table})
  assert "| mhr | 45.0 (7.1) | 0: 50.0, 1: 40.0 |" in text


def test_unreadable_or_incomplete_declarations_are_named(tmp_path):
  write_run(tmp_path / "broken", results={"kind": "finetune", "mode": "mhr", "eval": {"x": {}}},
            gin=gin_text(0), declared={"benchmark": "t0", "method": "mhr"})
  with pytest.raises(report.ReportError, match="broken/run.json: missing \\['seed', 'datasets'\\]"):
    report.report([tmp_path])
  (tmp_path / "broken" / "results.json").write_text("{not json")
  with pytest.raises(report.ReportError, match="broken/results.json: not valid JSON"):
    report.report([tmp_path])
