"""A run's plan: sizes and budgets (``Plan``) and the jobs each measurement adds, as data.

``MEASUREMENTS`` maps each name ``--only`` takes to the function listing its jobs (see
``benchmarks.jobs`` for what a job holds).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

Job = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and budgets of one benchmark run."""

  shapes: tuple[str, ...] = ("small",)
  batch: int = 8
  in_len: int = 128
  tgt_len: int = 32
  steps: int = 3
  warmup: int = 1
  step_budget_s: float = 60.0
  peak_n: int = 2048
  n_skills_sweep: tuple[int, ...] = (2, 8, 64)
  n_splits_sweep: tuple[int, ...] = (1, 8, 64)
  n_tasks_sweep: tuple[int, ...] = (10, 1000, 10000)
  routing_ranks: tuple[int, ...] = (1, 8)
  routing_splits: tuple[int, ...] = (1, 8, 64)
  routing_impls: tuple[str, ...] = ("ours", "peft")  # ours alone takes half the time per round
  sweep_shape: str = "small2"
  sweep_steps: int = 3
  vmap_shape: str = "small2"
  vmap_jobs: int = 8
  vmap_steps: int = 3
  threads: Optional[int] = None  # torch's CPU threads; None: torch's default (the cores)
  job_timeout_s: float = 3600.0
  xla_flags: str = ""  # added to XLA_FLAGS of the worker processes

  def config(self, shape: str, **kw) -> dict[str, Any]:
    """A ``StepConfig`` (as a dict) at this plan's batch and lengths."""
    return dict(shape=shape, batch=self.batch, in_len=self.in_len, tgt_len=self.tgt_len) | kw


# --quick: smoke-tests the pipeline in a few minutes; its figures mean nothing. One torch thread:
# on a loaded machine, spin-waiting threads made PEFT's tiny steps 10x slower.
QUICK = Plan(shapes=("tiny",), batch=2, in_len=16, tgt_len=8, steps=3, warmup=1, step_budget_s=5,
             peak_n=256, n_skills_sweep=(), n_splits_sweep=(), n_tasks_sweep=(10, 1000),
             routing_ranks=(8,), routing_splits=(1, 4), sweep_shape="tiny", sweep_steps=2,
             vmap_shape="tiny", vmap_jobs=2, vmap_steps=2, threads=1, job_timeout_s=600.0,
             xla_flags="--xla_backend_optimization_level=0")

# The step configurations of ``step``, ``versus`` and ``profile``: no adapter, LoRA, Poly
# (S = 1) and MHR (S = 8), at rank 8.
STEP_METHODS = (dict(method="none"), dict(method="lora"), dict(method="poly", n_splits=1),
                dict(method="mhr", n_splits=8))


def _peak(plan: Plan) -> list[Job]:
  return [dict(kind="peak", impl=impl, n=plan.peak_n, steps=20, threads=plan.threads)
          for impl in ("ours", "peft")]


def _step(plan: Plan) -> list[Job]:
  return [dict(kind="step", impl=impl, name="step", config=plan.config(shape, **m),
               steps=plan.steps, warmup=plan.warmup, budget_s=plan.step_budget_s,
               threads=plan.threads)
          for shape in plan.shapes for m in STEP_METHODS for impl in ("ours", "peft")]


def _versus(plan: Plan) -> list[Job]:
  """Ours and PEFT's step of one configuration in one process, in turn."""
  return [dict(kind="in_turn", impl="ours+peft", steps=plan.steps + 2, warmup=2,
               threads=plan.threads,
               entries=[dict(impl=impl, name="versus_step", config=plan.config(shape, **m))
                        for impl in ("ours", "peft")])
          for shape in plan.shapes for m in STEP_METHODS]


# ``profile``'s configurations: no adapter, LoRA, and MHR (S = 8) on pre-training and on
# fine-tuning batches (ours without routing noise there, as in ``routing_entries``).
PROFILE_METHODS = (dict(method="none"), dict(method="lora"), dict(method="mhr", n_splits=8),
                   dict(method="mhr", n_splits=8, single_task=True))


def _profile(plan: Plan) -> list[Job]:
  jobs = []
  for shape in plan.shapes:
    for m in PROFILE_METHODS:
      for impl in ("ours", "peft"):
        config = plan.config(shape, **m)
        if impl == "ours" and m.get("single_task"):
          config["routing_noise"] = False
        jobs.append(dict(kind="profile", impl=impl, config=config, steps=plan.steps,
                         threads=plan.threads))
  return jobs


