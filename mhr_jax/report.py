"""``python -m mhr_jax.report RUN_OR_SWEEP_DIR ... [--metric M] [--json F] [--markdown F]``.

The paper's tables from run directories (a sweep folder, hand-made runs, or both), aggregated as
the MHR authors do (``projects/mhr/utils/get_metrics.py``, microsoft/mttl at tag
``mhr-camera-ready``): per method and dataset the median over few-shot seeds, then the mean over
datasets. Besides, the spread over seeds (the standard deviation over seeds of each dataset's
score, and of the per-seed mean over datasets) and the authors' printed spread (the standard
deviation over datasets of the medians).

* T0 held-out: one accuracy per dataset and run, ``--metric random_template`` (the authors'
  protocol, default) or ``median_template`` (T0's); see `mhr_jax.protocol`.
* Super-NaturalInstructions: Rouge-L of every test task a run evaluated; per task the median over
  seeds, then the mean over tasks (the authors' ``--dataset ni``). The run's own number is the
  mean over its tasks.

A run directory holds ``results.json`` and ``config.gin`` (written by `mhr_jax.trainer.run`) and,
from `mhr_jax.sweep`, ``run.json`` declaring its method, dataset and seed; without ``run.json`` they
are read from ``results.json`` (``kind``, ``mode``) and ``config.gin`` (``TrainConfig.seed``,
``DataConfig.eval_tasks`` / ``mixture``). A folder with ``sweep.json`` lists the runs planned.
`docs/protocol.md` has the file formats. The report refuses, naming the runs: runs planned but
not finished, holes in the grid (a method without every dataset x seed the others have), two runs
of the same cell, runs evaluated under different protocols (split, example cap, beams) and runs
without the requested score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from etils import epath

from mhr_jax import paths as run_paths
from mhr_jax import protocol

RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.gin"
METRICS = {"random_template": protocol.RANDOM_TEMPLATE, "median_template": protocol.MEDIAN_TEMPLATE}
T0, SUPER_NI = "t0", "super_ni"
# Known methods first, in this order; others follow alphabetically.
METHOD_ORDER = ("lora", "poly", "mhr", "mhr_z", "mhr_mu", "zeroshot_mhr_mu", "full")


class ReportError(ValueError):
  """The runs cannot make one table; the message names every run at fault."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run's contribution: ``scores`` maps dataset (T0) or test task (Super-NI) to its score."""

  path: epath.Path
  benchmark: str
  method: str
  seed: int
  scores: dict
  protocol: tuple  # sorted (key, value) pairs that must agree across a table


# ------------------------------------------------------------------------------ reading runs


def read_gin(path: epath.Path) -> dict[str, Any]:
  """The bindings of an operative config (``config.gin``), macros resolved.

  Keys are ``"Configurable.param"`` (macros under their own name); configurable references stay
  strings such as ``"@DataConfig()"``.
  """
  from gin import config_parser

  class Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_name, evaluate):
      return f"@{scoped_name}{'()' if evaluate else ''}"

    def macro(self, macro_name):
      return _Macro(macro_name)

  raw = {}
  for statement in config_parser.ConfigParser(path.read_text(), Delegate()):
    if isinstance(statement, config_parser.BindingStatement):
      key = statement.selector + (f".{statement.arg_name}" if statement.arg_name else "")
      raw[key] = statement.value

  def resolve(value, depth=0):
    if isinstance(value, _Macro):
      if value.name not in raw or depth > 20:
        raise ReportError(f"{path}: macro %{value.name} is not bound")
      return resolve(raw[value.name], depth + 1)
    if isinstance(value, (list, tuple)):
      return type(value)(resolve(v, depth) for v in value)
    if isinstance(value, dict):
      return {k: resolve(v, depth) for k, v in value.items()}
    return value

  return {k: resolve(v) for k, v in raw.items()}


@dataclasses.dataclass(frozen=True)
class _Macro:
  name: str


