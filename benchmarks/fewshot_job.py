"""A whole few-shot adaptation job, end to end: ours (vmapped) against a PEFT loop.

    python -m benchmarks.fewshot_job [--steps 20] [--eval_examples 16] [--repeats 1]

The job: 8 held-out datasets, each fine-tuned for ``--steps`` steps of 8 examples (T-Few
multiple-choice batches and losses, as the T0 few-shot preset trains) from the same starting
weights, then evaluated by rank classification on ``--eval_examples`` examples. The datasets:
RTE, CB, COPA, WiC, WSC and BoolQ, evaluated on the first examples of their SuperGLUE validation
sets (first original-task template), and Winogrande and ANLI R1, which have no evaluation set
here, evaluated on the first examples of another few-shot seed's split (1024; the files of two
seeds may share examples). Training examples: the few-shot split of seed 0, a template drawn per
example (``finetune_speed.render_fewshot``).

Each side is one process, timed by this driver from its start to its results file written:

  ours   ``python -m benchmarks.fewshot_job --side ours``: the library's step functions driven
         by this module (the trainer cannot vmap datasets: ``mhr_jax.sweep`` explains why), one
         program for all 8 tasks: ``steps.init_vmapped`` / ``steps.jit_vmapped_train_step`` over
         ``steps.make_train_step`` of ``models.tfew_loss_fn`` (single-task routing, as the
         trainer's vmapped fine-tuning), batches cut to length buckets, then each task's copy
         scored by the evaluation's ``score_fn`` (``evaluation.ModelFns``, buckets). Run with the
         persistent compilation cache cold (an empty folder) and warm (the same folder again).
  peft   ``python -m benchmarks.fewshot_job --side peft``: HF T5 + PEFT Poly, a loop over the 8
         tasks: the adapters reset to their initial values, a fresh AdamW, the T-Few step
         (``finetune_speed.peft_tfew_loss``, dynamic padding), then T-Few's rank classification
         (``eval_speed.peft_passes``' ``peft_tfew``: encoder once per input, decoder per choice).

Both start from one checkpoint that the driver writes first (untimed): a random T5 v1.1
small-shaped backbone (``--shape``: small, small2 with 2 + 2 layers, tiny for the tests) saved
by transformers (``save_pretrained``), read by ours as ``ModelConfig.hf_checkpoint`` reads it
and by PEFT with ``from_pretrained``; Poly adapters (K = 8, rank 1, the T0 layers) on both,
each side initialising its own. The prompts are rendered by the driver (untimed) into a JSON
file; each side tokenizes them itself (ours with the library's seqio
vocabulary, PEFT with sentencepiece on the same T5 model file). AdamW lr 1e-3, weight decay 0.01
on both sides. Each process records where its time went (imports, data, model, first step,
train, evaluation).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the child's own time line starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

NAME = "fewshot_job"
SUPERGLUE = ("rte", "cb", "copa", "wic", "wsc", "boolq")
FEWSHOT_EVAL = ("winogrande", "anli_r1")  # evaluated on another seed's few-shot split
EVAL_SEED = 1024
DATASETS = SUPERGLUE + FEWSHOT_EVAL
BATCH = 8  # examples per task and step (--batch)
EVAL_BATCH = 16


class Marks:
  """Seconds since the process started, at named points."""

  def __init__(self):
    self.points: dict[str, float] = {}

  def __call__(self, name: str) -> None:
    self.points[name] = time.perf_counter() - START

  def stages(self) -> dict[str, float]:
    """Seconds of each stage (from the previous mark)."""
    out, last = {}, 0.0
    for k, v in self.points.items():
      out[k], last = v - last, v
    return out


# ---------------------------------------------------------------------------------------------
# The driver's preparation (untimed): prompts and the starting checkpoint.


def render_job(data_dir: pathlib.Path, datasets, eval_examples: int) -> dict[str, Any]:
  """``{dataset: {"train": rows, "eval": rows}}`` of rendered text."""
  from benchmarks import eval_speed, finetune_speed

  job = {}
  for name in datasets:
    if name in SUPERGLUE:
      ev = eval_speed.render_eval(data_dir, name, eval_examples)
      ev = [{k: r[k] for k in ("inputs", "answer_choices", "label")} for r in ev]
    else:
      ev = finetune_speed.render_fewshot(data_dir, name, EVAL_SEED)[:eval_examples]
    job[name] = {"train": finetune_speed.render_fewshot(data_dir, name, 0), "eval": ev}
  return job


def write_checkpoint(out: pathlib.Path, shape: str) -> None:
  """A random T5 backbone of ``shape`` (v1.1 layout) saved by transformers into ``out``."""
  from benchmarks import eval_speed

  ours = eval_speed.build_ours(shape, eval_speed.Adapters(n_tasks=1))
  eval_speed.hf_t5_from(ours).save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# Ours: one vmapped program for every task.


def _train_batches(job, vocab, steps: int, n_choices: int, batch: int = BATCH
                   ) -> list[dict[str, np.ndarray]]:
  """Per step, the 8 tasks' T-Few batches stacked [T, B*C, L], cut to length buckets."""
  from benchmarks import finetune_speed
  from mhr_jax import length_buckets

  per_task = [finetune_speed.tokenize(job[d]["train"], vocab, "task0") for d in job]
  keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
          "decoder_loss_weights", "task_ids", "is_correct")
  out = []
  for i in range(steps):
    rows = []
    for examples in per_task:
      start = (i * batch) % len(examples)
      part = (examples + examples)[start:start + batch]
      rows.append(finetune_speed.choice_batch(part, vocab, 0, n_choices))
    stacked = {k: np.stack([r[k] for r in rows]) for k in keys}  # T x [B*C, L] -> [T, B*C, L]
    out.append(length_buckets.trim(stacked, finetune_speed.BUCKETS))
  return out


