"""Ratios derived from the measured medians, each from records taken in a comparable way.

``derive(records)`` fills ``frac_of_peak`` (step records) and ``matmul_frac_of_peak`` (profiles)
and the sweep ratios in place, and returns new ratio records, one family per function below.
"""

from __future__ import annotations

from typing import Any, Optional

Record = dict[str, Any]


def _key(rec: Record, *fields) -> tuple:
  return tuple(rec["config"].get(f) for f in fields)


def _ratio(name: str, impl: str, config: dict, num: Record, den: Record, what: str,
           of: Optional[Record] = None) -> Record:
  """A ratio record: ``num``'s median / ``den``'s median, reported with ``of``'s figures."""
  of = of if of is not None else num
  rec = dict(name=name, impl=impl, config=config, median_s=of["median_s"],
             tokens_per_s=of["tokens_per_s"], ratio=num["median_s"] / den["median_s"], what=what)
  if num.get("median_cpu_s") and den.get("median_cpu_s"):
    rec["cpu_ratio"] = num["median_cpu_s"] / den["median_cpu_s"]  # the same of CPU times
  return rec


def fill_fraction_of_peak(ok: list[Record]) -> None:
  """The machine's peak is the better of XLA's and torch's best float32 matmul rate."""
  peaks = [r["flops_per_s"] for r in ok if r["name"] == "peak_matmul"]
  if not peaks:
    return
  peak = max(peaks)
  for r in ok:
    if r["name"] in ("step", "in_turn_step", "versus_step", "routing_step"):
      r["frac_of_peak"] = r["flops_per_s"] / peak
    if r["name"] == "profile" and r.get("matmul_flops_per_s"):
      r["matmul_frac_of_peak"] = r["matmul_flops_per_s"] / peak


def separate_processes(ok: list[Record]) -> list[Record]:
  """``step`` records: ours / PEFT speed and memory, MHR over LoRA and no adapter."""
  by = {(r["impl"],) + _key(r, "shape", "label"): r for r in ok if r["name"] == "step"}
  out = []
  for (impl, shape, label), r in sorted(by.items()):
    p = by.get(("peft", shape, label))
    if impl == "ours" and p is not None:
      config = dict(shape=shape, label=label)
      out.append(_ratio("speedup_vs_peft", "ours/peft", config, p, r,
                        "ours tokens/s / PEFT tokens/s (= PEFT median / ours median)", of=r))
      out.append(dict(name="memory_vs_peft", impl="ours/peft", config=dict(config),
                      ours_peak_rss_mb=r["peak_rss_mb"], peft_peak_rss_mb=p["peak_rss_mb"],
                      ratio=r["peak_rss_mb"] / p["peak_rss_mb"],
                      what="ours peak RSS / PEFT peak RSS (separate processes)"))
    if label.startswith("mhr"):
      for ref in ("lora_r" + str(r["config"]["rank"]), "none"):
        d = by.get((impl, shape, ref))
        if d is not None:
          out.append(_ratio("routing_overhead", impl, dict(shape=shape, label=label, versus=ref),
                            r, d, f"MHR step time / {ref} step time"))
  return out


def side_by_side(ok: list[Record]) -> list[Record]:
  """``versus_step`` records: PEFT median / ours median, steps taken in turn."""
  vs = {(r["impl"],) + _key(r, "shape", "label"): r for r in ok if r["name"] == "versus_step"}
  return [_ratio("speedup_vs_peft_side_by_side", "ours/peft", dict(shape=shape, label=label),
                 vs[("peft", shape, label)], r,
                 "PEFT median / ours median, steps taken in turn in one process", of=r)
          for (impl, shape, label), r in sorted(vs.items())
          if impl == "ours" and ("peft", shape, label) in vs]


