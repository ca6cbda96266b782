"""Where a routed step's extra time goes: our train step's ops by category and by source op,
each adapter set-up against the first (no adapter), from a ``jax.profiler`` trace.

  python docs/bench/adapter_ops.py [SHAPE] [LABELS] [STEPS] [RANK]
      # defaults: small none,lora,mhr_ft,mhr_pre 3 8

Labels: ``none``; ``lora``; ``mhr_pre`` / ``poly_pre`` (mixed-task batch, routing noise on, as
pre-training); ``mhr_ft`` / ``poly_ft`` (one task, no noise, declared single-task as the
trainer's fine-tuning runs). MHR has S = 8, both K = 8, adapters on attention q, k, v, o
(``benchmarks.configs.StepConfig``). Prints, per label, wall and process CPU seconds per step
and seconds per op category; then, per label after the first, the 15 source ops (the jitted
program's ``op_name`` metadata) that add the most time over the first label.
"""

import collections
import glob
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402

from benchmarks import jax_runner, profiling  # noqa: E402
from benchmarks.configs import StepConfig  # noqa: E402

SETUPS = {
    "none": dict(method="none"),
    "lora": dict(method="lora"),
    "mhr_pre": dict(method="mhr", n_splits=8),
    "mhr_ft": dict(method="mhr", n_splits=8, single_task=True, routing_noise=False),
    "poly_pre": dict(method="poly", n_splits=1),
    "poly_ft": dict(method="poly", n_splits=1, single_task=True, routing_noise=False),
}


def profile(cfg: StepConfig, steps: int):
  """(wall s, CPU s, {category: s}, {(category, source op): s}) per step of our step."""
  run, _, compiled = jax_runner.ours_runner(cfg, compile_ahead=True)
  for i in range(2):  # warm-up
    run(i)
  ops = profiling.hlo_ops(compiled.as_text())
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    wall, usage = profiling._run_steps(run, steps)
    jax.profiler.stop_trace()
    trace = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
    parsed = profiling.parse_xspace(trace, ops)
  by_source = collections.Counter()
  for name, seconds in parsed["per_op"].items():
    source = ops.get(name, {}).get("source", "").replace("jit(train_step)/", "")[:70]
    by_source[(profiling._xla_category(name, ops.get(name)), source)] += seconds / steps
  cpu = usage["user_cpu_s"] + usage["kernel_cpu_s"]
  return wall, cpu, {c: s / steps for c, s in parsed["seconds"].items()}, by_source


def main(shape="small", labels="none,lora,mhr_ft,mhr_pre", steps="3", rank="8"):
  results = {}
  for label in labels.split(","):
    cfg = StepConfig(shape=shape, rank=int(rank), **SETUPS[label])
    wall, cpu, cats, by_source = profile(cfg, int(steps))
    print(f"== {label}: wall {wall:.3f} s, CPU {cpu:.3f} s; "
          + " ".join(f"{c}={s:.3f}" for c, s in sorted(cats.items())), flush=True)
    results[label] = by_source
  first, *rest = results
  for label in rest:
    extra = collections.Counter(results[label])
    extra.subtract(results[first])
    print(f"-- {label} minus {first}: the 15 source ops adding the most seconds per step")
    for (cat, source), seconds in sorted(extra.items(), key=lambda kv: -kv[1])[:15]:
      print(f"   {seconds:+.4f} {cat:14s} {source}")


if __name__ == "__main__":
  main(*sys.argv[1:])
