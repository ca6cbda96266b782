"""Training-speed, memory and scaling benchmark: ours (JAX) against HF PEFT's Poly/LoRA (PyTorch).

Run ``python -m mhr_jax.bench [--quick] [--out DIR] [--only NAME,...]``. Every measurement runs in
its own subprocess (so peak resident memory, read from ``/proc/self/status`` VmHWM, belongs to one
implementation and one configuration); the parent collects the records, derives the ratios from
the measured medians and writes ``results.jsonl`` (one JSON object per measurement) and
``table.md`` to ``--out``.

Measurements (``--only`` takes these names):
  peak      the machine's matmul rate: a float32 (n x n) @ (n x n) product, JAX and torch.
  step      train-step time of ``none`` (no adapter: forward + backward down to the first encoder
            layer, only that layer's norm scale trains), ``lora``, ``poly`` (K skills, S = 1) and
            ``mhr`` (K skills, S splits) at the T5 v1.1 small and base shapes, ours and PEFT's.
            Derived: ours / PEFT tokens/s, MHR / LoRA and MHR / none step time, achieved / peak
            FLOP rate, ours / PEFT peak memory.
  profile   where the step time goes, ours and PEFT's, no adapter and MHR: seconds per step in
            matmuls (with their FLOP rate), elementwise ops, copies / transposes, gathers /
            scatters and unattributed time (``mhr_jax.profiling``).
  scaling   ours, MHR step time as n_skills, n_splits and n_tasks grow (n_tasks also with the
            trainer's optimizer, routing_update "dense" and "rows"), and mixed-task against
            single-task batches; the points of each axis stepped in turn in one process.
  vmap      fine-tuning 8 tasks at once (``jax.vmap`` over a leading task axis of the trainable
            state, optimizer state and batch; the frozen backbone shared) against 8 separate
            jitted single-task steps, one round of each in turn, and a profile of both.

Both sides do the same work: random-init T5 of the same shape (untied output head, no output
scaling, dropout 0), adapters on every attention q, k, v, o (encoder self, decoder self, cross),
rank r, ours through the trainer's own step (``steps.make_train_step``), routing with
relaxed-Bernoulli noise in training (PEFT's Poly router always samples it in
``train()`` mode), token-mean cross-entropy, AdamW (lr 1e-3, weight decay 0.01) over the
trainable parameters only; the backbone is frozen. Times are medians over several steps after
compilation (JAX) or warm-up steps (torch), each step synchronised (``jax.block_until_ready``).

Model FLOPs per step (``step_flops``), counting a multiply-add as 2 FLOPs:
  forward  F = sum over dense layers 2 N d_in d_out (N tokens through the layer: encoder layers
             and the decoder's cross-attention k, v see B*Li tokens, the rest B*Lt)
             + attention 4 B H Lq Lk d_kv per attention (scores and weighted values)
             + output head 2 B Lt d_model V
             + adapters 2 N r (d_in + d_out) per adapted layer
             + mixing 2 B K r (d_in + d_out) per routed layer (the per-example A_b and B_b);
  backward with a frozen backbone: activation gradients only for frozen weights, so 1 x the dense
             and head forward (no weight gradients), 2 x the attention forward (gradients of both
             operands of both products), 2 x the adapter and mixing forward (activation and
             weight gradients);
  step     = F + backward; elementwise work (norms, softmax, GELU, the optimizer) is not counted.
Achieved FLOP rate = step FLOPs / median step time; the fraction of peak divides it by the
machine's peak: the better of XLA's and torch's best float32 (n x n) matmul rate over 20
repetitions, measured in the same run. The profile's matmul rate uses the FLOPs of the matmuls
XLA or torch actually ran (from the compiled HLO, or torch's FLOP counter) over their time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

RESULT_PREFIX = "BENCH_RESULT "
# T5 v1.1 sizes used by both sides (mhr_jax.network presets "small" and "base").
SHAPES = {
    # --quick only: smoke-tests the pipeline, its figures mean nothing.
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, vocab_size=256),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, vocab_size=32128),
    # The small shape with 2 + 2 layers: the scaling sweeps and the vmap comparison, where one
    # compilation per point of the full 8 + 8 layers would not fit the run's time budget.
    "small2": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=2, num_heads=6, vocab_size=32128),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, vocab_size=32128),
}
METHODS = ("none", "lora", "poly", "mhr")
ADAPTED = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """One train-step configuration, shared by both implementations."""

  shape: str = "small"
  method: str = "mhr"  # one of METHODS
  batch: int = 8
  in_len: int = 128
  tgt_len: int = 32
  rank: int = 8
  n_skills: int = 8
  n_splits: int = 8
  n_tasks: int = 100
  single_task: bool = False  # every example of a batch has the same task
  # "" : a plain optax AdamW over everything that trains (what PEFT's side runs);
  # "dense" / "rows": the trainer's optimizer (optimizers.make_optimizer, no clipping, constant
  # learning rate) with that OptimizerConfig.routing_update.
  routing_update: str = ""

  @property
  def tokens(self) -> int:
    return self.batch * (self.in_len + self.tgt_len)

  def label(self) -> str:
    if self.method == "mhr":
      suffix = f"_{self.routing_update}" if self.routing_update else ""
      return f"mhr_k{self.n_skills}_s{self.n_splits}{suffix}"
    if self.method == "poly":
      return f"poly_k{self.n_skills}"
    return self.method


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs.


def step_flops(cfg: StepConfig) -> dict[str, float]:
  """Model FLOPs of one train step with a frozen backbone (formula in the module docstring)."""
  s = SHAPES[cfg.shape]
  d, dkv, ff, n_layers, heads, vocab = (
      s["d_model"], s["d_kv"], s["d_ff"], s["num_layers"], s["num_heads"], s["vocab_size"])
  hd = heads * dkv
  b, li, lt = cfg.batch, cfg.in_len, cfg.tgt_len
  ne, nd = b * li, b * lt
  mlp = 2 * d * ff + ff * d  # gated FFN: wi_0, wi_1, wo
  # (tokens, d_in, d_out) of each adapted projection.
  enc_adapted = [(ne, d, hd)] * 3 + [(ne, hd, d)]
  dec_adapted = ([(nd, d, hd)] * 3 + [(nd, hd, d)]  # self-attention
                 + [(nd, d, hd), (ne, d, hd), (ne, d, hd), (nd, hd, d)])  # cross-attention
  adapted = enc_adapted * n_layers + dec_adapted * n_layers
  dense = 2 * sum(n * di * do for n, di, do in adapted) + 2 * n_layers * mlp * (ne + nd)
  head = 2 * nd * d * vocab
  attn = 4 * b * heads * dkv * n_layers * (li * li + lt * lt + lt * li)
  lora = mixing = 0.0
  if cfg.method != "none":
    lora = 2 * cfg.rank * sum(n * (di + do) for n, di, do in adapted)
    if cfg.method in ("poly", "mhr"):
      mixing = 2 * b * cfg.n_skills * cfg.rank * sum(di + do for _, di, do in adapted)
  forward = dense + head + attn + lora + mixing
  backward = dense + head + 2 * attn + 2 * (lora + mixing)
  return {"forward": forward, "backward": backward, "step": forward + backward}


# ---------------------------------------------------------------------------------------------
# Worker side: timing helpers.


def peak_rss_mb() -> float:
  """Peak resident set size of this process (VmHWM) in MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(run_step: Callable[[int], None], steps: int, warmup: int,
               budget_s: float) -> tuple[list[float], float]:
  """Runs ``warmup`` untimed steps (compilation), then times up to ``steps`` steps.

  Stops early (after at least 3 timed steps) when ``budget_s`` is spent. Returns the step times
  and the time of the first (compiling) step.
  """
  t0 = time.perf_counter()
  run_step(0)
  first = time.perf_counter() - t0
  for i in range(1, warmup):
    run_step(i)
  start = time.perf_counter()
  times = []
  for i in range(steps):
    t = time.perf_counter()
    run_step(warmup + i)
    times.append(time.perf_counter() - t)
    if len(times) >= 3 and time.perf_counter() - start > budget_s:
      break
  return times, first


