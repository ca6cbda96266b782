"""Markdown tables of a run's records."""

from __future__ import annotations

from typing import Any

from benchmarks.profiling import CATEGORIES

Record = dict[str, Any]
_CONFIG_EXTRAS = ("sweep", "n_tasks", "versus", "n_jobs", "variant", "batch")


def fmt(x, digits: int = 3) -> str:
  if x is None:
    return ""
  if isinstance(x, float):
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.{digits}g}"
  return str(x)


def _config_text(r: Record) -> str:
  c = r.get("config", {})
  if "label" not in c:
    return " ".join(f"{k}={v}" for k, v in c.items())
  extra = [f"{k}={c[k]}" for k in _CONFIG_EXTRAS
           if k in c and (k != "n_tasks" or r["name"] in ("scaling", "mixed_vs_single_task"))]
  if c.get("single_task") and "batch" not in c:
    extra.append("single-task batch")
  if "rank" in c and r["name"].startswith("rout"):
    extra.insert(0, f"r={c['rank']}")
  return " ".join([f"{c.get('shape')} {c['label']}"] + extra)


def _memory(r: Record) -> str:
  if "ours_peak_rss_mb" in r:
    return f"{r['ours_peak_rss_mb']:.0f} / {r['peft_peak_rss_mb']:.0f}"
  return fmt(r.get("peak_rss_mb"), 4)


def markdown_table(records: list[Record]) -> str:
  """One Markdown table of every record except profiles (``profile_table``)."""
  rows = ["| name | impl | config | median s | tokens/s | GFLOP/s | of peak | peak RSS MiB "
          "| ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    if r.get("name") == "profile" and "error" not in r:
      continue
    cs = _config_text(r)
    if "error" in r:
      rows.append(f"| {r['name']} | {r['impl']} | {cs} | error: {r['error'][:80]!r} | | | | | |")
      continue
    gf = r.get("flops_per_s")
    rows.append("| " + " | ".join([
        r["name"], r["impl"], cs, fmt(r.get("median_s")), fmt(r.get("tokens_per_s")),
        fmt(gf / 1e9 if gf else None), fmt(r.get("frac_of_peak")), _memory(r),
        fmt(r.get("ratio"))]) + " |")
  return "\n".join(rows)


def profile_table(records: list[Record]) -> str:
  """The ``profile`` records as one Markdown table: seconds per step by op category."""
  cats = CATEGORIES[1:]
  rows = ["| impl | config | step s | matmul s (share) | matmul GFLOP/s | matmul of peak | "
          + " | ".join(f"{c} s" for c in cats) + " | kernel CPU s | page faults |",
          "|---|---|---:|---:|---:|---:|" + "---:|" * (len(cats) + 2)]
  for r in records:
    if r.get("name") != "profile" or "error" in r:
      continue
    c = r["categories"]
    rate = r.get("matmul_flops_per_s")
    rows.append("| " + " | ".join(
        [r["impl"], f"{r['config']['shape']} {r['config']['label']}", fmt(r["step_s"]),
         f"{fmt(c['matmul'])} ({r['matmul_share']:.0%})", fmt(rate / 1e9 if rate else None),
         fmt(r.get("matmul_frac_of_peak"))] + [fmt(c[k]) for k in cats]
        + [fmt(r.get("kernel_cpu_s")), fmt(r.get("minor_faults"))]) + " |")
  return "\n".join(rows) if len(rows) > 2 else ""


def routing_table(derived: list[Record]) -> str:
  """The ``routing`` measurement in one table: per shape, rank, method and batch kind, ours
  and PEFT's step over their own no-adapter step, ours over our LoRA step, and ours / PEFT
  (all in turn); ratios of median wall times, with those of median CPU times in parentheses."""
  cols = {"routed_over_none": "{impl}/none", "routed_over_lora": "{impl}/lora",
          "routed_vs_peft": "ours/peft"}
  cells: dict[tuple, dict[str, float]] = {}
  for r in derived:
    if r["name"] not in cols:
      continue
    c = r["config"]
    col = cols[r["name"]].format(impl=r["impl"])
    cell = cells.setdefault((c["shape"], c["rank"], c["label"], c["batch"]), {})
    cell[col] = fmt(r["ratio"]) + (f" ({fmt(r['cpu_ratio'])})" if "cpu_ratio" in r else "")
  if not cells:
    return ""
  rows = ["| shape | rank | adapters | batch | ours / our none | ours / our LoRA "
          "| PEFT / PEFT none | PEFT / PEFT LoRA | PEFT / ours |",
          "|---|---:|---|---|---:|---:|---:|---:|---:|"]
  for (shape, rank, label, batch), v in cells.items():
    rows.append(f"| {shape} | {rank} | {label} | {batch} | {v.get('ours/none', '')} | "
                f"{v.get('ours/lora', '')} | {v.get('peft/none', '')} | "
                f"{v.get('peft/lora', '')} | {v.get('ours/peft', '')} |")
  return "\n".join(rows)