def padded_tokens(job, vocab, steps: int, batch: int) -> dict[str, int]:
  """Token positions the training steps run, encoder + decoder: ours (the 8 tasks' batches
  stacked, padded to the most choices of any task and to the length buckets of the longest),
  PEFT (each task's batch padded to its own longest input and choice), and the real tokens."""
  from benchmarks import finetune_speed

  n_choices = max(len(r["answer_choices"]) for d in job.values() for r in d["train"])
  ours = real = 0
  for b in _train_batches(job, vocab, steps, n_choices, batch):
    enc = b["encoder_input_tokens"][:, ::n_choices]  # [T, B*C, Li] -> [T, B, Li]
    ours += enc.size + b["decoder_target_tokens"].size
    real += int((enc > 0).sum() + (b["decoder_target_tokens"] > 0).sum())
  peft = 0
  for d in job:
    examples = finetune_speed.tokenize(job[d]["train"], vocab, d)
    c = max(len(e["answer_choices"]) for e in examples)
    for i in range(steps):
      start = (i * batch) % len(examples)
      part = (examples + examples)[start:start + batch]
      choice_len = max(len(vocab.encode(ch)) + 1 for e in part for ch in e["answer_choices"])
      peft += len(part) * (max(len(e["inputs"]) for e in part) + c * choice_len)
  return {"ours": ours, "peft": peft, "real": real}


