"""The synthetic benchmark as a study: every method over several seeds, with paired statistics.

    python -m mhr_jax.train --gin_file=gin_configs/experiments/synthetic_study.gin

runs ``synthetic_benchmark`` once per seed (``<workdir>/seed_<s>``; the backbone is trained once,
in ``<workdir>/backbone``, and shared, as a pretrained checkpoint is), then reports per method
the mean and standard deviation over seeds of its mean held-out score and its trainable
parameters per task, and paired comparisons on (task, seed) pairs (``stats``). The analysis
plots (``mhr_jax.analysis``) of seed 0's pre-training runs go beside the report. Writes
``<workdir>/study.{md,json}`` and, with ``results_doc``, the same report with its plots as a
documentation page (``docs/results.md``).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import sys
import time
from typing import Optional, Sequence

import gin

from mhr_jax.experiments import stats, synthetic

# (a, b, claim of the paper about a against b); claim "better": a beats b, "similar": a is
# within the margin of b. Caccia et al. (2023), "Multi-Head Adapter Routing for Cross-Task
# Generalization", NeurIPS: abstract and sections 4-5.
COMPARISONS = (
    ("mhr", "poly", "better", "MHR beats Poly at a comparable parameter budget"),
    ("poly", "lora", "better", "routing (Poly) beats a single shared LoRA"),
    ("mhr_z", "mhr", "similar", "MHR-z, training only the routing, is competitive with MHR"),
    ("mhr_mu", "mhr", "similar", "MHR-mu (routing dropped for fine-tuning) fine-tunes about as "
     "well as MHR"),
    ("described_zeroshot_mhr_mu", "described_zeroshot_lora", "better",
     "zero-shot MHR-mu, after a few extra multi-task steps, beats zero-shot baselines"),
)
PRETRAINED = ("pretrain_lora", "pretrain_poly", "pretrain_mhr")


def _machine() -> dict:
  """CPU model, cores, memory and load of this machine (for the report)."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  memory = None
  try:
    kib = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
    memory = f"{kib / 2**20:.1f} GiB"
  except (OSError, ValueError, IndexError):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "python": sys.version.split()[0],
          "load_average": os.getloadavg()}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def summarize(tables: dict[int, dict], comparisons=COMPARISONS) -> dict:
  """Per-method spread over seeds and the paired comparisons, from each seed's table."""
  methods = list(next(iter(tables.values()))["methods"])
  rows = {}
  for method in methods:
    scores = {seed: t["methods"][method]["per_task"] for seed, t in tables.items()}
    first = next(iter(tables.values()))["methods"][method]
    rows[method] = dict(stats.spread_over_seeds(scores), trainable=first["trainable"],
                        trained_shared=first["trained_shared"], zero_shot=first["zero_shot"],
                        n_tasks=len(first["per_task"]))
  paired = []
  for a, b, claim, text in comparisons:
    if a in methods and b in methods:
      diff = stats.paired_difference(
          {s: t["methods"][a]["per_task"] for s, t in tables.items()},
          {s: t["methods"][b]["per_task"] for s, t in tables.items()})
      paired.append(dict(diff, a=a, b=b, claim=claim, paper=text,
                         verdict=stats.verdict(diff, claim)))
  first = next(iter(tables.values()))
  return {"methods": rows, "paired": paired, "seeds": sorted(tables), "split": first["split"],
          "backbone_primitives": first["backbone_primitives"]}


def _analyse(workdir: pathlib.Path, seed: int) -> dict:
  """Plots of seed ``seed``'s pre-training runs; returns ``{title: png path}`` and alignment."""
  from mhr_jax import analysis

  runs = [workdir / f"seed_{seed}" / name for name in PRETRAINED]
  runs = [r for r in runs if (r / "checkpoints").is_dir()]
  out = workdir / "plots"
  return analysis.compare_runs(runs, out)


@gin.configurable
def synthetic_study(
    *,
    dry_run: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    workdir: str = "runs/synthetic_study",
    results_doc: Optional[str] = None,
    analyse: bool = True,
    command: str = "python -m mhr_jax.train --gin_file=gin_configs/experiments/synthetic_study.gin",
) -> dict:
  """Runs the study (finished stages are reused) and writes its report.

  Args:
    dry_run: check the configuration and stop.
    seeds: one run of every stage but the backbone per seed.
    workdir: ``seed_<s>/`` per seed, ``backbone/``, ``plots/``, ``study.{md,json}``.
    results_doc: also write the report there (its plots into ``<stem>_plots/`` beside it).
    analyse: compute gradient alignment and draw the plots.
    command: the command line shown in the report.

  Returns:
    ``summarize``'s dictionary with the run's date, machine and times.
  """
  if len(seeds) < 2:
    raise ValueError(f"a study needs at least 2 seeds for its statistics, got {list(seeds)}")
  if dry_run:
    synthetic.synthetic_benchmark(dry_run=True)
    return {}
  work = pathlib.Path(workdir)
  started = datetime.datetime.now().astimezone()
  machine = _machine()
  t0, cpu0 = time.perf_counter(), _cpu_seconds()
  tables = {seed: synthetic.synthetic_benchmark(workdir=str(work / f"seed_{seed}"),
                                                shared_dir=str(work), seed=seed)
            for seed in seeds}
  summary = summarize(tables)
  summary["analysis"] = _analyse(work, seeds[0]) if analyse else {}
  summary.update(
      command=command, date=started.isoformat(timespec="seconds"), machine=machine,
      load_average_end=os.getloadavg(), wall_seconds=time.perf_counter() - t0,
      cpu_seconds=_cpu_seconds() - cpu0)
  from mhr_jax.experiments import study_report

  (work / "study.json").write_text(json.dumps(summary, indent=1, default=str))
  page = study_report.markdown(summary, plots_dir=work / "plots", base=work)
  (work / "study.md").write_text(page)
  if results_doc:
    doc = pathlib.Path(results_doc)
    plots = doc.parent / f"{doc.stem}_plots"
    plots.mkdir(parents=True, exist_ok=True)
    for png in (work / "plots").glob("*.png"):
      shutil.copy(png, plots / png.name)
    doc.write_text(study_report.markdown(summary, plots_dir=plots, base=doc.parent))
  print((work / "study.md").read_text(), flush=True)
  return summary
