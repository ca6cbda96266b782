"""Model FLOPs of one train step with a frozen backbone, counting a multiply-add as 2 FLOPs.

  forward  F = sum over dense layers 2 N d_in d_out (N tokens through the layer: encoder layers
             and the decoder's cross-attention k, v see B*Li tokens, the rest B*Lt)
             + attention 4 B H Lq Lk d_kv per attention (scores and weighted values)
             + output head 2 B Lt d_model V
             + adapters 2 N r (d_in + d_out) per adapted layer
             + mixing 2 M K r (d_in + d_out) per routed layer, M = B mixed adapters (one per
               example), or M = 1 when every example shares its routing weights (a single-task
               batch without routing noise);
  backward with a frozen backbone: activation gradients only for frozen weights, so 1 x the dense
             and head forward (no weight gradients), 2 x the attention forward (gradients of both
             operands of both products), 2 x the adapter and mixing forward (activation and
             weight gradients);
  step     = F + backward; elementwise work (norms, softmax, GELU, the optimizer) is not counted.
"""

from __future__ import annotations

from benchmarks.configs import SHAPES, StepConfig


def adapted_layers(cfg: StepConfig) -> list[tuple[int, int, int]]:
  """(tokens, d_in, d_out) of every adapted projection (attention q, k, v, o)."""
  s = SHAPES[cfg.shape]
  d, hd, n_layers = s["d_model"], s["num_heads"] * s["d_kv"], s["num_layers"]
  ne, nd = cfg.batch * cfg.in_len, cfg.batch * cfg.tgt_len
  enc = [(ne, d, hd)] * 3 + [(ne, hd, d)]
  dec = ([(nd, d, hd)] * 3 + [(nd, hd, d)]  # self-attention
         + [(nd, d, hd), (ne, d, hd), (ne, d, hd), (nd, hd, d)])  # cross-attention
  return enc * n_layers + dec * n_layers


def shares_weights(cfg: StepConfig) -> bool:
  """Whether every example of a batch has the same routing weights (one mixed adapter)."""
  return cfg.single_task and not cfg.routing_noise


def step_flops(cfg: StepConfig) -> dict[str, float]:
  """Forward, backward and step FLOPs of ``cfg`` (formula in the module docstring)."""
  s = SHAPES[cfg.shape]
  d, dkv, ff, n_layers, heads, vocab = (
      s["d_model"], s["d_kv"], s["d_ff"], s["num_layers"], s["num_heads"], s["vocab_size"])
  b, li, lt = cfg.batch, cfg.in_len, cfg.tgt_len
  ne, nd = b * li, b * lt
  adapted = adapted_layers(cfg)
  mlp = 2 * d * ff + ff * d  # gated FFN: wi_0, wi_1, wo
  dense = 2 * sum(n * di * do for n, di, do in adapted) + 2 * n_layers * mlp * (ne + nd)
  head = 2 * nd * d * vocab
  attn = 4 * b * heads * dkv * n_layers * (li * li + lt * lt + lt * li)
  lora = mixing = 0.0
  if cfg.method != "none":
    lora = 2 * cfg.rank * sum(n * (di + do) for n, di, do in adapted)
  if cfg.routed:
    mixed = 1 if shares_weights(cfg) else b
    mixing = 2 * mixed * cfg.n_skills * cfg.rank * sum(di + do for _, di, do in adapted)
  forward = dense + head + attn + lora + mixing
  backward = dense + head + 2 * attn + 2 * (lora + mixing)
  return {"forward": forward, "backward": backward, "step": forward + backward}