def run_ours(args, marks: Marks) -> dict[str, Any]:
  """Fine-tunes every task in one vmapped program, then scores each task's copy."""
  import jax
  import optax
  from flax import nnx

  from benchmarks import eval_speed, finetune_speed
  from mhr_jax import adapters, compilation_cache, hf_import, models, sharding, steps
  from tasks import vocab as vocab_lib

  compilation_cache.configure(args.cache_dir)
  marks("import")
  job = json.loads(pathlib.Path(args.job).read_text())
  vocab = vocab_lib.resolve(None, pathlib.Path(args.data_dir) / "tokenizer" / "spiece.model")
  n_choices = max(len(r["answer_choices"]) for d in job.values() for r in d["train"])
  batches = _train_batches(job, vocab, args.steps, n_choices, args.batch)
  evals = {d: eval_speed.tokenize_eval(job[d]["eval"], vocab) for d in job}
  marks("data")
  model = eval_speed.build_ours(args.shape, eval_speed.Adapters(n_tasks=1),
                                relaxed_bernoulli=True)
  hf_import.assign_backbone(model, hf_import.hf_to_params(
      model.config, hf_import.read_safetensors_dir(args.checkpoint)))
  graphdef, trainable, frozen = steps.split_model(model, adapters.trainable_filter("poly"))
  tx = optax.adamw(finetune_speed.LEARNING_RATE, weight_decay=0.01)
  loss = adapters.single_task_loss(
      lambda m, b: models.tfew_loss_fn(m, b, n_choices, deterministic=False))
  mesh = sharding.make_mesh(sharding.MeshConfig())
  rules = sharding.logical_rules("dp")
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  frozen = jax.device_put(frozen, frozen_sh)
  stacked, opt_state = steps.init_vmapped(tx, trainable, len(job), mesh)
  step = steps.jit_vmapped_train_step(steps.make_train_step(graphdef, tx, loss), mesh, frozen_sh,
                                      rules=rules)
  marks("model")
  key = jax.random.key(0)
  losses = []
  for i, batch in enumerate(batches):
    stacked, opt_state, metrics = step(stacked, frozen, opt_state, batch,
                                       jax.random.fold_in(key, i))
    losses.append(metrics["loss"])
    if i == 0:
      jax.block_until_ready(metrics)
      marks("first_step")
  losses = np.asarray(jax.block_until_ready(losses))  # [steps, T]
  marks("train")
  accuracy = {}
  for t, name in enumerate(job):
    task_model = nnx.merge(graphdef, steps.unstack(stacked, t), frozen)
    preds = eval_speed.shared_scorer(task_model, evals[name], 0, EVAL_BATCH,
                                     eval_speed.BUCKETS)()
    accuracy[name] = float(np.mean(preds == np.asarray([e["label"] for e in evals[name]])))
  marks("eval")
  return {"accuracy": accuracy, "first_loss": losses[0].tolist(),
          "last_loss": losses[-1].tolist()}


# ---------------------------------------------------------------------------------------------
# PEFT: a loop over the tasks.


def run_peft(args, marks: Marks) -> dict[str, Any]:
  """Per task: reset the adapters, fine-tune, score every (input, choice) as T-Few does."""
  import sentencepiece
  import torch
  import transformers

  from benchmarks import eval_speed, finetune_speed

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  marks("import")
  job = json.loads(pathlib.Path(args.job).read_text())
  sp = sentencepiece.SentencePieceProcessor(
      model_file=str(pathlib.Path(args.data_dir) / "tokenizer" / "spiece.model"))
  train = {d: finetune_speed.tokenize(job[d]["train"], sp, d) for d in job}
  evals = {d: eval_speed.tokenize_eval(job[d]["eval"], sp) for d in job}
  marks("data")
  model = eval_speed.wrap_poly(transformers.T5ForConditionalGeneration.from_pretrained(
      args.checkpoint), eval_speed.Adapters(n_tasks=1))
  initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
  marks("model")
  accuracy, last_loss = {}, {}
  train_s = eval_s = 0.0
  for name in job:
    t = time.perf_counter()
    with torch.no_grad():
      for n, p in model.named_parameters():
        if n in initial:
          p.copy_(initial[n])
    trainer = finetune_speed.PeftTrainer(model)
    examples = train[name]
    c = max(len(e["answer_choices"]) for e in examples)
    for i in range(args.steps):
      start = (i * args.batch) % len(examples)
      part = (examples + examples)[start:start + args.batch]
      last_loss[name] = trainer.step(trainer.prepare(part, sp, 0, c))
    t2 = time.perf_counter()
    model.eval()
    preds = eval_speed.peft_passes(model, evals[name], 0, EVAL_BATCH)["peft_tfew"]()
    accuracy[name] = float(np.mean(preds == np.asarray([e["label"] for e in evals[name]])))
    train_s, eval_s = train_s + t2 - t, eval_s + time.perf_counter() - t2
  marks("train_and_eval")
  return {"accuracy": accuracy, "last_loss": last_loss, "train_s": train_s, "eval_s": eval_s}