def make_batch_np(cfg: StepConfig, seed: int = 0, vocab: Optional[int] = None,
                  lead: tuple[int, ...] = ()):
  """Random token ids (no padding, ids >= 2) and task ids as NumPy arrays."""
  import numpy as np
  rng = np.random.default_rng(seed)
  vocab = vocab or SHAPES[cfg.shape]["vocab_size"]
  inputs = rng.integers(2, vocab, lead + (cfg.batch, cfg.in_len), dtype=np.int32)
  targets = rng.integers(2, vocab, lead + (cfg.batch, cfg.tgt_len), dtype=np.int32)
  if cfg.single_task:
    task_ids = np.full(lead + (cfg.batch,), rng.integers(cfg.n_tasks), np.int32)
  else:
    task_ids = rng.integers(0, cfg.n_tasks, lead + (cfg.batch,), dtype=np.int32)
  return inputs, targets, task_ids


# ---------------------------------------------------------------------------------------------
# Ours (JAX).


def _jax_setup():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  return jax


def build_ours(cfg: StepConfig, seed: int = 0):
  """Our model, its trainable filter and a JAX batch for ``cfg``."""
  _jax_setup()
  import jax.numpy as jnp
  from flax import nnx
  from mhr_jax import adapters, network

  t5cfg = network.T5Config(**SHAPES[cfg.shape], dropout_rate=0.0)
  factory = None
  if cfg.method == "none":
    # Only the first encoder layer's norm scale trains: the backward pass then runs through the
    # whole network (activation gradients) with no weight gradient of note.
    def trainable(path, value):
      del value
      keys = tuple(str(p) for p in path)
      return keys[:3] == ("encoder", "layers_0", "pre_attention_layer_norm")
  else:
    mode = {"none": None, "lora": "lora", "poly": "poly", "mhr": "mhr"}[cfg.method]
    acfg = adapters.AdapterConfig(
        mode=mode, n_tasks=cfg.n_tasks if mode != "lora" else 1,
        n_skills=cfg.n_skills if mode != "lora" else 1,
        n_splits=cfg.n_splits if mode == "mhr" else 1, lora_rank=cfg.rank, layers="super_ni",
        relaxed_bernoulli=mode != "lora")
    factory = adapters.make_adapter_factory(acfg)
    trainable = adapters.trainable_filter(mode)
  model = network.T5(t5cfg, rngs=nnx.Rngs(seed), adapter_factory=factory)
  inputs, targets, task_ids = make_batch_np(cfg, seed)
  return model, trainable, (jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(task_ids))


def make_train_step(model, trainable_filter, learning_rate: float = 1e-3,
                    routing_update: str = ""):
  """The trainer's train step (``steps.make_train_step``) with a plain AdamW, in the argument
  order ``(trainable, opt_state, frozen, inputs, targets, task_ids, key)`` used here.

  Returns (step_fn, trainable, frozen, opt_state); ``step_fn`` is unjitted so callers can jit or
  vmap it, and returns ``(trainable, opt_state, loss)``. Gradients flow to the trainable part
  only. No clipping or schedule: PEFT's side runs a plain ``torch.optim.AdamW``. With
  ``routing_update`` ("dense" or "rows") the optimizer is the trainer's
  (``optimizers.make_optimizer``, clipping off, warm-up off) with that routing update.
  """
  import optax
  from mhr_jax import models, optimizers, steps

  graphdef, trainable, frozen = steps.split_model(model, trainable_filter)
  if routing_update:
    tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
        learning_rate=learning_rate, routing_learning_rate=learning_rate, warmup_fraction=0.0,
        total_steps=10 ** 9, grad_clip_norm=None, routing_update=routing_update), trainable)
  else:
    tx = optax.adamw(learning_rate, weight_decay=0.01)
  opt_state = tx.init(trainable)
  train_step = steps.make_train_step(
      graphdef, tx, lambda m, batch: models.loss_fn(m, batch, deterministic=False))

  def step(trainable, opt_state, frozen, inputs, targets, task_ids, key):
    batch = {
        "encoder_input_tokens": inputs, "decoder_target_tokens": targets,
        "decoder_input_tokens": models.shift_right(targets), "task_ids": task_ids}
    trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, batch, key)
    return trainable, opt_state, metrics["loss"]

  return step, trainable, frozen, opt_state


