"""Statistics of a study over seeds: spread of a method's mean, paired differences between methods.

A score is one held-out task's exact match in one seed's run. Two methods are compared on the
same (task, seed) pairs: each pair gives a difference, and the 95% interval of their mean is a
Student t-interval over those differences (mean +- t(0.975, n - 1) * sd / sqrt(n)). It treats the
pairs as independent; pairs of one seed share that seed's pre-training run, so the interval is
reported beside the per-seed mean differences, which show whether seeds agree.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

Scores = Mapping[int, Mapping[str, float]]  # seed -> task -> score


def spread_over_seeds(scores: Scores) -> dict:
  """Mean and sample standard deviation over seeds of the per-seed mean over tasks."""
  means = [float(np.mean(list(per_task.values()))) for _, per_task in sorted(scores.items())]
  std = float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")
  return {"mean": float(np.mean(means)), "std": std, "per_seed": means}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the Student t-interval of the mean of ``values``."""
  x = np.asarray(values, np.float64)
  if x.size < 2:
    raise ValueError(f"a t-interval needs at least 2 values, got {x.size}")
  mean = float(x.mean())
  half = float(scipy_stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return mean, mean - half, mean + half


def paired_difference(a: Scores, b: Scores, level: float = 0.95) -> dict:
  """Method a minus method b over their shared (task, seed) pairs.

  Raises ``ValueError`` when the two methods were not scored on the same tasks and seeds.
  """
  keys_a = {(seed, task) for seed, per_task in a.items() for task in per_task}
  keys_b = {(seed, task) for seed, per_task in b.items() for task in per_task}
  if keys_a != keys_b:
    raise ValueError(f"paired scores need the same (seed, task) pairs; only in a: "
                     f"{sorted(keys_a - keys_b)[:5]}, only in b: {sorted(keys_b - keys_a)[:5]}")
  keys = sorted(keys_a)
  diffs = np.array([a[s][t] - b[s][t] for s, t in keys])
  mean, low, high = t_interval(diffs, level)
  per_seed = {s: float(np.mean([a[s][t] - b[s][t] for t in a[s]])) for s in sorted(a)}
  return {"mean": mean, "low": low, "high": high, "n_pairs": len(keys), "level": level,
          "per_seed": per_seed, "wins": int((diffs > 0).sum()), "ties": int((diffs == 0).sum()),
          "losses": int((diffs < 0).sum())}


def verdict(diff: dict, claim: str, margin: float = 3.0) -> str:
  """How an interval bears on a claim: ``"better"`` (a beats b) or ``"similar"`` (within margin).

  Returns "agrees", "disagrees" or "not resolved".
  """
  low, high = diff["low"], diff["high"]
  if claim == "better":
    return "agrees" if low > 0 else "disagrees" if high < 0 else "not resolved"
  if claim == "similar":
    if -margin <= low and high <= margin:
      return "agrees"
    return "disagrees" if high < -margin or low > margin else "not resolved"
  raise ValueError(f"claim must be 'better' or 'similar', got {claim!r}")