def _read_json(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ReportError(f"{path}: not valid JSON: {e}") from e


def _method_of(results: dict) -> str:
  kind, mode = results.get("kind"), results.get("mode")
  if not kind or not mode:
    raise ReportError("results.json has no kind or mode")
  return mode if kind == "finetune" else f"{kind}_{mode}"


def _t0_datasets(candidates: Iterable[str], eval_results: dict) -> dict[str, list[str]]:
  """``{dataset: template tasks}`` of a run without run.json, from its evaluated mixtures.

  ``t0_<dataset>`` names one dataset, whose templates are the ``t0_<dataset>_*`` evaluation
  entries; ``t0_heldout`` every dataset of `tasks.t0.DATASETS` with entries.
  """
  out = {}
  for name in candidates:
    if name == "t0_heldout":
      from tasks import t0

      names = [f"t0_{d}" for d in t0.DATASETS]
    elif name.startswith("t0_"):
      names = [name]
    else:
      continue
    for mixture in names:
      templates = sorted(k for k in eval_results if k.startswith(mixture + "_"))
      if templates or mixture in eval_results:
        out[mixture[len("t0_"):]] = templates
  return out


def _declaration(run_dir: epath.Path, results: dict, gin: dict) -> dict:
  """What a run is (benchmark, method, seed, datasets): run.json, else results.json + config.gin."""
  path = run_dir / RUN_FILE
  if path.is_file():
    declared = _read_json(path)
    missing = [k for k in ("benchmark", "method", "seed") if k not in declared]
    if declared.get("benchmark") == T0 and "datasets" not in declared:
      if "dataset" not in declared:
        missing.append("datasets")
      declared["datasets"] = {declared.get("dataset"): []}
    if missing:
      raise ReportError(f"{path}: missing {missing}")
    return declared
  eval_results = results.get("eval", {})
  candidates = list(gin.get("DataConfig.eval_tasks") or ()) + [gin.get("DataConfig.mixture", "")]
  if "TrainConfig.seed" not in gin:
    raise ReportError(f"{run_dir / CONFIG_FILE}: no TrainConfig.seed binding")
  declared = {"method": _method_of(results), "seed": int(gin["TrainConfig.seed"])}
  if any("rougeL" in m for m in eval_results.values()):
    return {**declared, "benchmark": SUPER_NI}
  datasets = _t0_datasets(candidates, eval_results)
  if not datasets:
    raise ReportError(f"{run_dir}: neither T0 (t0_<dataset> evaluation tasks) nor Super-NI "
                      "(rougeL) results; add a run.json (docs/protocol.md)")
  return {**declared, "benchmark": T0, "datasets": datasets}


def _t0_scores(run_dir: epath.Path, declared: dict, results: dict,
               metric: str) -> dict[str, Optional[float]]:
  """Each dataset's score under ``metric``; None where the run has none."""
  eval_results = results.get("eval", {})
  scores = {}
  for dataset, templates in declared["datasets"].items():
    entry = eval_results.get(f"t0_{dataset}", {})
    if metric in entry:
      scores[dataset] = float(entry[metric])
    elif metric == protocol.MEDIAN_TEMPLATE and templates:
      # T0's protocol needs only the per-template accuracies every run records.
      absent = [t for t in templates if "accuracy" not in eval_results.get(t, {})]
      if absent:
        raise ReportError(f"{run_dir / RESULTS_FILE}: no accuracy for templates {absent}")
      scores[dataset] = protocol.median_template_accuracy(
          [eval_results[t]["accuracy"] for t in templates])
    else:
      scores[dataset] = None
  return scores


def read_run(run_dir: epath.Path, metric: str) -> Optional[Run]:
  """One run directory as a `Run`; ``scores`` values are None where ``metric`` is absent.

  A run that evaluated nothing (a pre-training run next to a sweep) gives None.
  """
  results = _read_json(run_dir / RESULTS_FILE)
  if not results.get("eval"):
    return None
  gin_path = run_dir / CONFIG_FILE
  if not gin_path.is_file():
    raise ReportError(f"{run_dir}: no {CONFIG_FILE} (its evaluation protocol is unknown)")
  gin = read_gin(gin_path)
  declared = _declaration(run_dir, results, gin)
  benchmark = declared["benchmark"]
  proto = {"eval_split": gin.get("DataConfig.eval_split"),
           "max_eval_examples": gin.get("DataConfig.max_eval_examples")}
  if benchmark == T0:
    scores = _t0_scores(run_dir, declared, results, metric)
    proto["metric"] = metric
  elif benchmark == SUPER_NI:
    scores = {k: float(m["rougeL"]) for k, m in results.get("eval", {}).items() if "rougeL" in m}
    proto["eval_num_beams"] = gin.get("DataConfig.eval_num_beams")
  else:
    raise ReportError(f"{run_dir}: unknown benchmark {benchmark!r} (t0 or super_ni)")
  return Run(run_dir, benchmark, str(declared["method"]), int(declared["seed"]), scores,
             tuple(sorted(proto.items())))


def collect(paths: Sequence[str | epath.Path]) -> tuple[list[epath.Path], list[str]]:
  """(run directories under ``paths``, planned runs of sweep folders that have no results).

  ``paths`` are local folders or bucket prefixes (``gs://...``), read through ``etils.epath``.
  """
  found, missing = [], []
  for root in map(run_paths.run_dir, paths):
    if not root.is_dir():
      raise ReportError(f"{root}: not a directory")
    for sweep_file in run_paths.find(root, SWEEP_FILE):
      plan = _read_json(sweep_file)
      for planned in plan.get("runs", []):
        run_dir = sweep_file.parent / planned["dir"]
        if not (run_dir / RESULTS_FILE).is_file():
          missing.append(f"{run_dir} ({planned['method']}, {planned['dataset']}, "
                         f"seed {planned['seed']})")
    # A run's own folders (checkpoints, tensorboard) hold no results.json of their own.
    found.extend(p.parent for p in run_paths.find(root, RESULTS_FILE))
  return list(dict.fromkeys(found)), missing


# ------------------------------------------------------------------------------ checks and tables


def _name_runs(runs: Sequence[Run], limit: int = 6) -> str:
  names = [str(r.path) for r in runs[:limit]]
  more = f" and {len(runs) - limit} more" if len(runs) > limit else ""
  return ", ".join(names) + more


def check(runs: Sequence[Run], missing: Sequence[str], metric: str) -> None:
  """Raises `ReportError` listing every problem that keeps the runs from one table."""
  problems = []
  if missing:
    problems.append("runs planned but not finished: " + "; ".join(missing))
  for benchmark in sorted({r.benchmark for r in runs}):
    group = [r for r in runs if r.benchmark == benchmark]
    protocols = {}
    for r in group:
      protocols.setdefault(r.protocol, []).append(r)
    if len(protocols) > 1:
      problems.append(f"{benchmark}: runs evaluated under different protocols: " + "; ".join(
          f"{dict(p)}: {_name_runs(rs)}" for p, rs in protocols.items()))
    lacking = [r for r in group if any(v is None for v in r.scores.values())]
    if lacking:
      problems.append(
          f"{benchmark}: no {metric} for some datasets of {_name_runs(lacking)} (evaluated "
          "before dataset-level scores were recorded: evaluate them again, or report "
          "--metric median_template)")
    cells = {}
    for r in group:
      for dataset in r.scores:
        cells.setdefault((r.method, dataset, r.seed), []).append(r)
    twice = {k: rs for k, rs in cells.items() if len(rs) > 1}
    for (method, dataset, seed), rs in sorted(twice.items()):
      problems.append(f"{benchmark}: {method} / {dataset} / seed {seed} comes from several "
                      f"runs: {_name_runs(rs)}")
    methods = sorted({m for m, _, _ in cells})
    datasets = sorted({d for _, d, _ in cells})
    seeds = sorted({s for _, _, s in cells})
    holes = [f"{m} / {d} / seed {s}" for m in methods for d in datasets for s in seeds
             if (m, d, s) not in cells]
    if holes:
      problems.append(f"{benchmark}: missing runs (every method needs every dataset x seed "
                      f"present): {'; '.join(holes)}")
  if problems:
    raise ReportError("cannot make the table:\n- " + "\n- ".join(problems))


def _std(values) -> Optional[float]:
  """Sample standard deviation (ddof 1, as pandas' ``std`` in the authors' script); None for one
  value."""
  values = np.asarray(values, np.float64)
  return float(np.std(values, ddof=1)) if values.size > 1 else None


def aggregate(scores: dict[str, dict[int, float]]) -> dict:
  """One method's row from ``{dataset: {seed: score}}`` (every dataset with the same seeds)."""
  datasets = {}
  for dataset, by_seed in sorted(scores.items()):
    values = [by_seed[s] for s in sorted(by_seed)]
    datasets[dataset] = {"median": float(np.median(values)), "std_over_seeds": _std(values),
                         "scores": {str(s): by_seed[s] for s in sorted(by_seed)}}
  medians = [d["median"] for d in datasets.values()]
  seeds = sorted(next(iter(scores.values())))
  per_seed = {str(s): float(np.mean([scores[d][s] for d in scores])) for s in seeds}
  return {"datasets": datasets, "mean": float(np.mean(medians)),
          "std_over_seeds": _std(list(per_seed.values())), "std_over_datasets": _std(medians),
          "per_seed_mean": per_seed}


def build_tables(runs: Sequence[Run], metric: str) -> dict:
  """The report's JSON: per benchmark, its protocol, seeds, datasets and one row per method."""
  tables = {}
  for benchmark in sorted({r.benchmark for r in runs}):
    group = [r for r in runs if r.benchmark == benchmark]
    by_method: dict[str, dict[str, dict[int, float]]] = {}
    paths: dict[str, list[str]] = {}
    for r in group:
      for dataset, score in r.scores.items():
        by_method.setdefault(r.method, {}).setdefault(dataset, {})[r.seed] = score
      paths.setdefault(r.method, []).append(str(r.path))
    order = sorted(by_method, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER
                                             else len(METHOD_ORDER), m))
    tables[benchmark] = {
        "score": metric if benchmark == T0 else "rougeL",
        "protocol": dict(group[0].protocol),
        "seeds": sorted({r.seed for r in group}),
        "datasets": sorted({d for r in group for d in r.scores}),
        "methods": {m: {**aggregate(by_method[m]), "runs": sorted(paths[m])} for m in order},
    }
  return tables


