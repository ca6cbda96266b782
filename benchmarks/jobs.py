"""What a worker process runs: a job (a JSON-serialisable dict) in, result records out.

A job's ``kind`` picks its handler from ``KINDS``; every job has ``impl`` (``ours``, ``peft``,
or ``ours+peft`` for jobs with both) and ``threads`` (torch's CPU threads; None leaves torch's
default). The kinds:

  peak      ``n``: the best of ``steps`` float32 (n x n) matmuls.
  step      ``config``: ``steps`` timed steps after ``warmup``, in a process of its own (so its
            peak memory belongs to one implementation and one configuration).
  profile   ``config``: per-op profile of ``steps`` steps (``benchmarks.profiling``).
  in_turn   ``entries`` (each ``impl``, ``config``, ``name`` and ``tags`` added to the record's
            config): every entry's step built in this one process, then ``steps`` rounds of one
            step of each in turn, so that all see the same machine load.
  vmap      ``config``, ``n_jobs``: vmapped fine-tuning of ``n_jobs`` tasks against a loop.
  group     ``jobs``: several jobs in one process (quick runs, where start-up dominates).

JAX and torch are imported only by the handlers that need them, so a PEFT-only process's
peak memory holds no JAX.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

from benchmarks import timing
from benchmarks.configs import StepConfig
from benchmarks.flops import step_flops
from benchmarks.records import Record, step_record

Job = dict[str, Any]


def _ours():
  from benchmarks import jax_runner  # noqa: PLC0415 - keeps JAX out of PEFT-only processes
  return jax_runner


def _peft():
  from benchmarks import torch_runner  # noqa: PLC0415
  return torch_runner


def _peak(job: Job) -> list[Record]:
  n, reps = job["n"], job.get("steps", 20)
  res = (_ours().measure_peak(n, reps) if job["impl"] == "ours"
         else _peft().measure_peak(n, reps, job.get("threads")))
  # The peak is the best repetition: the rate the machine can reach, not a typical one.
  best = min(res["times"])
  return [dict(name="peak_matmul", impl=job["impl"], config={"n": n, "dtype": "float32"},
               median_s=statistics.median(res["times"]), best_s=best,
               flops_per_s=res["flops"] / best, times=res["times"])]


def _step(job: Job) -> list[Record]:
  cfg = StepConfig(**job["config"])
  args = (cfg, job.get("steps", 5), job.get("warmup", 2), job.get("budget_s", 60.0))
  res = (_ours().measure_step(*args) if job["impl"] == "ours"
         else _peft().measure_step(*args, job.get("threads")))
  return [step_record(job.get("name", "step"), job["impl"], cfg, res)]


def _profile(job: Job) -> list[Record]:
  cfg = StepConfig(**job["config"])
  res = (_ours().measure_profile(cfg, job.get("steps", 3)) if job["impl"] == "ours"
         else _peft().measure_profile(cfg, job.get("steps", 3), job.get("threads")))
  return [dict(name="profile", impl=job["impl"], config=cfg.record(), median_s=res["step_s"],
               model_flops=step_flops(cfg)["step"], **res)]


def _in_turn(job: Job) -> list[Record]:
  entries = job["entries"]
  cfgs = [StepConfig(**e["config"]) for e in entries]
  caches: dict[str, dict] = {"ours": {}, "peft": {}}  # one backbone copy per implementation
  runs = []
  for e, cfg in zip(entries, cfgs):
    if e["impl"] == "ours":
      runs.append(_ours().ours_runner(cfg, backbone=caches["ours"])[0])
    else:
      runs.append(_peft().peft_runner(cfg, job.get("threads"), backbone=caches["peft"])[0])
  times, cpu_times, firsts = timing.in_turn(runs, job.get("steps", 5), job.get("warmup", 1))
  records = []
  for e, cfg, ts, cpu, first in zip(entries, cfgs, times, cpu_times, firsts):
    rec = step_record(e.get("name", "in_turn_step"), e["impl"], cfg,
                      {"times": ts, "cpu_times": cpu, "first_step_s": first})
    rec["config"].update(e.get("tags", {}))
    records.append(rec)
  return records


def _vmap(job: Job) -> list[Record]:
  from benchmarks import jax_vmap  # noqa: PLC0415
  cfg, n_jobs = StepConfig(**job["config"]), job["n_jobs"]
  records = []
  for res in jax_vmap.measure_vmap(cfg, n_jobs, job.get("steps", 3), job.get("budget_s", 240.0)):
    rec = step_record(f"finetune_{res['variant']}", "ours", cfg, res)
    rec["config"].update(n_jobs=n_jobs, variant=res["variant"])
    rec["profile"] = res["profile"]
    for k in ("tokens_per_s", "model_flops", "flops_per_s"):  # one timed unit trains every task
      rec[k] *= n_jobs
    records.append(rec)
  return records


def _group(job: Job) -> list[Record]:
  records = [r for sub in job["jobs"] for r in run_job(sub)]
  for r in records:
    r["shared_process"] = True  # peak RSS covers every measurement of the group
  return records


KINDS: dict[str, Callable[[Job], list[Record]]] = {
    "peak": _peak, "step": _step, "profile": _profile, "in_turn": _in_turn, "vmap": _vmap,
    "group": _group,
}


def _device(impl: str, threads) -> dict[str, Any]:
  """Where the job's steps ran: the JAX platform and device kind, and torch's device."""
  out: dict[str, Any] = {}
  if "ours" in impl:
    out.update(_ours().platform())
  if "peft" in impl:
    out.update(_peft().platform(threads))
  return out


def run_job(job: Job) -> list[Record]:
  """Runs one job in this process and returns its records (ratios are derived later)."""
  handler = KINDS.get(job["kind"])
  if handler is None:
    raise ValueError(f"unknown job kind {job['kind']!r}; known: {sorted(KINDS)}")
  records = handler(job)
  if job["kind"] != "group":
    rss, device = timing.peak_rss_mb(), _device(job["impl"], job.get("threads"))
    for r in records:
      r["peak_rss_mb"] = rss
      r["device"] = device
  return records
