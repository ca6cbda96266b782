"""PEFT's side: Hugging Face T5 with PEFT's Poly or LoRA tuner (or no adapter), one train step
of forward, backward and ``torch.optim.AdamW`` (lr 1e-3, weight decay 0.01) over the trainable
parameters, on CUDA when torch sees a GPU, else on the CPU; the forward under ``torch.autocast``
when the step's ``dtype`` is bfloat16."""

from __future__ import annotations

from typing import Any, Optional

from benchmarks import profiling, timing
from benchmarks.configs import ADAPTED, SHAPES, StepConfig, make_batch_np

# Frozen backbone tensors by shape: several PEFT models in one process share one copy.
BackboneCache = dict[str, dict[str, Any]]


def _torch(threads: Optional[int]):
  import torch  # noqa: PLC0415 - optional dependency, imported only on PEFT's side
  if threads:
    torch.set_num_threads(threads)
  return torch


def device(threads: Optional[int] = None):
  torch = _torch(threads)
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def platform(threads: Optional[int] = None) -> dict[str, Any]:
  """The torch device the steps run on, for the records."""
  torch = _torch(threads)
  dev = device(threads)
  kind = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
  return {"torch_device": dev.type, "torch_device_kind": kind,
          "torch_threads": torch.get_num_threads()}


def _t5(cfg: StepConfig, seed: int, backbone: Optional[BackboneCache]):
  """HF T5 for ``cfg``'s shape; its weights from ``backbone`` when it holds the shape."""
  torch = _torch(None)
  import transformers  # noqa: PLC0415
  s = SHAPES[cfg.shape]
  t5cfg = transformers.T5Config(
      vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"],
      num_layers=s["num_layers"], num_decoder_layers=s["num_layers"], num_heads=s["num_heads"],
      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  if backbone is not None and cfg.shape in backbone:
    with torch.device("meta"):
      model = transformers.T5ForConditionalGeneration(t5cfg)
    model.load_state_dict(backbone[cfg.shape], assign=True)  # the cached tensors themselves
    return model
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(t5cfg).to(device())
  if backbone is not None:
    backbone[cfg.shape] = model.state_dict()
  return model


def build_peft(cfg: StepConfig, threads: Optional[int] = None, seed: int = 0,
               backbone: Optional[BackboneCache] = None):
  """HF T5 with PEFT's tuner for ``cfg`` (in train mode) and its trainable parameters."""
  torch = _torch(threads)
  model = _t5(cfg, seed, backbone)
  if cfg.mode is None:
    for p in model.parameters():
      p.requires_grad_(False)
    norm = model.encoder.block[0].layer[0].layer_norm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())  # not the shared tensor
  else:
    import peft  # noqa: PLC0415
    if not cfg.routed:
      pcfg = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=cfg.rank, lora_alpha=1,
                             lora_dropout=0.0, target_modules=list(ADAPTED))
    else:
      pcfg = peft.PolyConfig(
          task_type="SEQ_2_SEQ_LM", poly_type="poly", r=cfg.rank, n_tasks=cfg.n_tasks,
          n_skills=cfg.n_skills, n_splits=cfg.splits,
          target_modules=list(ADAPTED))
    model = peft.get_peft_model(model, pcfg).to(device())
  model.train()
  return model, [p for p in model.parameters() if p.requires_grad]


def peft_runner(cfg: StepConfig, threads: Optional[int] = None,
                backbone: Optional[BackboneCache] = None):
  """``(run, params)``: ``run(i)`` takes one synchronised train step of HF T5 + PEFT for
  ``cfg``; ``params`` are the trainable parameters."""
  torch = _torch(threads)
  model, params = build_peft(cfg, threads, backbone=backbone)
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
  dev = device()
  inputs, targets, task_ids = (torch.from_numpy(x).long().to(dev) for x in make_batch_np(cfg))
  kwargs = {"task_ids": task_ids} if cfg.routed else {}
  # bfloat16 compute as PyTorch mixed precision runs it: autocast around forward and loss, the
  # parameters and optimizer in float32.
  autocast = torch.autocast(dev.type, dtype=getattr(torch, cfg.dtype),
                            enabled=cfg.dtype != "float32")

  def run(i):
    del i
    with autocast:
      out = model(input_ids=inputs, labels=targets, **kwargs)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
      torch.cuda.synchronize()

  return run, params


def measure_step(cfg: StepConfig, steps: int, warmup: int, budget_s: float,
                 threads: Optional[int]) -> dict[str, Any]:
  """Step times of HF T5 + PEFT for ``cfg``."""
  run, params = peft_runner(cfg, threads)
  times, first = timing.time_steps(run, steps, warmup, budget_s)
  return {"times": times, "first_step_s": first, "n_trainable": int(sum(p.numel() for p in params))}


def measure_profile(cfg: StepConfig, steps: int, threads: Optional[int]) -> dict[str, Any]:
  """Per-op profile of HF T5 + PEFT's train step for ``cfg`` (``profiling.torch_profile``)."""
  run, _ = peft_runner(cfg, threads)
  for i in range(2):
    run(i)
  return profiling.torch_profile(run, steps)


def measure_peak(n: int, reps: int, threads: Optional[int]) -> dict[str, Any]:
  """Float32 n x n matmul rate of torch on this machine (FLOP/s)."""
  torch = _torch(threads)
  dev = device()
  a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

  def run(i):
    del i
    torch.mm(a, b)
    if dev.type == "cuda":
      torch.cuda.synchronize()

  times, _ = timing.time_steps(run, reps, 2, 60.0)
  return {"times": times, "flops": 2.0 * n ** 3}
