"""``python -m mhr_jax.sweep --gin_file=... --init_from=RUN --methods=... --out=DIR [...]``.

The paper's T0 few-shot grid from one pre-trained run: every requested held-out dataset x few-shot
seed x method is fine-tuned by `mhr_jax.trainer.run` in its own run directory,
``OUT/<method>/<dataset>/seed_<seed>/``, and ``OUT/sweep.json`` lists the runs planned. Started
again with the same configuration it skips finished runs (those with ``results.json``) and resumes
an interrupted one from its last checkpoint; `mhr_jax.report` turns the folder into the table.

Flags: ``--init_from`` (the pre-training run), ``--methods`` (adapter modes fine-tuned from it:
``mhr``, ``mhr_z``, ``mhr_mu``, ``poly`` from a Poly/MHR run, ``lora`` from a LoRA run),
``--datasets`` (T0 held-out datasets with an evaluation set; default all five), ``--seeds``
(few-shot seeds; default 42, 1024, 0, the authors' ``finetune_t0`` in
``projects/mhr/pl_finetune.py``, microsoft/mttl at ``mhr-camera-ready``), ``--shots`` (the
``<k>_shot`` folder; default the only one), ``--t0_data_dir`` (default ``$MHR_DATA_DIR``),
``--out``, ``--dry_run`` (print the plan); and as in ``mhr_jax.train``: ``--gin_file``
(repeatable), ``--gin_search_path``, ``--gin.NAME=VALUE``. ``--out`` and ``--init_from`` may be
bucket paths (``gs://...``); the few-shot data folder is local.

Each run gets the gin files and bindings, then its own: ``MODEL_DIR``, ``MIXTURE``, ``EVAL_TASKS``,
``INIT_FROM``, ``SEED`` (the run's seed is its few-shot seed, as in the authors' code), the method
as ``AdapterConfig.mode`` and the adapter's shape (skills, heads, rank, layers) from the
pre-trained run. A run's method, dataset and seed are declared in its ``run.json``
(`docs/protocol.md`).

One worker process per few-shot seed runs that seed's runs one after another: `tasks.t0` registers
one seed's few-shot files per process. Runs do not share a program: ``TrainConfig.vmap_tasks``
gives one copy per seqio task of the mixture, and a T0 dataset is one task per template, so it
would train every template on its own instead of the dataset; seeds cannot share one either, since
the seed's files are registered under the same task names and ``TrainConfig.seed`` is one per
program. The workers share compiled programs instead, through JAX's persistent compilation cache
(``$JAX_COMPILATION_CACHE_DIR``, by default ``OUT/jax_cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Optional, Sequence

from etils import epath

from mhr_jax import modes, paths

SWEEP_FILE = "sweep.json"
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
DEFAULT_SEEDS = (42, 1024, 0)
# Adapter fields that must match the pre-trained run's (the checkpoint's shapes).
ADAPTER_SHAPE = ("n_skills", "n_splits", "lora_rank", "lora_alpha", "layers")


# ------------------------------------------------------------------------------ T0 task names


def register_fewshot(data_dir: str, datasets: Sequence[str], seed: int,
                     shots: Optional[int]) -> dict[str, list[str]]:
  """Registers the T0 tasks of one few-shot seed; returns ``{dataset: template task names}``."""
  from tasks import t0

  return t0.register_t0(data_dir, datasets=tuple(datasets), fewshot_seed=seed,
                        shots={d: shots for d in datasets} if shots else None)


def finetune_tasks(dataset: str) -> tuple[str, list[str]]:
  """(training mixture, evaluation tasks) of fine-tuning on one T0 held-out dataset.

  Both are the dataset's mixture ``t0_<dataset>``: every template of the few-shot set trains (with
  one task id per template) and every template is evaluated.
  """
  return f"t0_{dataset}", [f"t0_{dataset}"]


# ------------------------------------------------------------------------------ the plan


def run_dir(method: str, dataset: str, seed: int) -> str:
  return f"{method}/{dataset}/seed_{seed}"


def check_request(config: dict, datasets: Sequence[str], seeds: Sequence[int],
                  methods: Sequence[str]) -> None:
  """Fails before anything runs: unknown datasets or methods, missing files, a wrong parent."""
  from tasks import t0

  problems = []
  unknown = [d for d in datasets if d not in t0.DATASETS]
  no_eval = [d for d in datasets if d in t0.DATASETS and not t0.DATASETS[d].eval]
  if unknown:
    problems.append(f"unknown datasets {unknown}; known: {sorted(t0.DATASETS)}")
  if no_eval:
    problems.append(f"datasets {no_eval} have no evaluation set in tasks/t0.py")
  root = pathlib.Path(config["t0_data_dir"])
  missing = [str(t0.fewshot_file(root, t0.DATASETS[d], config["shots"], s))
             for d in datasets if d in t0.DATASETS for s in seeds]
  missing = [f for f in missing if not pathlib.Path(f).is_file()]
  if missing:
    problems.append(f"few-shot files not found: {', '.join(missing)}")
  parent_results = paths.run_dir(config["init_from"]) / RESULTS_FILE
  if not parent_results.is_file():
    problems.append(f"--init_from {config['init_from']} has no {RESULTS_FILE}: its training "
                    "has not finished")
  else:
    mode = json.loads(parent_results.read_text()).get("mode")
    allowed = modes.modes_starting_from(mode)
    wrong = [m for m in methods if m not in allowed]
    if wrong:
      problems.append(f"methods {wrong} cannot be fine-tuned from {config['init_from']} (mode "
                      f"{mode!r}); it allows {list(allowed)}")
  if problems:
    raise ValueError("sweep refused:\n- " + "\n- ".join(problems))


def merge_plan(out: epath.Path, config: dict, runs: list[dict]) -> dict:
  """The content of ``sweep.json``: the configuration and every run planned, earlier
  invocations' too. A folder holds one configuration: another one (gin files, bindings, parent,
  data) fails."""
  path = out / SWEEP_FILE
  if path.is_file():
    saved = json.loads(path.read_text())
    if saved["config"] != config:
      diff = {k: (saved["config"].get(k), config.get(k)) for k in set(saved["config"]) | set(config)
              if saved["config"].get(k) != config.get(k)}
      raise ValueError(f"{out} holds a sweep with another configuration (saved, now): {diff}; "
                       "use another --out")
    known = {r["dir"] for r in runs}
    runs = [r for r in saved["runs"] if r["dir"] not in known] + runs
  return {"format": "mhr_jax.sweep/v1", "config": config, "runs": runs}


def pending(out: epath.Path, plan: dict, seed: Optional[int] = None) -> list[dict]:
  """The planned runs without results (of one seed, if given)."""
  return [r for r in plan["runs"] if (seed is None or r["seed"] == seed)
          and not (out / r["dir"] / RESULTS_FILE).is_file()]


# ------------------------------------------------------------------------------ one worker


def _binding(name: str, value) -> str:
  return f"{name}={value!r}"


def run_bindings(config: dict, run: dict, parent_adapter: Optional[dict], out: epath.Path,
                 mixture: str, eval_tasks: list[str]) -> list[str]:
  """The gin bindings that make the sweep's configuration into one run."""
  bindings = [
      _binding("MODEL_DIR", str(out / run["dir"])), _binding("MIXTURE", mixture),
      _binding("EVAL_TASKS", list(eval_tasks)), _binding("INIT_FROM", config["init_from"]),
      _binding("SEED", run["seed"]), _binding("T0_DATA_DIR", config["t0_data_dir"]),
      # The worker registered this seed's few-shot files; the trainer must not register others.
      "DataConfig.t0_data_dir=None", "run.kind='finetune'", "TrainConfig.vmap_tasks=False",
      "run.adapter_config=@AdapterConfig()", _binding("AdapterConfig.mode", run["method"])]
  for field in ADAPTER_SHAPE if parent_adapter else ():
    bindings.append(_binding(f"AdapterConfig.{field}", parent_adapter[field]))
  return bindings