def _cell(value: float, spread: Optional[float]) -> str:
  return f"{value:.1f}" + (f" ({spread:.1f})" if spread is not None else "")


def format_markdown(tables: dict) -> str:
  """The tables as Markdown, each under a heading saying what its numbers are."""
  out = []
  for benchmark, table in tables.items():
    seeds = ", ".join(map(str, table["seeds"]))
    proto = ", ".join(f"{k} {v}" for k, v in table["protocol"].items())
    if benchmark == T0:
      out += [f"### T0 held-out: {table['score']} (%)", "",
              f"Per dataset the median over seeds {seeds} (standard deviation over seeds); mean: "
              "the mean over datasets of the medians (standard deviation over seeds of the "
              f"per-seed mean). Protocol: {proto}.", ""]
      cols = table["datasets"]
      out.append("| method | " + " | ".join(cols) + " | mean |")
      out.append("|---" * (len(cols) + 2) + "|")
      for method, row in table["methods"].items():
        cells = [_cell(row["datasets"][d]["median"], row["datasets"][d]["std_over_seeds"])
                 for d in cols]
        out.append(f"| {method} | " + " | ".join(cells) + " | "
                   f"{_cell(row['mean'], row['std_over_seeds'])} |")
    else:
      out += ["### Super-NaturalInstructions: Rouge-L", "",
              f"Per test task the median over seeds {seeds}, then the mean over "
              f"{len(table['datasets'])} tasks (standard deviation over seeds of each run's "
              f"mean over tasks). Protocol: {proto}.", "",
              "| method | Rouge-L | per run (seed: mean over tasks) |", "|---|---|---|"]
      for method, row in table["methods"].items():
        runs = ", ".join(f"{s}: {v:.1f}" for s, v in row["per_seed_mean"].items())
        out.append(f"| {method} | {_cell(row['mean'], row['std_over_seeds'])} | {runs} |")
    out.append("")
  return "\n".join(out)