def routing_entries(plan: Plan, shape: str, rank: int) -> list[dict[str, Any]]:
  """No adapter, LoRA, Poly and MHR at each of ``plan.routing_splits`` on pre-training
  (mixed-task) and fine-tuning (single-task) batches, ours and PEFT's.

  Ours fine-tunes as the trainer's single-task runs do (no routing noise: the T0 setting, and
  one mixed adapter per layer); PEFT's Poly router samples noise in training regardless.
  """
  methods = [("any", dict(method="none")), ("any", dict(method="lora"))]
  for s in plan.routing_splits:
    routed = dict(method="poly" if s == 1 else "mhr", n_splits=s)
    methods.append(("pretrain", routed))
    methods.append(("finetune", dict(routed, single_task=True)))
  entries = []
  for impl in plan.routing_impls:
    for batch, m in methods:
      config = plan.config(shape, rank=rank, **m)
      if batch == "finetune" and impl == "ours":
        config["routing_noise"] = False
      entries.append(dict(impl=impl, name="routing_step", config=config, tags={"batch": batch}))
  return entries


def _routing(plan: Plan) -> list[Job]:
  """One process per shape and rank: every entry of ``routing_entries`` stepped in turn."""
  return [dict(kind="in_turn", impl="+".join(plan.routing_impls), steps=plan.steps + 2,
               warmup=1, threads=plan.threads, entries=routing_entries(plan, shape, rank))
          for shape in plan.shapes for rank in plan.routing_ranks]


def _sweep_entries(plan: Plan) -> dict[str, list[dict[str, Any]]]:
  """The points of each scaling axis (ours, MHR at the sweep shape)."""
  cfg = lambda **kw: plan.config(plan.sweep_shape, method="mhr", **kw)  # noqa: E731
  axes = {
      "n_skills": [cfg(n_skills=k, n_splits=8) for k in plan.n_skills_sweep],
      "n_splits": [dict(cfg(n_splits=s), method="mhr" if s > 1 else "poly")
                   for s in plan.n_splits_sweep],
      "n_tasks": [cfg(n_tasks=t) for t in plan.n_tasks_sweep],
  }
  if plan.n_tasks_sweep:  # the first point also on single-task batches
    axes["n_tasks"].append(cfg(n_tasks=plan.n_tasks_sweep[0], single_task=True))
  for update in ("dense", "rows"):
    axes[f"n_tasks_{update}"] = [cfg(n_tasks=t, routing_update=update)
                                 for t in plan.n_tasks_sweep]
  return {axis: [dict(impl="ours", name="scaling", config=c, tags={"sweep": axis})
                 for c in configs] for axis, configs in axes.items() if configs}


def _scaling(plan: Plan) -> list[Job]:
  """One process per axis (each within its timeout), its points stepped in turn: the machine's
  speed drifts by more than the effects between separate measurements."""
  return [dict(kind="in_turn", impl="ours", steps=plan.sweep_steps, warmup=2, entries=entries)
          for entries in _sweep_entries(plan).values()]


def _vmap(plan: Plan) -> list[Job]:
  return [dict(kind="vmap", impl="ours", n_jobs=plan.vmap_jobs,
               config=plan.config(plan.vmap_shape, method="mhr", n_tasks=1),
               steps=plan.vmap_steps, budget_s=4 * plan.step_budget_s)]


MEASUREMENTS: dict[str, Callable[[Plan], list[Job]]] = {
    "peak": _peak, "step": _step, "versus": _versus, "profile": _profile,
    "routing": _routing, "scaling": _scaling, "vmap": _vmap,
}


def make_jobs(plan: Plan, only: tuple[str, ...], quick: bool = False) -> list[Job]:
  """The worker jobs of a run, in order (``MEASUREMENTS`` order).

  Quick runs put each implementation's jobs in one process (start-up dominates at the tiny
  shape); the groups run one after the other, as XLA's and torch's thread pools would fight
  over the cores.
  """
  unknown = set(only) - set(MEASUREMENTS)
  if unknown:
    raise ValueError(f"unknown measurements {sorted(unknown)}; known: {tuple(MEASUREMENTS)}")
  jobs = [j for name, make in MEASUREMENTS.items() if name in only for j in make(plan)]
  if quick:
    groups = [dict(kind="group", impl=impl, jobs=[j for j in jobs if j["impl"] == impl])
              for impl in ("ours", "peft", "ours+peft")]
    jobs = [g for g in groups if g["jobs"]]
  return jobs