def ours_runner(cfg: StepConfig, compile_ahead: bool = False):
  """``(run, state, fn)`` for our jitted train step at ``cfg``.

  ``run(i)`` takes step ``i`` (routing noise from ``fold_in(key, i)``), waits for it and keeps
  the new trainable and optimizer state in ``state`` (``{"t": ..., "o": ...}``). ``fn`` is the
  jitted step, or with ``compile_ahead`` its compiled executable (``fn.as_text()`` is the HLO the
  profiler reads; the first ``run`` then no longer includes compilation).
  """
  jax = _jax_setup()
  model, tfilter, (inputs, targets, task_ids) = build_ours(cfg)
  step, trainable, frozen, opt_state = make_train_step(model, tfilter,
                                                       routing_update=cfg.routing_update)
  del model
  base_key = jax.random.key(0)
  fn = jax.jit(step, donate_argnums=(0, 1))
  if compile_ahead:
    fn = fn.lower(trainable, opt_state, frozen, inputs, targets, task_ids, base_key).compile()
  state = {"t": trainable, "o": opt_state}

  def run(i):
    t, o, loss = fn(state["t"], state["o"], frozen, inputs, targets, task_ids,
                    jax.random.fold_in(base_key, i))
    jax.block_until_ready((t, o, loss))
    state["t"], state["o"] = t, o

  return run, state, fn


def measure_ours_interleaved(cfgs: list[StepConfig], rounds: int) -> list[dict[str, Any]]:
  """Step times of several of our configurations in one process, one step of each in turn.

  Every configuration then sees the same machine load (this machine is shared and its load
  moves by 2x within minutes), which is what step-time ratios such as MHR / LoRA need.
  """
  runs = []
  for cfg in cfgs:
    run, _, _ = ours_runner(cfg)
    t0 = time.perf_counter()
    run(0)
    runs.append((run, time.perf_counter() - t0))
  times = [[] for _ in cfgs]
  for i in range(rounds):
    for j, (run, _) in enumerate(runs):
      t = time.perf_counter()
      run(i + 1)
      times[j].append(time.perf_counter() - t)
  return [{"times": ts, "first_step_s": first} for ts, (_, first) in zip(times, runs)]


def measure_ours_step(cfg: StepConfig, steps: int, warmup: int,
                      budget_s: float) -> dict[str, Any]:
  """Step times of our model for ``cfg``."""
  jax = _jax_setup()
  from flax import nnx

  run, state, _ = ours_runner(cfg)
  times, first = time_steps(run, steps, warmup, budget_s)
  n_trainable = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(state["t"])))
  return {"times": times, "first_step_s": first, "n_trainable": int(n_trainable)}


def measure_ours_profile(cfg: StepConfig, steps: int) -> dict[str, Any]:
  """Per-op profile of our train step for ``cfg`` (``profiling.xla_profile``)."""
  from mhr_jax import profiling

  run, _, compiled = ours_runner(cfg, compile_ahead=True)
  for i in range(2):
    run(i)
  return profiling.xla_profile(run, compiled.as_text(), steps)


def measure_ours_peak(n: int, reps: int) -> dict[str, Any]:
  """Float32 n x n matmul rate of XLA on this machine (FLOP/s)."""
  jax = _jax_setup()
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  run = lambda i: jax.block_until_ready(f(a, b))  # noqa: E731
  times, _ = time_steps(run, reps, 2, 60.0)
  return {"times": times, "flops": 2.0 * n ** 3}


def measure_ours_vmap(cfg: StepConfig, n_jobs: int, steps: int, budget_s: float) -> list[dict]:
  """Fine-tuning ``n_jobs`` tasks: one vmapped step over a task axis against a loop of steps."""
  jax = _jax_setup()
  import jax.numpy as jnp
  import numpy as np

  cfg = dataclasses.replace(cfg, n_tasks=1, single_task=True)
  model, tfilter, _ = build_ours(cfg)
  step, trainable, frozen, opt_state = make_train_step(model, tfilter)
  del model
  inputs, targets, task_ids = (jnp.asarray(x) for x in make_batch_np(cfg, 1, lead=(n_jobs,)))
  stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n_jobs), tree)  # noqa: E731
  keys = jax.random.split(jax.random.key(0), n_jobs)

  # One jitted single-task step, called once per task.
  jstep = jax.jit(step, donate_argnums=(0, 1))
  per_task = [{"t": jax.tree.map(jnp.copy, trainable), "o": jax.tree.map(jnp.copy, opt_state)}
              for _ in range(n_jobs)]

  def run_loop(i):
    outs = []
    for j, st in enumerate(per_task):
      t, o, loss = jstep(st["t"], st["o"], frozen, inputs[j], targets[j], task_ids[j],
                         jax.random.fold_in(keys[j], i))
      st["t"], st["o"] = t, o
      outs.append(loss)
    jax.block_until_ready((outs, [st["t"] for st in per_task]))

  # The same step vmapped over the task axis; the frozen backbone is shared (in_axes None).
  vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None, 0, 0, 0, 0)), donate_argnums=(0, 1))
  vstate = {"t": stack(trainable), "o": stack(opt_state)}

  def run_vmap(i):
    ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
    t, o, loss = vstep(vstate["t"], vstate["o"], frozen, inputs, targets, task_ids, ks)
    jax.block_until_ready((t, o, loss))
    vstate["t"], vstate["o"] = t, o

  # Compile both, then alternate one round of each so both see the same machine load.
  firsts = []
  for run in (run_loop, run_vmap):
    t0 = time.perf_counter()
    run(0)
    firsts.append(time.perf_counter() - t0)
  loop_first, vmap_first = firsts
  loop_times, vmap_times = [], []
  start = time.perf_counter()
  for i in range(1, steps + 2):
    for run, times in ((run_loop, loop_times), (run_vmap, vmap_times)):
      t0 = time.perf_counter()
      run(i)
      times.append(time.perf_counter() - t0)
    if len(loop_times) >= 3 and time.perf_counter() - start > budget_s:
      break
  loop_times, vmap_times = loop_times[1:], vmap_times[1:]  # the first round warms up
  # Where each variant's time goes: one profiled round of each (profiling.xla_profile).
  from mhr_jax import profiling
  st = per_task[0]
  loop_hlo = jstep.lower(st["t"], st["o"], frozen, inputs[0], targets[0], task_ids[0],
                         keys[0]).compile().as_text()
  vmap_hlo = vstep.lower(vstate["t"], vstate["o"], frozen, inputs, targets, task_ids,
                         keys).compile().as_text()
  profiles = [profiling.xla_profile(run_loop, loop_hlo, 1),
              profiling.xla_profile(run_vmap, vmap_hlo, 1)]
  del np
  return [{"variant": "loop", "times": loop_times, "first_step_s": loop_first,
           "profile": profiles[0]},
          {"variant": "vmap", "times": vmap_times, "first_step_s": vmap_first,
           "profile": profiles[1]}]