def worker(out: epath.Path, seed: int) -> None:
  """Runs the unfinished runs of one few-shot seed, in this process, one after another."""
  import gin

  from mhr_jax import checkpoints, train, trainer

  plan = json.loads((out / SWEEP_FILE).read_text())
  config = plan["config"]
  todo = pending(out, plan, seed)
  if not todo:
    return
  datasets = sorted({r["dataset"] for r in plan["runs"]})
  templates = register_fewshot(config["t0_data_dir"], datasets, seed, config["shots"])
  parent_adapter = checkpoints.read_metadata(config["init_from"]).get("adapter_config")
  for run in todo:
    mixture, eval_tasks = finetune_tasks(run["dataset"])
    bindings = config["gin_bindings"] + run_bindings(config, run, parent_adapter, out, mixture,
                                                     eval_tasks)
    gin.clear_config()
    train.parse_gin(config["gin_files"], bindings, config["gin_search_paths"])
    directory = out / run["dir"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_FILE).write_text(json.dumps({
        "format": "mhr_jax.run/v1", "benchmark": "t0", "method": run["method"],
        "seed": run["seed"], "dataset": run["dataset"],
        "datasets": {run["dataset"]: templates[run["dataset"]]},
        "train_mixture": mixture, "init_from": config["init_from"],
        "t0_data_dir": config["t0_data_dir"], "shots": config["shots"]}, indent=1))
    print(f"== {run['dir']}", flush=True)
    trainer.run()