def child(args) -> int:
  """One side's whole job in this process; writes ``args.result``."""
  from benchmarks import eval_speed

  if not args.all_cores:
    eval_speed.pin_to_one_core(args.core)
  marks = Marks()
  result = (run_ours if args.side == "ours" else run_peft)(args, marks)
  marks("done")
  result.update(side=args.side, stages_s=marks.stages(), marks_s=marks.points)
  pathlib.Path(args.result).write_text(json.dumps(result))
  return 0


# ---------------------------------------------------------------------------------------------
# The driver.


def _run_child(args, side: str, work: pathlib.Path, cache_dir: str, tag: str) -> dict[str, Any]:
  """Runs one side in a process of its own; its wall time is from start to results written."""
  result = work / f"{tag}.json"
  cmd = [sys.executable, "-m", f"benchmarks.{NAME}", "--side", side, "--job",
         str(work / "job.json"), "--checkpoint", str(work / "checkpoint"), "--data_dir",
         args.data_dir, "--steps", str(args.steps), "--batch", str(args.batch), "--shape",
         args.shape, "--cache_dir", cache_dir, "--result", str(result), "--core", str(args.core)]
  cmd += ["--all_cores"] if args.all_cores else []
  load = os.getloadavg()
  t = time.perf_counter()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - t
  record = json.loads(result.read_text())
  record.update(variant=tag.rsplit("_", 1)[0], wall_s=wall, loadavg_before=load,
                loadavg_after=os.getloadavg())
  print(tag, f"{wall:.1f} s", record["stages_s"], flush=True)
  return record


def drive(args) -> list[dict]:
  """Prepares the job, then runs ours cold, ours warm and PEFT in turn, ``--repeats`` times."""
  data_dir = pathlib.Path(args.data_dir)
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    job = render_job(data_dir, args.datasets, args.eval_examples)
    (work / "job.json").write_text(json.dumps(job))
    write_checkpoint(work / "checkpoint", args.shape)
    for r in range(args.repeats):
      cache = work / f"cache_{r}"  # empty: the cold run fills it, the warm run reads it
      records.append(_run_child(args, "ours", work, str(cache), f"ours_cold_{r}"))
      records.append(_run_child(args, "ours", work, str(cache), f"ours_warm_{r}"))
      records.append(_run_child(args, "peft", work, "off", f"peft_{r}"))
  for rec in records:
    rec.update(steps=args.steps, batch=args.batch, eval_examples=args.eval_examples,
               datasets=list(args.datasets), shape=args.shape)
  return records


def table(records: list[dict]) -> str:
  """Wall seconds per variant (median over repeats), ratios to PEFT, and the stages."""
  from benchmarks import eval_speed

  walls: dict[str, list[float]] = {}
  for r in records:
    walls.setdefault(r["variant"], []).append(r["wall_s"])
  peft = eval_speed.median(walls["peft"])
  lines = ["| variant | runs | wall (s), median | PEFT / this | stages (s), first run | "
           "mean accuracy |", "|---|---|---|---|---|---|"]
  for variant, ws in walls.items():
    first = next(r for r in records if r["variant"] == variant)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in first["stages_s"].items())
    acc = float(np.mean(list(first["accuracy"].values())))
    lines.append(f"| {variant} | {len(ws)} | {eval_speed.fmt(eval_speed.median(ws))} | "
                 f"{peft / eval_speed.median(ws):.2f}x | {stages} | {100 * acc:.0f}% |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  from benchmarks import finetune_speed

  parser = finetune_speed.common_parser(__doc__, NAME, DATASETS)
  parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per task")
  parser.add_argument("--eval_examples", type=int, default=16, help="per task")
  parser.add_argument("--batch", type=int, default=BATCH, help="examples per task and step")
  parser.add_argument("--repeats", type=int, default=1)
  for flag in ("--side", "--job", "--checkpoint", "--cache_dir", "--result"):
    parser.add_argument(flag, help=argparse.SUPPRESS)  # a child process's
  args = parser.parse_args(argv)
  if args.side:
    return child(args)
  from benchmarks import eval_speed

  records = drive(args)
  text = table(records)
  eval_speed.write_records(pathlib.Path(args.out), NAME, records, text)
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
