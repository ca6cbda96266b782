"""Training-speed, memory and scaling benchmark: ours (JAX) against HF PEFT's Poly / LoRA (PyTorch).

Not part of the installed library: run it from the repository root,

  python -m benchmarks [--quick] [--out DIR] [--only NAME,...] [--shapes small,base] [--steps N]

on whichever JAX platform is present (CPU when there is no accelerator); every record names the
platform and device it ran on, the machine record the CPU model and flags. Every measurement
runs in a worker process of its own (so peak resident memory, ``/proc/self/status`` VmHWM,
belongs to one job); the parent collects the records, derives ratios from the medians and writes
``results.jsonl`` and ``table.md`` to ``--out``.

Measurements (``--only`` takes these names; ``plan.MEASUREMENTS`` lists their jobs):
  peak      the machine's matmul rate: float32 (n x n) @ (n x n), JAX and torch.
  step      train-step time of ``none`` (no adapter), ``lora``, ``poly`` (K skills, S = 1) and
            ``mhr`` (K skills, S splits) at each shape, ours and PEFT's, each in its own process:
            ours / PEFT tokens/s, MHR / LoRA and MHR / none, fraction of peak, peak memory.
  versus    the same steps, ours and PEFT's in turn in one process (the side-by-side ratio).
  profile   where the step time goes, ours and PEFT's, no adapter, LoRA and MHR (pre-training
            and fine-tuning batches): seconds per step in matmuls (with their FLOP rate),
            elementwise ops, copies / transposes, gathers / scatters and unattributed time
            (``benchmarks.profiling``).
  routing   per shape and rank: no adapter, LoRA, Poly and MHR (S = 8, 64) on pre-training
            (mixed-task) and fine-tuning (single-task) batches, ours and PEFT's, all stepped in
            turn in one process: each step over its own no-adapter step, each routed step
            over its LoRA step, and ours / PEFT.
  scaling   ours, MHR step time as n_skills, n_splits and n_tasks grow (n_tasks also with the
            trainer's optimizer, routing_update "dense" and "rows"), and mixed-task against
            single-task batches; the points of each axis stepped in turn in one process.
  vmap      fine-tuning 8 tasks at once (``jax.vmap`` over the trainable state, optimizer state
            and batch; the frozen backbone shared) against 8 separate jitted steps, in turn.

Both sides do the same work: random-init T5 of the same shape (untied output head, dropout 0),
adapters on every attention q, k, v, o, rank r, ours through the trainer's own step
(``steps.make_train_step``), token-mean cross-entropy, AdamW (lr 1e-3, weight decay 0.01) over
the trainable parameters only; the backbone is frozen. Times are medians over several steps
after compilation (JAX) or warm-up steps (torch), each step synchronised. Model FLOPs are in
``benchmarks.flops``; the fraction of peak divides the achieved model FLOP rate by the better
of XLA's and torch's best float32 matmul rate measured in the same run.

Modules: ``configs`` (shapes, the step configuration), ``flops``, ``timing``, ``jax_runner`` and
``jax_vmap`` (ours), ``torch_runner`` (PEFT's), ``profiling``, ``plan`` (measurements as jobs),
``jobs`` (what a worker runs), ``records``, ``derive`` (ratios), ``tables`` (Markdown). A
benchmark of another kind (evaluation, data loading) is a module of its own in this package,
run as ``python -m benchmarks.<module>``: ``eval_speed`` (T0 rank classification),
``finetune_speed`` (T-Few fine-tuning steps on the real few-shot splits, first step with a cold
and a warm compilation cache) and ``fewshot_job`` (an 8-task few-shot adaptation job end to end,
process start to results), each ours against the PyTorch way.
"""
