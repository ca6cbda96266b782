"""What one measured train step runs: the model shape, the adapter method and the batch.

Both implementations (ours and PEFT's) build the same step from a ``StepConfig``: a random-init
T5 of the shape, adapters on every attention q, k, v and o, the backbone frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from mhr_jax import modes  # the modes table only: no JAX (see SHAPES)

# The network's size presets (``mhr_jax.network.PRESETS``; a test keeps them equal), so a shape
# name means the same model here as in gin files. Written out, not imported: importing the
# library would add JAX's ~170 MiB to the peak memory of PEFT's worker processes.
SHAPES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=32128),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, vocab_size=32128),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, vocab_size=32128),
}
# The small shape with 2 + 2 layers: the scaling sweeps and the vmap comparison, where one
# compilation per point of the full 8 + 8 layers would not fit a run's time budget.
SHAPES["small2"] = dict(SHAPES["small"], num_layers=2)

# ``none``, then adapter modes of the library (``mhr_jax.modes``) that train from scratch.
NONE = "none"
METHODS = (NONE, "lora", "poly", "mhr")
ADAPTED = ("q", "k", "v", "o")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """One train-step configuration, shared by both implementations.

  Attributes:
    shape: a key of ``SHAPES``.
    method: one of ``METHODS``; ``none`` trains only the first encoder layer's norm scale, so
      the backward pass still runs through the whole network.
    batch, in_len, tgt_len: the batch (no padding).
    rank, n_skills, n_splits, n_tasks: the adapters.
    single_task: every example of a batch has the same task (fine-tuning); else each example
      draws its task (pre-training).
    routing_noise: relaxed-Bernoulli routing noise in training (ours; PEFT's Poly router always
      samples it in ``train()`` mode).
    routing_update: ``""``: a plain optax AdamW over everything that trains (what PEFT's side
      runs); ``"dense"`` / ``"rows"``: the trainer's optimizer with that
      ``OptimizerConfig.routing_update`` (``optimizers.make_optimizer``, or ``row_sparse``'s
      optimizer and step for ``"rows"``), no clipping, constant learning rate.
    dtype: the compute dtype: ours ``T5Config.dtype`` (parameters stay float32); PEFT's step
      under ``torch.autocast(dtype=...)`` when not float32.
    f32_accumulation: ours ``T5Config.f32_accumulation`` (matmuls below float32 accumulate and
      return float32 before the cast back).
  """

  shape: str = "small"
  method: str = "mhr"
  batch: int = 8
  in_len: int = 128
  tgt_len: int = 32
  rank: int = 8
  n_skills: int = 8
  n_splits: int = 8
  n_tasks: int = 100
  single_task: bool = False
  routing_noise: bool = True
  routing_update: str = ""
  dtype: str = "float32"
  f32_accumulation: bool = True

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"unknown shape {self.shape!r}; known: {sorted(SHAPES)}")
    if self.method not in METHODS:
      raise ValueError(f"unknown method {self.method!r}; known: {METHODS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"unknown dtype {self.dtype!r}; known: {DTYPES}")

  @property
  def tokens(self) -> int:
    return self.batch * (self.in_len + self.tgt_len)

  @property
  def mode(self) -> Optional[modes.Mode]:
    """The library's adapter mode of ``method``; None for ``none`` (no adapters)."""
    return None if self.method == NONE else modes.get_mode(self.method)

  @property
  def routed(self) -> bool:
    return self.mode is not None and self.mode.routed

  @property
  def splits(self) -> int:
    """The number of routing heads the adapters use: ``n_splits`` where the mode has heads."""
    return self.n_splits if self.routed and not self.mode.single_split else 1

  def label(self) -> str:
    """A short name of the adapter set-up, e.g. ``mhr_k8_s8_r8``, ``poly_k8_r8``, ``lora_r8``;
    ``_bf16`` added for bfloat16 compute (``_bf16out`` without float32 accumulation)."""
    dtype = "" if self.dtype == "float32" else "_bf16" + ("" if self.f32_accumulation else "out")
    if self.mode is None:
      return self.method + dtype
    if not self.routed:
      return f"{self.method}_r{self.rank}{dtype}"
    heads = "" if self.mode.single_split else f"_s{self.n_splits}"
    suffix = f"_{self.routing_update}" if self.routing_update else ""
    return f"{self.method}_k{self.n_skills}{heads}_r{self.rank}{suffix}{dtype}"

  def record(self) -> dict[str, Any]:
    """The configuration as it goes into a result record (with its label)."""
    return dataclasses.asdict(self) | {"label": self.label()}


def make_batch_np(cfg: StepConfig, seed: int = 0,
                  lead: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random token ids (no padding, ids >= 2) and task ids, with optional leading axes."""
  rng = np.random.default_rng(seed)
  vocab = SHAPES[cfg.shape]["vocab_size"]
  inputs = rng.integers(2, vocab, lead + (cfg.batch, cfg.in_len), dtype=np.int32)
  targets = rng.integers(2, vocab, lead + (cfg.batch, cfg.tgt_len), dtype=np.int32)
  if cfg.single_task:
    task_ids = np.full(lead + (cfg.batch,), rng.integers(cfg.n_tasks), np.int32)
  else:
    task_ids = rng.integers(0, cfg.n_tasks, lead + (cfg.batch,), dtype=np.int32)
  return inputs, targets, task_ids
