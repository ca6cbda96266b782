"""bfloat16 on the CPU: XLA:CPU's and PyTorch's matmul rates and train steps, side by side.

    python -m benchmarks.bf16_cpu [--sizes 1024,2048] [--shape small] [--rounds 5] [--quick]

Everything runs in one process pinned to one core (``eval_speed.pin_to_one_core``), the
candidates of each part called in turn, round after round (``eval_speed.interleave`` and
``timing.in_turn``), so a machine shared with other work slows all alike. Three parts:

  matmul   (n x n) @ (n x n) per size: XLA with each XLA:CPU setting of ``SETTINGS`` (passed as
           per-executable compiler options, so all coexist in one process) on each operand form
           of ``FORMS``, and torch's ``mm`` in float32 and bfloat16. GFLOP/s of the best round,
           and which kernel library XLA's compiled dot went to (``dot_library``).
  step     the small T5 with Poly (K = 8, S = 1) or MHR (K = 8, S = 8) adapters, rank 1, on
           q, k, v, o (``benchmarks.configs``): ours in float32, in bfloat16 with float32
           accumulation (``T5Config.f32_accumulation``, the default) and with bfloat16-output
           dots, and PEFT in float32 and under ``torch.autocast('cpu', torch.bfloat16)``.
  exact    per framework, the bfloat16 step's loss and trainable-parameter gradient against its
           own float32 step at the same weights and batch (relative L2 error, cosine), and the
           losses of a few optimizer steps (no routing noise: the runs differ only by dtype);
           Poly only by default (``--exact_methods``), as each variant compiles once more.

Writes ``<out>/bf16_cpu.jsonl`` (a header with the command, date, CPU model and flags, load
and versions, then one record per figure) and ``<out>/bf16_cpu.md`` (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any, Callable, Optional

from benchmarks import eval_speed

# XLA:CPU settings (DebugOptions fields of jaxlib 0.10) tried on every matmul. The dot goes to
# YNNPACK by default; an empty YNN fusion list leaves it to XLA's own (Eigen) dot, where the
# oneDNN and XNNPACK fusion lists then apply.
_YNN, _ONEDNN, _XNN = (f"xla_cpu_experimental_{lib}_fusion_type"
                       for lib in ("ynn", "onednn", "xnn"))
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "eigen": {_YNN: ""},
    "onednn": {_YNN: "", _ONEDNN: "LIBRARY_FUSION_TYPE_DOT"},
    "xnnpack": {_YNN: "", _XNN: "LIBRARY_FUSION_TYPE_DOT"},
    "use_onednn": {"xla_cpu_use_onednn": True},
    "fast_math": {"xla_cpu_enable_fast_math": True},
}
# Operand forms: (operand dtype, dot keyword arguments).
FORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "f32": ("float32", {}),
    "bf16_out_bf16": ("bfloat16", {}),  # jnp.dot's default: the result in the operands' dtype
    "bf16_out_f32": ("bfloat16", {"preferred_element_type": "float32"}),
    "f32_algo_bf16": ("float32", {"precision": "BF16_BF16_F32"}),  # a dot algorithm preset
}


def _library(hlo: str) -> str:
  """The kernel library of the compiled dot: ynnpack, onednn, xnnpack or eigen (XLA's own)."""
  for name, marker in (("ynnpack", "ynn_fusion"), ("onednn", "onednn"), ("xnnpack", "xnn_fusion")):
    if marker in hlo:
      return name
  return "eigen"


def jax_matmuls(n: int, settings: tuple[str, ...] = tuple(SETTINGS),
                forms: tuple[str, ...] = tuple(FORMS)
                ) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, Any]]]:
  """Every (setting, form) matmul as a no-argument call, and its description (or why it did not
  compile)."""
  import jax  # noqa: PLC0415 - after the affinity is set
  import jax.numpy as jnp  # noqa: PLC0415
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  fns, info = {}, {}
  for form in forms:
    dtype, kw = FORMS[form]
    x, y = a.astype(dtype), b.astype(dtype)
    kw = dict(kw)
    if "precision" in kw:
      kw["precision"] = getattr(jax.lax.DotAlgorithmPreset, kw["precision"])
    if "preferred_element_type" in kw:
      kw["preferred_element_type"] = jnp.dtype(kw["preferred_element_type"])
    dot = jax.jit(lambda x, y, kw=kw: jnp.dot(x, y, **kw))
    for setting in settings:
      options = SETTINGS[setting]
      key = f"xla/{setting}/{form}"
      try:
        compiled = dot.lower(x, y).compile(compiler_options=options)
      except Exception as e:  # noqa: BLE001 - an unsupported setting is a finding, not a crash
        info[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        continue
      fns[key] = lambda c=compiled, x=x, y=y: jax.block_until_ready(c(x, y))
      info[key] = {"dot_library": _library(compiled.as_text())}
  return fns, info


def torch_matmuls(n: int) -> dict[str, Callable[[], Any]]:
  """torch's ``mm`` on float32 and on bfloat16 tensors (what autocast runs a linear layer as)."""
  import torch  # noqa: PLC0415
  a, b = torch.randn(n, n), torch.randn(n, n)
  a16, b16 = a.bfloat16(), b.bfloat16()
  return {"torch/f32": lambda: torch.mm(a, b), "torch/bf16": lambda: torch.mm(a16, b16)}


def measure_matmuls(sizes: list[int], rounds: int, settings: tuple[str, ...] = tuple(SETTINGS),
                    forms: tuple[str, ...] = tuple(FORMS)) -> list[dict[str, Any]]:
  """GFLOP/s of every matmul candidate at each size, all called in turn."""
  records = []
  for n in sizes:
    fns, info = jax_matmuls(n, settings, forms)
    fns.update(torch_matmuls(n))
    times = eval_speed.interleave(fns, rounds)
    for key in info.keys() | fns.keys():
      rec: dict[str, Any] = {"part": "matmul", "n": n, "candidate": key, **info.get(key, {})}
      if key in times:
        rec.update(best_s=min(times[key]), gflops_best=2 * n ** 3 / min(times[key]) / 1e9,
                   gflops_median=2 * n ** 3 / eval_speed.median(times[key]) / 1e9)
      records.append(rec)
  return sorted(records, key=lambda r: (r["n"], r["candidate"]))


@dataclasses.dataclass(frozen=True)
class Variant:
  """One train-step variant: the implementation and the step configuration's dtype fields."""

  impl: str  # ours / peft
  dtype: str = "float32"
  f32_accumulation: bool = True

  @property
  def name(self) -> str:
    acc = "" if self.dtype == "float32" or self.impl == "peft" else (
        "_acc32" if self.f32_accumulation else "_out16")
    return f"{self.impl}_{'bf16' if self.dtype == 'bfloat16' else 'f32'}{acc}"


VARIANTS = (Variant("ours"), Variant("ours", "bfloat16"), Variant("ours", "bfloat16", False),
            Variant("peft"), Variant("peft", "bfloat16"))


def step_configs(shape: str, quick: bool, methods: tuple[str, ...] = ("poly", "mhr")):
  """Poly (S = 1) and MHR (S = 8) step configurations (T0's rank 1) at ``shape``, float32."""
  from benchmarks.configs import StepConfig  # noqa: PLC0415
  from mhr_jax import modes  # noqa: PLC0415
  size = dict(batch=2, in_len=16, tgt_len=8) if quick else dict(batch=8, in_len=128, tgt_len=32)
  return [StepConfig(shape=shape, method=m, n_splits=1 if modes.get_mode(m).single_split else 8,
                     rank=1, n_tasks=8, **size) for m in methods]


def measure_steps(shape: str, rounds: int, quick: bool,
                  methods: tuple[str, ...] = ("poly", "mhr")) -> list[dict[str, Any]]:
  """Step times of every variant of each configuration, in turn (``timing.in_turn``)."""
  from benchmarks import jax_runner, timing, torch_runner  # noqa: PLC0415
  records = []
  for base in step_configs(shape, quick, methods):
    caches: dict[str, dict] = {"ours": {}, "peft": {}}
    runs = []
    for v in VARIANTS:
      cfg = dataclasses.replace(base, dtype=v.dtype, f32_accumulation=v.f32_accumulation)
      runs.append(jax_runner.ours_runner(cfg, backbone=caches["ours"])[0] if v.impl == "ours"
                  else torch_runner.peft_runner(cfg, backbone=caches["peft"])[0])
    times, cpu, firsts = timing.in_turn(runs, rounds, warmup_rounds=1)
    for v, ts, cs, first in zip(VARIANTS, times, cpu, firsts):
      records.append({"part": "step", "config": base.label(), "variant": v.name,
                      "median_s": eval_speed.median(ts), "cpu_median_s": eval_speed.median(cs),
                      "first_s": first, "times": ts,
                      "tokens_per_s": base.tokens / eval_speed.median(ts)})
  return records


def _compare(g: Any, ref: Any) -> dict[str, float]:
  """Relative L2 error and cosine of a flat gradient against the float32 one."""
  import numpy as np  # noqa: PLC0415
  g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
  norm = float(np.linalg.norm(ref))
  return {"grad_rel_l2": float(np.linalg.norm(g - ref)) / norm,
          "grad_cosine": float(g @ ref) / (float(np.linalg.norm(g)) * norm)}


def ours_exactness(cfg, n_steps: int) -> list[dict[str, Any]]:
  """Ours: each variant's losses over ``n_steps`` AdamW steps from one init (the loss before
  each update), then every variant's loss and gradient at the float32 run's end state. One
  compiled gradient per variant; the update (optax AdamW, as ``jax_runner``'s) runs eagerly."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from benchmarks import jax_runner  # noqa: PLC0415
  from mhr_jax import models, steps  # noqa: PLC0415
  out, state, grads = [], None, {}
  variants = [v for v in VARIANTS if v.impl == "ours"]
  for v in variants:
    c = dataclasses.replace(cfg, dtype=v.dtype, f32_accumulation=v.f32_accumulation,
                            routing_noise=False)
    graphdef, trainable, frozen = steps.split_model(*jax_runner.build_ours(c))
    batch = jax_runner.make_batch(c)

    def loss(t, graphdef=graphdef, frozen=frozen, batch=batch):
      m = nnx.merge(graphdef, t, frozen, copy=True)
      return models.loss_fn(m, batch, deterministic=True)[0]

    grad_fn = jax.jit(jax.value_and_grad(loss))
    tx = optax.adamw(1e-3, weight_decay=0.01)
    t, opt, losses = trainable, tx.init(trainable), []
    for _ in range(n_steps):
      value, g = grad_fn(t)
      losses.append(float(value))
      updates, opt = tx.update(g, opt, t)
      t = optax.apply_updates(t, updates)
    state = t if state is None else state  # float32 comes first: grads are taken at its end
    value, g = grad_fn(state)
    grads[v.name] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    out.append({"part": "exact", "config": cfg.label(), "variant": v.name, "losses": losses,
                "loss_at_ref": float(value)})
  for rec in out:
    rec.update(_compare(grads[rec["variant"]], grads[variants[0].name]))
  return out


def peft_exactness(cfg, n_steps: int) -> list[dict[str, Any]]:
  """PEFT: float32 and autocast-bfloat16 losses over ``n_steps`` steps from one init (eval
  mode: no routing noise), then both losses and gradients at the float32 run's end state."""
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from benchmarks import torch_runner  # noqa: PLC0415
  from benchmarks.configs import make_batch_np  # noqa: PLC0415
  inputs, targets, task_ids = (torch.from_numpy(x).long() for x in make_batch_np(cfg))
  out, ref_model = [], None
  for v in (v for v in VARIANTS if v.impl == "peft"):
    model, params = torch_runner.build_peft(cfg)
    model.eval()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    bf16 = v.dtype == "bfloat16"

    def loss_of(m, bf16=bf16):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return m(input_ids=inputs, labels=targets, task_ids=task_ids).loss

    losses = []
    for _ in range(n_steps):
      loss = loss_of(model)
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      losses.append(float(loss))
    ref_model = ref_model or model  # float32 comes first
    value = loss_of(ref_model)
    value.backward()
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    grad = np.concatenate([p.grad.double().numpy().ravel() for p in ref_params])
    ref_model.zero_grad(set_to_none=True)
    out.append({"part": "exact", "config": cfg.label(), "variant": v.name, "losses": losses,
                "loss_at_ref": float(value), "grad": grad})
  for rec in out:
    rec.update(_compare(rec["grad"], out[0]["grad"]))
  for rec in out:
    del rec["grad"]
  return out


def tables(records: list[dict[str, Any]]) -> str:
  """The matmul, step and exactness tables in Markdown."""
  fmt = eval_speed.fmt
  lines = ["| matmul | n | GFLOP/s (best) | GFLOP/s (median) | XLA's dot library |",
           "|---|---|---|---|---|"]
  for r in (r for r in records if r["part"] == "matmul"):
    lib = r.get("dot_library", "-") if "error" not in r else "did not compile"
    lines.append(f"| {r['candidate']} | {r['n']} | {fmt(r.get('gflops_best'))} | "
                 f"{fmt(r.get('gflops_median'))} | {lib} |")
  steps = [r for r in records if r["part"] == "step"]
  lines += ["", "| step | variant | median s | CPU s | tokens/s | over ours_f32 | over peft_bf16 |",
            "|---|---|---|---|---|---|---|"]
  for r in steps:
    same = {s["variant"]: s["median_s"] for s in steps if s["config"] == r["config"]}
    lines.append(f"| {r['config']} | {r['variant']} | {fmt(r['median_s'])} | "
                 f"{fmt(r['cpu_median_s'])} | {fmt(r['tokens_per_s'])} | "
                 f"{fmt(same['ours_f32'] / r['median_s'])}x | "
                 f"{fmt(same['peft_bf16'] / r['median_s'])}x |")
  lines += ["", "| exactness | variant | losses over the steps | loss at the f32 state | "
            "gradient rel. L2 error vs f32 | cosine |", "|---|---|---|---|---|---|"]
  for r in (r for r in records if r["part"] == "exact"):
    losses = ", ".join(f"{x:.5f}" for x in r["losses"])
    lines.append(f"| {r['config']} | {r['variant']} | {losses} | {r['loss_at_ref']:.5f} | "
                 f"{r['grad_rel_l2']:.2e} | {r['grad_cosine']:.6f} |")
  return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_cpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="1024,2048", help="comma-separated matmul sizes n")
  parser.add_argument("--shape", default="small", help="the T5 shape of the steps")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each part")
  parser.add_argument("--exact_steps", type=int, default=5, help="optimizer steps compared")
  parser.add_argument("--parts", default="matmul,step,exact", help="a subset of the parts")
  parser.add_argument("--methods", default="poly,mhr", help="the steps' adapters (poly, mhr)")
  parser.add_argument("--exact_methods", default="poly", help="the adapters of 'exact'")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes and sizes (a smoke test; the figures mean nothing)")
  parser.add_argument("--core", type=int, default=0, help="the one core everything runs on")
  parser.add_argument("--out", default="docs/bench/bf16_cpu")
  parser.add_argument("--name", default="bf16_cpu", help="the record files' name in --out")
  args = parser.parse_args(argv)
  eval_speed.pin_to_one_core(args.core)
  parts = set(args.parts.split(","))
  unknown = parts - {"matmul", "step", "exact"}
  if unknown:
    parser.error(f"unknown parts {sorted(unknown)}; known: matmul, step, exact")
  shape = "tiny" if args.quick else args.shape
  records: list[dict[str, Any]] = []
  if "matmul" in parts:
    sizes = [64] if args.quick else [int(n) for n in args.sizes.split(",")]
    records += measure_matmuls(sizes, args.rounds)
  if "step" in parts:
    records += measure_steps(shape, args.rounds, args.quick, tuple(args.methods.split(",")))
  if "exact" in parts:
    for cfg in step_configs(shape, args.quick, tuple(args.exact_methods.split(","))):
      records += ours_exactness(cfg, args.exact_steps) + peft_exactness(cfg, args.exact_steps)
  table = tables(records)
  eval_speed.write_records(pathlib.Path(args.out), args.name, records, table, module="bf16_cpu")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
