"""Where a run's figures go: JSON lines, TensorBoard event files and a console progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Mapping, Optional

from etils import epath

from mhr_jax import paths


class Reporter:
  """Writes scalars to ``<model_dir>/metrics.jsonl`` and TensorBoard, and a progress line.

  Only process 0 of a multi-host run writes (``enabled=False`` elsewhere).
  """

  def __init__(self, model_dir: epath.PathLike, total_steps: int, *, start_step: int = 0,
               enabled: bool = True, tensorboard: bool = True, stream=None, prefix: str = ""):
    self.enabled = enabled
    self.total = total_steps
    self.start_step = start_step
    self.prefix = prefix
    self.stream = stream or sys.stderr
    self._t0 = time.perf_counter()
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    model_dir = epath.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = paths.AppendedFile(model_dir / "metrics.jsonl")
    if tensorboard:
      self._tb = paths.tensorboard_writer(model_dir / "tensorboard")

  def scalars(self, step: int, values: Mapping[str, float], *, split: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)

  def progress(self, step: int, loss: Optional[float] = None) -> None:
    """One console line: step, steps/s, loss and ETA (rewritten in place on a terminal)."""
    if not self.enabled:
      return
    done = step - self.start_step
    elapsed = time.perf_counter() - self._t0
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    remaining = (self.total - step) / rate if rate and not math.isnan(rate) else float("nan")
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = "#" * filled + "." * (width - filled)
    loss_s = f" loss {loss:.4f}" if loss is not None else ""
    eta = f"{remaining:5.0f}s" if not math.isnan(remaining) else "   ?s"
    line = (f"{self.prefix}[{bar}] {step}/{self.total} {rate:6.2f} step/s{loss_s} ETA {eta}")
    end = "\r" if self.stream.isatty() and step < self.total else "\n"
    print(line, end=end, file=self.stream, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
