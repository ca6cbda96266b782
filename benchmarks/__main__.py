"""``python -m benchmarks``: runs the planned jobs, each in its own worker process, and writes
``results.jsonl`` (one JSON object per measurement, the machine first) and ``table.md``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Optional

from benchmarks import derive, jobs, plan, records, tables


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="Training-step speed, memory and profiles: ours (JAX) against HF PEFT.")
  names = ",".join(plan.MEASUREMENTS)
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps (a few minutes)")
  parser.add_argument("--out", default="bench_out", help="folder for results.jsonl and table.md")
  parser.add_argument("--only", default=names, help=f"comma-separated subset of {names}")
  parser.add_argument("--shapes", default=None, help="comma-separated step shapes (small,base)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
  parser.add_argument("--ranks", default=None, help="comma-separated ranks of 'routing' (1,8)")
  parser.add_argument("--impls", default=None,
                      help="comma-separated implementations that 'routing' steps (ours,peft)")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch's CPU threads (default: torch's own); for JAX's, run the "
                           "command under `taskset`")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return parser


def _plan(args) -> plan.Plan:
  p = plan.QUICK if args.quick else plan.Plan()
  if args.shapes:
    p = dataclasses.replace(p, shapes=tuple(args.shapes.split(",")))
  if args.steps:
    p = dataclasses.replace(p, steps=args.steps)
  if args.ranks:
    p = dataclasses.replace(p, routing_ranks=tuple(int(r) for r in args.ranks.split(",")))
  if args.threads:
    p = dataclasses.replace(p, threads=args.threads)
  if args.impls:
    p = dataclasses.replace(p, routing_impls=tuple(args.impls.split(",")))
  return p


def _run_jobs(job_list, p: plan.Plan, out_file, t0: float) -> list[records.Record]:
  """Runs every job in its own process, streaming its records to ``out_file`` and stdout."""
  recs = []
  for job in job_list:
    for r in records.run_subprocess(job, p.job_timeout_s, p.xla_flags):
      out_file.write(json.dumps(r) + "\n")
      out_file.flush()
      msg = r.get("error", "")[-300:] or f"median {r['median_s']:.4g} s"
      print(f"[{time.perf_counter() - t0:6.0f} s] {r['name']} {r['impl']} "
            f"{r.get('config', {}).get('label', '')} {msg}", flush=True)
      recs.append(r)
  return recs


def _table(command: str, info: dict, recs: list, derived: list) -> str:
  text = tables.markdown_table(recs + derived)
  for title, part in (
      ("Routed steps in turn with the no-adapter step and PEFT's (step-time ratios)",
       tables.routing_table(derived)),
      ("Where the step time goes (seconds per step, `benchmarks.profiling`)",
       tables.profile_table(recs))):
    if part:
      text += f"\n\n{title}:\n\n{part}"
  devices = sorted({json.dumps(r["device"], sort_keys=True) for r in recs if "device" in r})
  return (f"Command: `{command}`  \nDate: {info['date']}  \nMachine: {info['nproc']} cores, "
          f"{info['cpu_model']}, {info['mem_gib']} GiB; devices: {', '.join(devices)}; "
          f"load average at start {info['load_avg_1_5_15'][0]:.1f}, at end "
          f"{info['load_avg_1_5_15_at_end'][0]:.1f}\n\n{text}\n")


def main(argv: Optional[list[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.worker:
    records.print_records(jobs.run_job(json.loads(args.worker)))
    return 0
  p = _plan(args)
  try:
    job_list = plan.make_jobs(p, tuple(x for x in args.only.split(",") if x), args.quick)
  except ValueError as e:
    parser.error(str(e))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  info = records.machine_info()
  command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
  print(f"# {command}\n# {json.dumps(info)}", flush=True)
  jsonl, t0 = out / "results.jsonl", time.perf_counter()
  with open(jsonl, "w") as f:
    f.write(json.dumps(dict(name="machine", impl="-", config=info, command=command)) + "\n")
    recs = _run_jobs(job_list, p, f, t0)
  derived = derive.derive(recs)
  info.update(load_avg_1_5_15_at_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
  # Rewritten whole: derive() filled fraction-of-peak and sweep ratios into the records.
  with open(jsonl, "w") as f:
    for r in [dict(name="machine", impl="-", config=info, command=command)] + recs + derived:
      f.write(json.dumps(r) + "\n")
  table = _table(command, info, recs, derived)
  (out / "table.md").write_text(table)
  print(table)
  print(f"# wrote {jsonl} and {out / 'table.md'} in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
