"""Page faults and kernel CPU time of the small2 MHR train step: 8 single-task steps in a loop.

Run it twice, plain and with transparent huge pages for malloc, and compare:

  PYTHONPATH=. python docs/bench/page_faults.py
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 PYTHONPATH=. python docs/bench/page_faults.py

Prints the median over 4 rounds of wall time, minor page faults, and kernel and user CPU seconds.
"""

import os
import resource
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mhr_jax import bench  # noqa: E402


def main():
  cfg = bench.StepConfig(shape="small2", method="mhr", n_tasks=1, single_task=True)
  model, tfilter, _ = bench.build_ours(cfg)
  step, trainable, frozen, opt_state = bench.make_train_step(model, tfilter)
  inputs, targets, task_ids = (jnp.asarray(x) for x in bench.make_batch_np(cfg, 1, lead=(8,)))
  jstep = jax.jit(step, donate_argnums=(0, 1))
  states = [{"t": jax.tree.map(jnp.copy, trainable), "o": jax.tree.map(jnp.copy, opt_state)}
            for _ in range(8)]
  key = jax.random.key(0)

  def round_():
    for j, st in enumerate(states):
      st["t"], st["o"], _ = jstep(st["t"], st["o"], frozen, inputs[j], targets[j], task_ids[j],
                                  key)
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