# ------------------------------------------------------------------------------ command line


def _csv(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  """The sweep's flags; gin flags (and ``--dry_run``) are read by ``mhr_jax.train``'s parser."""
  from mhr_jax import train

  parser = argparse.ArgumentParser(prog="python -m mhr_jax.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="the sweep folder")
  parser.add_argument("--worker_seed", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--init_from", help="the pre-trained run's model directory")
  parser.add_argument("--methods", type=_csv, default=[])
  parser.add_argument("--datasets", type=_csv, default=["rte", "cb", "copa", "wic", "wsc"])
  parser.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)],
                      default=list(DEFAULT_SEEDS))
  parser.add_argument("--shots", type=int, default=None)
  parser.add_argument("--t0_data_dir", default=os.environ.get("MHR_DATA_DIR"))
  args, rest = parser.parse_known_args(argv)
  if args.worker_seed is None:
    gin_args = train.parse_flags(rest)
    args.gin_files, args.gin_bindings = gin_args.gin_file, gin_args.gin_bindings
    args.gin_search_paths, args.dry_run = gin_args.gin_search_path, gin_args.dry_run
    for flag in ("init_from", "methods", "t0_data_dir"):
      if not getattr(args, flag):
        parser.error(f"--{flag} is required")
  elif rest:
    parser.error(f"a worker takes no other flags: {rest}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  out = paths.run_dir(args.out)
  if args.worker_seed is not None:
    worker(out, args.worker_seed)
    return 0
  from mhr_jax import train

  config = {"init_from": str(paths.run_dir(args.init_from)),
            "t0_data_dir": str(pathlib.Path(args.t0_data_dir).absolute()), "shots": args.shots,
            "gin_files": [train.resolve_gin_file(f, args.gin_search_paths) for f in args.gin_files],
            "gin_search_paths": [str(pathlib.Path(p).absolute()) for p in args.gin_search_paths],
            "gin_bindings": list(args.gin_bindings)}
  check_request(config, args.datasets, args.seeds, args.methods)
  runs = [{"method": m, "dataset": d, "seed": s, "dir": run_dir(m, d, s)}
          for s in args.seeds for m in args.methods for d in args.datasets]
  plan = merge_plan(out, config, runs)
  todo = pending(out, plan)
  print(f"sweep {out}: {len(plan['runs'])} runs planned, {len(todo)} to run", flush=True)
  if args.dry_run:
    for r in todo:
      print(f"  {r['dir']}")
    return 0
  out.mkdir(parents=True, exist_ok=True)
  (out / SWEEP_FILE).write_text(json.dumps(plan, indent=1))
  # Workers import this checkout's code, wherever the command was started, and share compiled
  # programs through JAX's persistent cache: the runs of one method have the same shapes.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(train.REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
  for seed in dict.fromkeys(r["seed"] for r in todo):
    # A fresh process per seed: tasks.t0 registers one seed's few-shot files per process.
    done = subprocess.run([sys.executable, "-m", "mhr_jax.sweep", "--out", str(out),
                           "--worker_seed", str(seed)], env=env)
    if done.returncode != 0:
      left = [r["dir"] for r in pending(out, plan, seed)]
      print(f"sweep: the worker of seed {seed} failed (exit {done.returncode}); unfinished: "
            f"{', '.join(left)}. Run the same command again to resume.", file=sys.stderr)
      return done.returncode
  print(f"sweep {out}: done. The table: python -m mhr_jax.report {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
