"""Fine-tuning several tasks at once: one step vmapped over a leading task axis of the trainable
state, optimizer state and batch (the frozen backbone shared), against a loop of jitted
single-task steps. One round of each in turn, then one profiled round of each."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import profiling, timing
from benchmarks.configs import StepConfig
from benchmarks.jax_runner import OursStep, make_batch, ours_step


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _loop(s: OursStep, batch: dict, keys: jax.Array, n_jobs: int):
  """``(run, hlo)``: one jitted single-task step called once per task."""
  jstep = jax.jit(s.train_step, donate_argnums=(0, 2))
  per_task = [{"t": _copy(s.trainable), "o": _copy(s.opt_state)} for _ in range(n_jobs)]
  task_batch = lambda j: jax.tree.map(lambda x: x[j], batch)  # noqa: E731

  def run(i):
    losses = []
    for j, st in enumerate(per_task):
      st["t"], st["o"], metrics = jstep(st["t"], s.frozen, st["o"], task_batch(j),
                                        jax.random.fold_in(keys[j], i))
      losses.append(metrics["loss"])
    jax.block_until_ready((losses, [st["t"] for st in per_task]))

  st = per_task[0]
  hlo = lambda: jstep.lower(st["t"], s.frozen, st["o"], task_batch(0),  # noqa: E731
                            keys[0]).compile().as_text()
  return run, hlo


def _vmapped(s: OursStep, batch: dict, keys: jax.Array, n_jobs: int):
  """``(run, hlo)``: the same step vmapped over the task axis; the backbone shared."""
  stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n_jobs), tree)  # noqa: E731
  vstep = jax.jit(jax.vmap(s.train_step, in_axes=(0, None, 0, 0, 0)), donate_argnums=(0, 2))
  state = {"t": stack(s.trainable), "o": stack(s.opt_state)}

  def run(i):
    ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
    state["t"], state["o"], metrics = vstep(state["t"], s.frozen, state["o"], batch, ks)
    jax.block_until_ready((state["t"], state["o"], metrics))

  hlo = lambda: vstep.lower(state["t"], s.frozen, state["o"], batch,  # noqa: E731
                            keys).compile().as_text()
  return run, hlo


PROFILE_FIELDS = ("step_s", "categories", "matmul_flops", "matmul_flops_per_s", "matmul_share",
                  "minor_faults", "kernel_cpu_s", "user_cpu_s")


def measure_vmap(cfg: StepConfig, n_jobs: int, rounds: int, budget_s: float) -> list[dict]:
  """Step times (and one profiled round) of the loop and the vmapped variant, in turn."""
  cfg = dataclasses.replace(cfg, n_tasks=1, single_task=True)
  s = ours_step(cfg)
  batch = make_batch(cfg, 1, lead=(n_jobs,))
  keys = jax.random.split(jax.random.key(0), n_jobs)
  variants = {"loop": _loop(s, batch, keys, n_jobs), "vmap": _vmapped(s, batch, keys, n_jobs)}
  times, cpu_times, firsts = timing.in_turn([run for run, _ in variants.values()], rounds,
                                            budget_s=budget_s)
  out: list[dict[str, Any]] = []
  for (name, (run, hlo)), ts, cpu, first in zip(variants.items(), times, cpu_times, firsts):
    prof = profiling.xla_profile(run, hlo(), 1)
    out.append({"variant": name, "times": ts, "cpu_times": cpu, "first_step_s": first,
                "profile": {k: prof[k] for k in PROFILE_FIELDS}})
  return out
