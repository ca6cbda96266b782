"""Page faults and kernel CPU time of the small2 MHR train step: 8 single-task steps in a loop.

Run it twice, plain and with transparent huge pages for malloc, and compare:

  python docs/bench/page_faults.py
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python docs/bench/page_faults.py

Prints the median over 4 rounds of wall time, minor page faults, and kernel and user CPU seconds.
"""

import os
import pathlib
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.configs import StepConfig  # noqa: E402
from benchmarks.jax_runner import make_batch, ours_step  # noqa: E402


def main():
  cfg = StepConfig(shape="small2", method="mhr", n_tasks=1, single_task=True)
  s = ours_step(cfg)
  batch = make_batch(cfg, 1, lead=(8,))
  jstep = jax.jit(s.train_step, donate_argnums=(0, 2))
  states = [{"t": jax.tree.map(jnp.copy, s.trainable), "o": jax.tree.map(jnp.copy, s.opt_state)}
            for _ in range(8)]
  key = jax.random.key(0)

  def round_():
    for j, st in enumerate(states):
      task_batch = jax.tree.map(lambda x, j=j: x[j], batch)
      st["t"], st["o"], _ = jstep(st["t"], s.frozen, st["o"], task_batch, key)
    jax.block_until_ready([st["t"] for st in states])

  round_()
  round_()
  rows = []
  for _ in range(4):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    round_()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    rows.append((wall, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime,
                 r1.ru_utime - r0.ru_utime))
  med = [statistics.median(r[i] for r in rows) for i in range(4)]
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}: 8 steps wall {med[0]:.3f} s, "
        f"minor faults {med[1]:.0f}, kernel CPU {med[2]:.3f} s, user CPU {med[3]:.3f} s")


if __name__ == "__main__":
  main()