# ---------------------------------------------------------------------------------------------
# PEFT (PyTorch, CPU).


def _torch_setup(threads: int):
  import torch
  torch.set_num_threads(threads)
  return torch


def build_peft(cfg: StepConfig, threads: int, seed: int = 0):
  """HF T5 with PEFT's Poly or LoRA tuner (or no adapter) for ``cfg``, and its trainable params."""
  torch = _torch_setup(threads)
  import transformers
  torch.manual_seed(seed)
  s = SHAPES[cfg.shape]
  t5cfg = transformers.T5Config(
      vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"],
      num_layers=s["num_layers"], num_decoder_layers=s["num_layers"], num_heads=s["num_heads"],
      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(t5cfg)
  if cfg.method == "none":
    for p in model.parameters():
      p.requires_grad_(False)
    model.encoder.block[0].layer[0].layer_norm.weight.requires_grad_(True)
  else:
    import peft
    if cfg.method == "lora":
      pcfg = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=cfg.rank, lora_alpha=1,
                             lora_dropout=0.0, target_modules=list(ADAPTED))
    else:
      pcfg = peft.PolyConfig(
          task_type="SEQ_2_SEQ_LM", poly_type="poly", r=cfg.rank, n_tasks=cfg.n_tasks,
          n_skills=cfg.n_skills, n_splits=cfg.n_splits if cfg.method == "mhr" else 1,
          target_modules=list(ADAPTED))
    model = peft.get_peft_model(model, pcfg)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  return model, params


def peft_runner(cfg: StepConfig, threads: int):
  """``(run, params)``: ``run(i)`` takes one train step of HF T5 + PEFT for ``cfg`` (forward,
  backward, AdamW); ``params`` are the trainable parameters."""
  torch = _torch_setup(threads)
  model, params = build_peft(cfg, threads)
  opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
  inputs, targets, task_ids = (torch.from_numpy(x).long() for x in make_batch_np(cfg))
  kwargs = {} if cfg.method in ("none", "lora") else {"task_ids": task_ids}

  def run(i):
    del i
    out = model(input_ids=inputs, labels=targets, **kwargs)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return run, params


def measure_peft_step(cfg: StepConfig, steps: int, warmup: int, budget_s: float,
                      threads: int) -> dict[str, Any]:
  """Median train-step time of HF T5 + PEFT for ``cfg`` on CPU PyTorch."""
  run, params = peft_runner(cfg, threads)
  times, first = time_steps(run, steps, warmup, budget_s)
  return {"times": times, "first_step_s": first, "n_trainable": int(sum(p.numel() for p in params))}


def measure_peft_profile(cfg: StepConfig, steps: int, threads: int) -> dict[str, Any]:
  """Per-op profile of HF T5 + PEFT's train step for ``cfg`` (``profiling.torch_profile``)."""
  from mhr_jax import profiling

  run, _ = peft_runner(cfg, threads)
  for i in range(2):
    run(i)
  return profiling.torch_profile(run, steps)


def measure_versus(cfg: StepConfig, rounds: int, threads: int) -> dict[str, Any]:
  """Ours and PEFT's step for ``cfg`` in one process, one step of each in turn.

  Each round times one step of ours then one of PEFT's, so both see the same machine load; the
  ratio of their medians is the side-by-side figure (separate processes, as in ``step``, see
  different load when the machine is shared). Peak memory cannot be told apart here.
  """
  run_ours, _, _ = ours_runner(cfg)
  run_peft, _ = peft_runner(cfg, threads)

  t0 = time.perf_counter()
  run_ours(0)
  first = time.perf_counter() - t0
  for i in range(2):  # warm-up: compiled step's second call, torch's allocator and threads
    run_ours(i + 1)
    run_peft(i)
  times = {"ours": [], "peft": []}
  for i in range(rounds):
    for impl, run in (("ours", run_ours), ("peft", run_peft)):
      t = time.perf_counter()
      run(i + 3)
      times[impl].append(time.perf_counter() - t)
  return {"ours": {"times": times["ours"], "first_step_s": first},
          "peft": {"times": times["peft"]}}


def measure_torch_peak(n: int, reps: int, threads: int) -> dict[str, Any]:
  """Float32 n x n matmul rate of torch on this machine (FLOP/s)."""
  torch = _torch_setup(threads)
  a, b = torch.randn(n, n), torch.randn(n, n)
  times, _ = time_steps(lambda i: torch.mm(a, b), reps, 2, 60.0)
  return {"times": times, "flops": 2.0 * n ** 3}