def routing(ok: list[Record]) -> list[Record]:
  """``routing_step`` records (one process per shape and rank): each routed or LoRA step over
  the no-adapter step of the same implementation, each routed step over its LoRA step (of
  the rank), and PEFT's median over ours."""
  rs = [r for r in ok if r["name"] == "routing_step"]
  by = {(r["impl"],) + _key(r, "shape", "rank", "label", "batch"): r for r in rs}
  out = []
  for (impl, shape, rank, label, batch), r in sorted(by.items(), key=str):
    if label == "none":
      continue
    config = dict(shape=shape, rank=rank, label=label, batch=batch)
    for name, base in (("routed_over_none", "none"), ("routed_over_lora", f"lora_r{rank}")):
      den = next((d for (i, s, k, lab, _), d in by.items()
                  if (i, s, k, lab) == (impl, shape, rank, base)), None)
      if den is not None and label != base:
        out.append(_ratio(name, impl, dict(config), r, den,
                          f"{label} step time / {base} step time, in turn"))
    p = by.get(("peft", shape, rank, label, batch))
    if impl == "ours" and p is not None:
      out.append(_ratio("routed_vs_peft", "ours/peft", dict(config), p, r,
                        "PEFT median / ours median, in turn", of=r))
  return out


def in_turn_overhead(ok: list[Record]) -> list[Record]:
  """``in_turn_step`` records: routed step time over LoRA and no adapter."""
  inter = {_key(r, "shape", "label"): r for r in ok if r["name"] == "in_turn_step"}
  out = []
  for (shape, label), m in sorted(inter.items()):
    if not label.startswith(("mhr", "poly")):
      continue
    for ref in ("lora_r" + str(m["config"]["rank"]), "none"):
      d = inter.get((shape, ref))
      if d is not None:
        out.append(_ratio("routing_overhead_in_turn", "ours", dict(shape=shape, label=label,
                                                                   versus=ref), m, d,
                          f"{label} step time / {ref} step time, steps taken in turn"))
  return out


SWEEPS = ("n_skills", "n_splits", "n_tasks", "n_tasks_dense", "n_tasks_rows")


def fill_sweep_ratios(ok: list[Record]) -> None:
  """Each point of a scaling axis over the axis' first point (mixed-task batches)."""
  scaling = [r for r in ok if r["name"] == "scaling"]
  for axis in SWEEPS:
    rows = [r for r in scaling if r["config"]["sweep"] == axis and not r["config"]["single_task"]]
    if not rows:
      continue
    first = rows[0]
    field = axis if axis in first["config"] else "n_tasks"
    for r in rows:
      r["ratio"] = r["median_s"] / first["median_s"]
      r["what"] = f"step time / step time at {field}={first['config'][field]}"


def mixed_vs_single(ok: list[Record]) -> list[Record]:
  """The n_tasks axis' points on mixed-task against single-task batches."""
  pts = [r for r in ok if r["name"] == "scaling" and r["config"]["sweep"] == "n_tasks"]
  out = []
  for s in (r for r in pts if r["config"]["single_task"]):
    m = next((r for r in pts if not r["config"]["single_task"]
              and r["config"]["n_tasks"] == s["config"]["n_tasks"]), None)
    if m is not None:
      out.append(_ratio("mixed_vs_single_task", "ours", dict(
          shape=s["config"]["shape"], n_tasks=s["config"]["n_tasks"]), m, s,
          "mixed-task batch step time / single-task batch step time"))
  return out


def vmap_speedup(ok: list[Record]) -> list[Record]:
  loop = next((r for r in ok if r["name"] == "finetune_loop"), None)
  vm = next((r for r in ok if r["name"] == "finetune_vmap"), None)
  if not (loop and vm):
    return []
  return [_ratio("vmap_speedup", "ours", dict(shape=vm["config"]["shape"],
                                              n_jobs=vm["config"]["n_jobs"]), loop, vm,
                 "separate steps' time / one vmapped step's time", of=vm)]


def derive(records: list[Record]) -> list[Record]:
  """Ratio records computed from the measured medians (see the module docstring)."""
  ok = [r for r in records if "error" not in r]
  fill_fraction_of_peak(ok)
  fill_sweep_ratios(ok)
  return (separate_processes(ok) + side_by_side(ok) + routing(ok) + in_turn_overhead(ok)
          + mixed_vs_single(ok) + vmap_speedup(ok))
