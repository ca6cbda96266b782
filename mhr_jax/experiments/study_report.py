"""A study's summary (``study.summarize`` plus run facts) as a Markdown page."""

from __future__ import annotations

import os
import pathlib

from mhr_jax.experiments import synthetic

INTERPRETATION_PLACEHOLDER = (
    "<!-- To be written by whoever ran the study, after reading the figures above: where they "
    "disagree with the paper, what explains it. -->")


def _methods_table(summary: dict) -> list[str]:
  seeds = summary["seeds"]
  lines = [
      f"| method | held-out exact match (%), mean over {len(seeds)} seeds | std over seeds | "
      f"per seed ({', '.join(str(s) for s in seeds)}) | trainable parameters per task |",
      "|---|---|---|---|---|"]
  for method, row in summary["methods"].items():
    per_seed = ", ".join(f"{v:.1f}" for v in row["per_seed"])
    trainable = (f"0 (shared adapter: {row['trained_shared']:,})" if row["zero_shot"]
                 else f"{row['trainable']:,}")
    lines.append(f"| {synthetic.METHODS[method]} | {row['mean']:.1f} | {row['std']:.1f} | "
                 f"{per_seed} | {trainable} |")
  return lines


def _paired_table(summary: dict) -> list[str]:
  lines = ["| a - b | mean difference (points) | 95% interval | pairs (a better / same / "
           "worse) | per-seed mean differences | the paper | here |",
           "|---|---|---|---|---|---|---|"]
  for d in summary["paired"]:
    per_seed = ", ".join(f"{v:+.1f}" for v in d["per_seed"].values())
    lines.append(
        f"| {synthetic.METHODS[d['a']]} - {synthetic.METHODS[d['b']]} | {d['mean']:+.1f} | "
        f"[{d['low']:+.1f}, {d['high']:+.1f}] | {d['n_pairs']} ({d['wins']} / {d['ties']} / "
        f"{d['losses']}) | {per_seed} | {d['paper']} | {d['verdict']} |")
  return lines


def _alignment(summary: dict) -> list[str]:
  alignment = summary.get("analysis", {}).get("alignment", {})
  if not alignment:
    return []
  lines = ["", "## Gradient alignment during pre-training", "",
           "Mean over pairs of training tasks of the cosine similarity between their gradients "
           "with respect to the adapter parameters (skills; routing logits excluded), at each "
           "kept checkpoint of seed "
           f"{summary['seeds'][0]}'s pre-training (`python -m mhr_jax.analysis`).", "",
           "| run | mean over checkpoints | at the last checkpoint |", "|---|---|---|"]
  for run, curve in alignment.items():
    values = curve["mean_cosine"]
    lines.append(f"| {run} | {sum(values) / len(values):.3f} | {values[-1]:.3f} |")
  return lines


def _plots(summary: dict, plots_dir: pathlib.Path, base: pathlib.Path) -> list[str]:
  plots = summary.get("analysis", {}).get("plots", {})
  if not plots:
    return []
  lines = ["", "## Plots", ""]
  for title, name in plots.items():
    rel = os.path.relpath(plots_dir / name, base)
    lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
  return lines


def markdown(summary: dict, *, plots_dir: pathlib.Path, base: pathlib.Path) -> str:
  """The report; image links are relative to ``base`` (the page's folder)."""
  m = summary["machine"]
  load0 = ", ".join(f"{x:.1f}" for x in m["load_average"])
  load1 = ", ".join(f"{x:.1f}" for x in summary["load_average_end"])
  lines = [
      "# Results: the synthetic benchmark over seeds", "",
      f"Produced by `{summary['command']}` on {summary['date']}, on {m['cpu']} "
      f"({m['cores']} cores, {m['memory']}; load average {load0} at the start and {load1} at "
      f"the end): {summary['wall_seconds'] / 60:.1f} min wall time, "
      f"{summary['cpu_seconds'] / 60:.1f} min of CPU time in the process. Scores are exact "
      f"match on the held-out tasks' `{summary['split']}` split, read once per run; every "
      "setting was chosen on the validation split (`docs/synthetic_benchmark.md`).", "",
      "## Held-out exact match", ""]
  lines += _methods_table(summary)
  if summary.get("backbone_primitives") is not None:
    lines += ["", f"The frozen backbone scores {summary['backbone_primitives']:.1f}% exact match "
              "on the primitive skills (validation, mean over skills)."]
  lines += ["", "## Paired comparisons", "",
            "Each (held-out task, seed) pair gives one difference of exact match, a - b. The "
            "interval is a Student t-interval of their mean (mean +- t(0.975, n-1) sd / "
            "sqrt(n)); it treats the pairs as independent, while the pairs of one seed share "
            "that seed's pre-training, so the per-seed mean differences are shown beside it. "
            "'here' reads the interval against the paper's claim: 'agrees' when it excludes 0 "
            "in the claimed direction (or, for 'competitive', lies within +-3 points), "
            "'disagrees' when it excludes it the other way, 'not resolved' otherwise.", ""]
  lines += _paired_table(summary)
  lines += _alignment(summary)
  lines += _plots(summary, plots_dir, base)
  lines += ["## What the figures say", "", INTERPRETATION_PLACEHOLDER, ""]
  return "\n".join(lines)