# ---------------------------------------------------------------------------------------------
# Worker entry: one job spec in, result lines out.


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
  """Runs one measurement job in this process and returns its records (without ratios)."""
  kind, impl = job["kind"], job["impl"]
  if kind == "group":
    records = [r for sub in job["jobs"] for r in run_job(sub)]
    for r in records:
      r["shared_process"] = True  # peak RSS covers every measurement of the group
    return records
  steps, warmup, budget = job.get("steps", 5), job.get("warmup", 2), job.get("budget_s", 60.0)
  threads = job.get("threads", 2)
  cfg = StepConfig(**job.get("config", {}))
  records = []
  if kind == "peak":
    res = (measure_ours_peak if impl == "ours" else
           lambda n, r: measure_torch_peak(n, r, threads))(job["n"], steps)
    # The peak is the best repetition: the rate the machine can reach, not a typical one.
    med, best = statistics.median(res["times"]), min(res["times"])
    records.append(dict(name="peak_matmul", impl=impl, config={"n": job["n"], "dtype": "float32"},
                        median_s=med, best_s=best, flops_per_s=res["flops"] / best,
                        times=res["times"]))
  elif kind == "step":
    if impl == "ours":
      res = measure_ours_step(cfg, steps, warmup, budget)
    else:
      res = measure_peft_step(cfg, steps, warmup, budget, threads)
    records.append(_step_record(job.get("name", "step"), impl, cfg, res))
  elif kind == "sweep":
    # The points of one axis are stepped in turn in one process (measure_ours_interleaved):
    # the machine's speed drifts by more than the effects between separate measurements. A
    # point with ``also_single_task`` is measured a second time on single-task batches.
    cfgs, subs = [], []
    for sub in job["configs"]:
      c = StepConfig(**sub["config"])
      cfgs.append(c)
      subs.append(sub)
      if sub.get("also_single_task"):
        cfgs.append(dataclasses.replace(c, single_task=True))
        subs.append(sub)
    for c, sub, res in zip(cfgs, subs, measure_ours_interleaved(cfgs, steps)):
      rec = _step_record(sub["name"], impl, c, res)
      rec["config"]["sweep"] = sub["sweep"]
      records.append(rec)
  elif kind == "profile":
    res = (measure_ours_profile(cfg, steps) if impl == "ours"
           else measure_peft_profile(cfg, steps, threads))
    records.append(dict(name="profile", impl=impl,
                        config=dataclasses.asdict(cfg) | {"label": cfg.label()},
                        median_s=res["step_s"], model_flops=step_flops(cfg)["step"], **res))
  elif kind == "versus":
    res = measure_versus(cfg, steps, threads)
    for side in ("ours", "peft"):
      records.append(_step_record("versus_step", side, cfg, res[side]))
  elif kind == "interleaved":
    cfgs = [StepConfig(**c) for c in job["configs"]]
    for c, res in zip(cfgs, measure_ours_interleaved(cfgs, steps)):
      records.append(_step_record(job.get("name", "interleaved_step"), impl, c, res))
  elif kind == "vmap":
    for res in measure_ours_vmap(cfg, job["n_jobs"], steps, budget):
      rec = _step_record(f"finetune_{res['variant']}", impl, cfg, res)
      rec["config"].update(n_jobs=job["n_jobs"], variant=res["variant"])
      rec["profile"] = {k: res["profile"][k] for k in (
          "step_s", "categories", "matmul_flops", "matmul_flops_per_s", "matmul_share",
          "minor_faults", "kernel_cpu_s", "user_cpu_s")}
      # One timed unit trains every task one step.
      for k in ("tokens_per_s", "model_flops", "flops_per_s"):
        rec[k] *= job["n_jobs"]
      records.append(rec)
  else:
    raise ValueError(f"unknown job kind {kind!r}")
  rss = peak_rss_mb()
  for r in records:
    r["peak_rss_mb"] = rss
  return records


def _step_record(name: str, impl: str, cfg: StepConfig, res: dict) -> dict[str, Any]:
  med = statistics.median(res["times"])
  flops = step_flops(cfg)["step"]
  rec = dict(name=name, impl=impl, config=dataclasses.asdict(cfg) | {"label": cfg.label()},
             median_s=med, tokens_per_s=cfg.tokens / med, model_flops=flops,
             flops_per_s=flops / med, times=res["times"], first_step_s=res.get("first_step_s"))
  if "n_trainable" in res:
    rec["n_trainable"] = res["n_trainable"]
  return rec