def report(paths: Sequence[str | epath.Path], metric: str = "random_template") -> dict:
  """Reads, checks and aggregates the runs under ``paths``; raises `ReportError` when refused."""
  if metric not in METRICS:
    raise ReportError(f"--metric must be one of {sorted(METRICS)}; got {metric!r}")
  run_dirs, missing = collect(paths)
  if not run_dirs and not missing:
    raise ReportError(f"no run directories ({RESULTS_FILE}) under {', '.join(map(str, paths))}")
  runs = [r for r in (read_run(d, METRICS[metric]) for d in run_dirs) if r is not None]
  check(runs, missing, METRICS[metric])
  return build_tables(runs, METRICS[metric])


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("paths", nargs="+", help="run directories or folders holding them")
  parser.add_argument("--metric", default="random_template", choices=sorted(METRICS),
                      help="T0 dataset score: the authors' (random_template) or T0's protocol")
  parser.add_argument("--json", help="write the tables as JSON here")
  parser.add_argument("--markdown", help="write the Markdown here")
  args = parser.parse_args(argv)
  try:
    tables = report(args.paths, args.metric)
  except ReportError as e:
    print(f"report: {e}", file=sys.stderr)
    return 2
  text = format_markdown(tables)
  print(text)
  if args.markdown:
    epath.Path(args.markdown).write_text(text)
  if args.json:
    epath.Path(args.json).write_text(json.dumps(tables, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
