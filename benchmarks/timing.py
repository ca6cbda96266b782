"""Timing loops and peak memory, for any step function ``run(i)`` that takes step ``i`` and waits
for it (``jax.block_until_ready``, or a synchronous torch step)."""

from __future__ import annotations

import resource
import time
from typing import Callable, Sequence

Run = Callable[[int], None]


def peak_rss_mb() -> float:
  """Peak resident set size of this process (VmHWM) in MiB."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(run: Run, i: int) -> float:
  """Seconds ``run(i)`` takes."""
  t = time.perf_counter()
  run(i)
  return time.perf_counter() - t


def time_steps(run: Run, steps: int, warmup: int, budget_s: float) -> tuple[list[float], float]:
  """Runs ``warmup`` untimed steps (the first compiles), then times up to ``steps`` steps.

  Stops early (after at least 3 timed steps) when ``budget_s`` is spent. Returns the step times
  and the time of the first (compiling) step.
  """
  first = timed(run, 0)
  for i in range(1, warmup):
    run(i)
  start = time.perf_counter()
  times = []
  for i in range(steps):
    times.append(timed(run, warmup + i))
    if len(times) >= 3 and time.perf_counter() - start > budget_s:
      break
  return times, first


def in_turn(runs: Sequence[Run], rounds: int, warmup_rounds: int = 1,
            budget_s: float = float("inf")) -> tuple[list[list[float]], list[list[float]],
                                                     list[float]]:
  """Step times of several step functions in one process, one step of each in turn.

  Every function then sees the same machine load (a shared machine's speed moves by 2x within
  minutes), which is what ratios of step times need. Each step's process CPU time is taken
  too: on a loaded machine a single-threaded step's CPU time stays close to its unloaded wall
  time while its wall time does not. The first call of each (compilation) is timed apart, then
  ``warmup_rounds`` untimed rounds; stops after at least 3 timed rounds once ``budget_s`` is
  spent. Returns the wall and CPU step times of each function and their first-call times.
  """
  firsts = [timed(run, 0) for run in runs]
  for i in range(warmup_rounds):
    for run in runs:
      run(1 + i)
  times: list[list[float]] = [[] for _ in runs]
  cpu_times: list[list[float]] = [[] for _ in runs]
  start = time.perf_counter()
  for i in range(rounds):
    for j, run in enumerate(runs):
      cpu = time.process_time()
      times[j].append(timed(run, 1 + warmup_rounds + i))
      cpu_times[j].append(time.process_time() - cpu)
    if i >= 2 and time.perf_counter() - start > budget_s:
      break
  return times, cpu_times, firsts