def _worker_main(spec: str) -> None:
  for rec in run_job(json.loads(spec)):
    print(RESULT_PREFIX + json.dumps(rec), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side: the plan, subprocesses, derived ratios, outputs.


@dataclasses.dataclass
class Plan:
  """Sizes and budgets of one benchmark run."""

  shapes: tuple[str, ...] = ("small",)
  batch: int = 8
  in_len: int = 128
  tgt_len: int = 32
  steps: int = 3
  warmup: int = 1
  step_budget_s: float = 60.0
  peak_n: int = 2048
  n_skills_sweep: tuple[int, ...] = (2, 8, 64)
  n_splits_sweep: tuple[int, ...] = (1, 8, 64)
  n_tasks_sweep: tuple[int, ...] = (10, 1000, 10000)
  sweep_shape: str = "small2"
  sweep_steps: int = 3
  vmap_shape: str = "small2"
  vmap_jobs: int = 8
  vmap_steps: int = 3
  threads: int = 2
  job_timeout_s: float = 900.0
  xla_flags: str = ""  # added to XLA_FLAGS of the worker processes




QUICK = Plan(shapes=("tiny",), batch=2, in_len=16, tgt_len=8, steps=3, warmup=1, step_budget_s=5,
             peak_n=256, n_skills_sweep=(), n_splits_sweep=(), n_tasks_sweep=(10, 1000),
             sweep_shape="tiny", sweep_steps=2, vmap_shape="tiny", vmap_jobs=2, vmap_steps=2,
             job_timeout_s=600.0, xla_flags="--xla_backend_optimization_level=0")
ALL = ("peak", "step", "versus", "profile", "overhead", "scaling", "vmap")


def _cfg(plan: Plan, shape: str, **kw) -> dict[str, Any]:
  base = dict(shape=shape, batch=plan.batch, in_len=plan.in_len, tgt_len=plan.tgt_len)
  return base | kw


def step_methods() -> list[dict[str, Any]]:
  """The step configurations of item 1: no adapter, LoRA, Poly (S = 1) and MHR (S = 8)."""
  return [dict(method="none"), dict(method="lora"), dict(method="poly", n_splits=1),
          dict(method="mhr", n_splits=8)]


def make_jobs(plan: Plan, only: tuple[str, ...], quick: bool) -> list[dict[str, Any]]:
  """The subprocess jobs of a run, in order."""
  jobs = []
  common = dict(threads=plan.threads)
  if "peak" in only:
    for impl in ("ours", "peft"):
      jobs.append(dict(kind="peak", impl=impl, n=plan.peak_n, steps=20, **common))
  if "step" in only:
    for shape in plan.shapes:
      for m in step_methods():
        for impl in ("ours", "peft"):
          jobs.append(dict(kind="step", impl=impl, name="step", config=_cfg(plan, shape, **m),
                           steps=plan.steps, warmup=plan.warmup, budget_s=plan.step_budget_s,
                           **common))
  if "versus" in only:
    for shape in plan.shapes:
      for m in step_methods():
        jobs.append(dict(kind="versus", impl="ours+peft", config=_cfg(plan, shape, **m),
                         steps=plan.steps + 2, **common))
  if "profile" in only:
    for shape in plan.shapes:
      for m in (dict(method="none"), dict(method="mhr", n_splits=8)):
        for impl in ("ours", "peft"):
          jobs.append(dict(kind="profile", impl=impl, config=_cfg(plan, shape, **m),
                           steps=plan.steps, **common))
  if "overhead" in only:
    for shape in plan.shapes:
      jobs.append(dict(kind="interleaved", impl="ours", steps=plan.steps + 2, **common, configs=[
          _cfg(plan, shape, **m) for m in step_methods()]))
  if "scaling" in only:
    subs = []
    for k in plan.n_skills_sweep:
      subs.append(dict(name="scaling", sweep="n_skills", config=_cfg(
          plan, plan.sweep_shape, method="mhr", n_skills=k, n_splits=8)))
    for s in plan.n_splits_sweep:
      subs.append(dict(name="scaling", sweep="n_splits", config=_cfg(
          plan, plan.sweep_shape, method="mhr" if s > 1 else "poly", n_splits=s)))
    for t in plan.n_tasks_sweep:
      subs.append(dict(name="scaling", sweep="n_tasks", also_single_task=t == plan.n_tasks_sweep[0],
                       config=_cfg(plan, plan.sweep_shape, method="mhr", n_tasks=t)))
    for update in ("dense", "rows"):
      for t in plan.n_tasks_sweep:
        subs.append(dict(name="scaling", sweep=f"n_tasks_{update}", config=_cfg(
            plan, plan.sweep_shape, method="mhr", n_tasks=t, routing_update=update)))
    # One subprocess per sweep axis keeps each within its timeout.
    for axis in ("n_skills", "n_splits", "n_tasks", "n_tasks_dense", "n_tasks_rows"):
      if not any(s["sweep"] == axis for s in subs):
        continue
      jobs.append(dict(kind="sweep", impl="ours", configs=[s for s in subs if s["sweep"] == axis],
                       steps=plan.sweep_steps, warmup=2, budget_s=plan.step_budget_s, **common))
  if "vmap" in only:
    jobs.append(dict(kind="vmap", impl="ours", n_jobs=plan.vmap_jobs,
                     config=_cfg(plan, plan.vmap_shape, method="mhr", n_tasks=1),
                     steps=plan.vmap_steps, budget_s=4 * plan.step_budget_s, **common))
  if quick:
    # Quick mode: one process per implementation (start-up dominates at tiny shapes); run one
    # after the other, as XLA's and torch's thread pools would fight over the cores.
    jobs = [dict(kind="group", impl=impl, jobs=[j for j in jobs if j["impl"] == impl])
            for impl in ("ours", "peft", "ours+peft")]
    jobs = [j for j in jobs if j["jobs"]]
  return jobs


def run_subprocess(job: dict[str, Any], timeout_s: float,
                   xla_flags: str = "") -> list[dict[str, Any]]:
  """Runs ``job`` in a fresh Python process; returns its records or one error record."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(pathlib.Path(__file__).resolve().parents[1])]
      + env.get("PYTHONPATH", "").split(os.pathsep))
  cmd = [sys.executable, "-m", "mhr_jax.bench", "--worker", json.dumps(job)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return [dict(name=job["kind"], impl=job["impl"], config=job.get("config", {}),
                 error=f"timed out after {timeout_s:.0f} s")]
  records = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not records:
    tail = (proc.stderr or proc.stdout)[-2000:]
    return [dict(name=job["kind"], impl=job["impl"], config=job.get("config", {}),
                 error=f"exit {proc.returncode}: {tail}")]
  for r in records:
    r["process_wall_s"] = time.perf_counter() - t0
  return records


def _key(rec: dict, *fields) -> tuple:
  return tuple(rec["config"].get(f) for f in fields)


def derive(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Ratio records computed from the measured medians (and fraction of peak on step records)."""
  ok = [r for r in records if "error" not in r]
  # The machine's peak: the better of XLA's and torch's best float32 matmul rate in this run.
  peaks = [r["flops_per_s"] for r in ok if r["name"] == "peak_matmul"]
  peak = max(peaks) if peaks else None
  out = []
  steps = [r for r in ok if r["name"] == "step"]
  for r in ok:
    if peak and r["name"] in ("step", "interleaved_step", "versus_step"):
      r["frac_of_peak"] = r["flops_per_s"] / peak
    if peak and r["name"] == "profile" and r.get("matmul_flops_per_s"):
      r["matmul_frac_of_peak"] = r["matmul_flops_per_s"] / peak
  by = {(r["impl"],) + _key(r, "shape", "label"): r for r in steps}
  for (impl, shape, label), r in sorted(by.items()):
    if impl != "ours":
      continue
    p = by.get(("peft", shape, label))
    if p is not None:
      config = dict(shape=shape, label=label)
      out.append(dict(name="speedup_vs_peft", impl="ours/peft", config=config,
                      median_s=r["median_s"], tokens_per_s=r["tokens_per_s"],
                      ratio=p["median_s"] / r["median_s"],
                      what="ours tokens/s / PEFT tokens/s (= PEFT median / ours median)"))
      out.append(dict(name="memory_vs_peft", impl="ours/peft", config=dict(config),
                      ours_peak_rss_mb=r["peak_rss_mb"], peft_peak_rss_mb=p["peak_rss_mb"],
                      ratio=r["peak_rss_mb"] / p["peak_rss_mb"],
                      what="ours peak RSS / PEFT peak RSS (separate processes)"))
  for impl in ("ours", "peft"):
    shapes = sorted({s for (i, s, _) in by if i == impl})
    for shape in shapes:
      mhr = [r for (i, s, lab), r in by.items()
             if i == impl and s == shape and lab.startswith("mhr")]
      for m in mhr:
        for ref in ("lora", "none"):
          d = by.get((impl, shape, ref))
          if d is not None:
            out.append(dict(name="routing_overhead", impl=impl,
                            config=dict(shape=shape, label=m["config"]["label"], versus=ref),
                            median_s=m["median_s"], tokens_per_s=m["tokens_per_s"],
                            ratio=m["median_s"] / d["median_s"],
                            what=f"MHR step time / {ref} step time"))
  vs = {(r["impl"],) + _key(r, "shape", "label"): r for r in ok if r["name"] == "versus_step"}
  for (impl, shape, label), r in sorted(vs.items()):
    p = vs.get(("peft", shape, label))
    if impl == "ours" and p is not None:
      out.append(dict(name="speedup_vs_peft_side_by_side", impl="ours/peft",
                      config=dict(shape=shape, label=label), median_s=r["median_s"],
                      tokens_per_s=r["tokens_per_s"], ratio=p["median_s"] / r["median_s"],
                      what="PEFT median / ours median, steps taken in turn in one process"))
  inter = {_key(r, "shape", "label"): r for r in ok if r["name"] == "interleaved_step"}
  for (shape, label), m in sorted(inter.items()):
    if not label.startswith(("mhr", "poly")):
      continue
    for ref in ("lora", "none"):
      d = inter.get((shape, ref))
      if d is not None:
        out.append(dict(name="routing_overhead_interleaved", impl="ours",
                        config=dict(shape=shape, label=label, versus=ref),
                        median_s=m["median_s"], tokens_per_s=m["tokens_per_s"],
                        ratio=m["median_s"] / d["median_s"],
                        what=f"{label} step time / {ref} step time, steps taken in turn"))
  scaling = [r for r in ok if r["name"] == "scaling"]
  for axis in ("n_skills", "n_splits", "n_tasks", "n_tasks_dense", "n_tasks_rows"):
    rows = [r for r in scaling if r["config"]["sweep"] == axis and not r["config"]["single_task"]]
    if rows:
      first = rows[0]
      field = axis if axis in first["config"] else "n_tasks"
      for r in rows:
        r["ratio"] = r["median_s"] / first["median_s"]
        r["what"] = f"step time / step time at {field}={first['config'][field]}"
  mixed = [r for r in scaling if r["config"]["sweep"] == "n_tasks"]
  single = [r for r in mixed if r["config"]["single_task"]]
  for s in single:
    m = next((r for r in mixed if not r["config"]["single_task"]
              and r["config"]["n_tasks"] == s["config"]["n_tasks"]), None)
    if m is not None:
      out.append(dict(name="mixed_vs_single_task", impl="ours", config=dict(
          shape=s["config"]["shape"], n_tasks=s["config"]["n_tasks"]), median_s=m["median_s"],
          tokens_per_s=m["tokens_per_s"], ratio=m["median_s"] / s["median_s"],
          what="mixed-task batch step time / single-task batch step time"))
  loop = next((r for r in ok if r["name"] == "finetune_loop"), None)
  vm = next((r for r in ok if r["name"] == "finetune_vmap"), None)
  if loop and vm:
    out.append(dict(name="vmap_speedup", impl="ours", config=dict(
        shape=vm["config"]["shape"], n_jobs=vm["config"]["n_jobs"]), median_s=vm["median_s"],
        tokens_per_s=vm["tokens_per_s"], ratio=loop["median_s"] / vm["median_s"],
        what="8 separate steps time / one vmapped step time"))
  return out


def machine_info() -> dict[str, Any]:
  """The machine the run measured: cores, CPU model, memory, library versions."""
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  mem = None
  try:
    with open("/proc/meminfo") as f:
      mem = round(int(f.readline().split()[1]) / 2 ** 20, 1)
  except OSError:
    pass
  versions = {}
  for mod in ("jax", "flax", "optax", "torch", "transformers", "peft"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # noqa: BLE001 - a missing optional library is reported as absent
      versions[mod] = None
  env = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS")
         if k in os.environ}
  return dict(nproc=os.cpu_count(), load_avg_1_5_15=os.getloadavg(), cpu_model=cpu, mem_gib=mem,
              env=env,
              platform=platform.platform(),
              python=platform.python_version(), versions=versions, gpu="none available",
              date=datetime.datetime.now().isoformat(timespec="seconds"))


def _fmt(x, digits=3):
  if x is None:
    return ""
  if isinstance(x, float):
    if abs(x) >= 1e4:
      return f"{x:,.0f}"
    return f"{x:.{digits}g}"
  return str(x)


def profile_table(records: list[dict[str, Any]]) -> str:
  """The ``profile`` records as one Markdown table: seconds per step by op category."""
  from mhr_jax import profiling
  cats = profiling.CATEGORIES[1:]
  rows = ["| impl | config | step s | matmul s (share) | matmul GFLOP/s | matmul of peak | "
          + " | ".join(f"{c} s" for c in cats) + " | kernel CPU s | page faults |",
          "|---|---|---:|---:|---:|---:|" + "---:|" * (len(cats) + 2)]
  for r in records:
    if r.get("name") != "profile" or "error" in r:
      continue
    c = r["categories"]
    rate = r.get("matmul_flops_per_s")
    rows.append("| " + " | ".join(
        [r["impl"], f"{r['config']['shape']} {r['config']['label']}", _fmt(r["step_s"]),
         f"{_fmt(c['matmul'])} ({r['matmul_share']:.0%})", _fmt(rate / 1e9 if rate else None),
         _fmt(r.get("matmul_frac_of_peak"))] + [_fmt(c[k]) for k in cats]
        + [_fmt(r.get("kernel_cpu_s")), _fmt(r.get("minor_faults"))]) + " |")
  return "\n".join(rows) if len(rows) > 2 else ""


def markdown_table(records: list[dict[str, Any]]) -> str:
  """One Markdown table of every record."""
  head = ("| name | impl | config | median s | tokens/s | GFLOP/s | of peak | peak RSS MiB "
          "| ratio |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|")
  rows = [head]
  for r in records:
    if r.get("name") == "profile" and "error" not in r:
      continue  # in profile_table
    c = r.get("config", {})
    if "label" in c:
      cs = f"{c.get('shape')} {c['label']}"
      extra = [f"{k}={c[k]}" for k in ("sweep", "n_tasks", "versus", "n_jobs", "variant")
               if k in c and (k != "n_tasks" or r["name"] in ("scaling", "mixed_vs_single_task"))]
      if c.get("single_task"):
        extra.append("single-task batch")
      cs = " ".join([cs] + extra)
    else:
      cs = " ".join(f"{k}={v}" for k, v in c.items())
    if "error" in r:
      rows.append(f"| {r['name']} | {r['impl']} | {cs} | error: {r['error'][:80]!r} | | | | | |")
      continue
    gf = r.get("flops_per_s")
    rows.append("| " + " | ".join([
        r["name"], r["impl"], cs, _fmt(r.get("median_s")), _fmt(r.get("tokens_per_s")),
        _fmt(gf / 1e9 if gf else None), _fmt(r.get("frac_of_peak")),
        _fmt(r.get("peak_rss_mb"), 4) if "ours_peak_rss_mb" not in r else
        f"{r['ours_peak_rss_mb']:.0f} / {r['peft_peak_rss_mb']:.0f}",
        _fmt(r.get("ratio"))]) + " |")
  return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mhr_jax.bench", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps (< 1 minute)")
  parser.add_argument("--out", default="bench_out", help="folder for results.jsonl and table.md")
  parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {ALL}")
  parser.add_argument("--shapes", default=None, help="comma-separated step shapes (small,base)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker_main(args.worker)
    return 0
  only = tuple(x for x in args.only.split(",") if x)
  unknown = set(only) - set(ALL)
  if unknown:
    parser.error(f"unknown measurements {sorted(unknown)}; known: {ALL}")
  plan = QUICK if args.quick else Plan()
  if args.shapes:
    plan = dataclasses.replace(plan, shapes=tuple(args.shapes.split(",")))
  if args.steps:
    plan = dataclasses.replace(plan, steps=args.steps)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  info = machine_info()
  command = "python -m mhr_jax.bench " + " ".join(argv if argv is not None else sys.argv[1:])
  print(f"# {command}\n# {json.dumps(info)}", flush=True)
  records = []
  jsonl = out / "results.jsonl"
  t0 = time.perf_counter()
  with open(jsonl, "w") as f:
    f.write(json.dumps(dict(name="machine", impl="-", config=info, command=command)) + "\n")
    jobs = make_jobs(plan, only, args.quick)
    for recs in (run_subprocess(j, plan.job_timeout_s, plan.xla_flags) for j in jobs):
      for r in recs:
        f.write(json.dumps(r) + "\n")
        f.flush()
        msg = r.get("error", "")[-300:] or (
            f"median {r['median_s']:.4g} s" + (f", {r['tokens_per_s']:.0f} tokens/s"
                                                 if "tokens_per_s" in r else ""))
        print(f"[{time.perf_counter() - t0:6.0f} s] {r['name']} {r['impl']} "
              f"{r.get('config', {}).get('label', '')} {msg}", flush=True)
      records.extend(recs)
    derived = derive(records)
    for r in derived:
      f.write(json.dumps(r) + "\n")
  info.update(load_avg_1_5_15_at_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
  # Rewrite with fraction-of-peak and sweep ratios filled in by derive().
  with open(jsonl, "w") as f:
    f.write(json.dumps(dict(name="machine", impl="-", config=info, command=command)) + "\n")
    for r in records + derived:
      f.write(json.dumps(r) + "\n")
  table = markdown_table(records + derived)
  profiles = profile_table(records)
  if profiles:
    table += "\n\nWhere the step time goes (seconds per step, `mhr_jax.profiling`):\n\n" + profiles
  (out / "table.md").write_text(
      f"Command: `{command}`  \nDate: {info['date']}  \nMachine: {info['nproc']} cores, "
      f"{info['cpu_model']}, {info['mem_gib']} GiB; no GPU; load average at start "
      f"{info['load_avg_1_5_15'][0]:.1f}, at end "
      f"{info['load_avg_1_5_15_at_end'][0]:.1f}\n\n{table}\n")
  print(table)
  print(f"# wrote {jsonl} and {out / 'table.md'} in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
