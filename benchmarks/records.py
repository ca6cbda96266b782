"""Result records: one JSON object per measurement, the machine record, and the worker protocol
(each job runs in a fresh Python process and prints its records on lines with a prefix)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.configs import StepConfig
from benchmarks.flops import step_flops

RESULT_PREFIX = "BENCH_RESULT "
REPO = pathlib.Path(__file__).resolve().parents[1]
Record = dict[str, Any]


def step_record(name: str, impl: str, cfg: StepConfig, res: dict[str, Any]) -> Record:
  """A step-time record from measured ``res["times"]``: median, tokens/s, model FLOP rate."""
  med = statistics.median(res["times"])
  flops = step_flops(cfg)["step"]
  rec = dict(name=name, impl=impl, config=cfg.record(), median_s=med,
             tokens_per_s=cfg.tokens / med, model_flops=flops, flops_per_s=flops / med,
             times=res["times"], first_step_s=res.get("first_step_s"))
  if "cpu_times" in res:  # steps taken in turn: each step's process CPU time too
    rec["cpu_times"] = res["cpu_times"]
    rec["median_cpu_s"] = statistics.median(res["cpu_times"])
  if "n_trainable" in res:
    rec["n_trainable"] = res["n_trainable"]
  return rec


def error_record(job: dict[str, Any], error: str) -> Record:
  return dict(name=job["kind"], impl=job["impl"], config=job.get("config", {}), error=error)


def _cpu() -> dict[str, Any]:
  """CPU model and instruction-set flags (``/proc/cpuinfo``, as ``lscpu`` shows them)."""
  info = {"model": platform.processor() or "unknown", "flags": ""}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          info["model"] = value.strip()
        elif key.strip() == "flags":
          info["flags"] = value.strip()
          break
  except OSError:
    pass
  return info


def _mem_gib() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      return round(int(f.readline().split()[1]) / 2 ** 20, 1)
  except OSError:
    return None


def machine_info() -> dict[str, Any]:
  """The machine the run measured: cores, CPU model and flags, memory, load, library versions.

  The accelerator each step ran on is in every record (``device``), from the worker itself: the
  parent never starts a JAX backend, so that it holds no accelerator memory.
  """
  versions = {}
  for mod in ("jax", "flax", "optax", "torch", "transformers", "peft"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing optional library is reported as absent
      versions[mod] = None
  env = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS",
                                    "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES") if k in os.environ}
  cpu = _cpu()
  return dict(nproc=os.cpu_count(), load_avg_1_5_15=os.getloadavg(), cpu_model=cpu["model"],
              cpu_flags=cpu["flags"], mem_gib=_mem_gib(), env=env,
              platform=platform.platform(), python=platform.python_version(), versions=versions,
              date=datetime.datetime.now().isoformat(timespec="seconds"))


def run_subprocess(job: dict[str, Any], timeout_s: float, xla_flags: str = "") -> list[Record]:
  """Runs ``job`` in a fresh Python process; returns its records or one error record."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
  # On a GPU, JAX would otherwise take 75% of its memory up front, leaving none to torch.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + env.get("PYTHONPATH", "").split(os.pathsep))
  cmd = [sys.executable, "-m", "benchmarks", "--worker", json.dumps(job)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return [error_record(job, f"timed out after {timeout_s:.0f} s")]
  records = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not records:
    tail = (proc.stderr or proc.stdout)[-2000:]
    return [error_record(job, f"exit {proc.returncode}: {tail}")]
  for r in records:
    r["process_wall_s"] = time.perf_counter() - t0
  return records


def print_records(records: list[Record]) -> None:
  """The worker's side of the protocol."""
  for rec in records:
    print(RESULT_PREFIX + json.dumps(rec), flush=True)
