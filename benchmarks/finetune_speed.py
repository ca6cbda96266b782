"""Few-shot fine-tuning speed on the real T0 few-shot splits: ours against PEFT, side by side.

    python -m benchmarks.finetune_speed [--datasets rte,cb,copa,wic,wsc] [--batches 2] [--rounds 1]

The T-Few few-shot training files of ``../shared/data`` (32 shots, seed 0), every example
rendered with a template drawn at random from the dataset's original-task templates (as the
few-shot task ``t0_<dataset>_fewshot`` of ``tasks.t0`` draws them), tokenized with the T5
vocabulary, inputs cut at 256 tokens. The T0 few-shot preset trains with ``loss = "tfew"``, so
every batch is a T-Few multiple-choice batch (``choices.multiple_choice_rows``: each example
repeated once per answer choice) and the loss is LM + length-normalised MC + unlikelihood.

Both sides hold the same T5 v1.1 small-shaped backbone (``--shape``: small, its 2 + 2-layer cut
small2, tiny for the tests; random weights, speed does not depend on them) with Poly adapters
(K = 8, rank 1, on the T0 layers), each dataset its own task id, the routing sampling
relaxed-Bernoulli noise in training on both sides, AdamW (lr 1e-3, weight decay 0.01) over the
adapters and routing. Per pass (the first ``--batches`` batches of 8 examples
of every dataset), in turn in one process:

  ours_fixed    the library's train step (``steps.make_train_step`` of ``models.tfew_loss_fn``)
                at the preset's fixed feature lengths (256 input, 256 target tokens)
  ours_buckets  the same with length buckets (``length_buckets.trim``; inputs 64/128/192/256,
                targets 8/16/32/256): one compiled program per bucket
  peft_dynamic  HF T5 + PEFT Poly, the T-Few step written in PyTorch (the encoder once per
                example, its output repeated per choice, the decoder on every choice; LM + MC +
                UL), each batch padded to its own longest input and choice (dynamic padding)

Figures: real (non-pad) tokens per second (each example's input tokens once plus every choice's
tokens), steps per second, and the first step (ours: compilation included). The first step of
ours is measured with the persistent compilation cache cold (an empty folder, in this process)
and warm (a second process, ``--first_step_only``, reading the same folder).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks import eval_speed

NAME = "finetune_speed"
DATASETS = ("rte", "cb", "copa", "wic", "wsc")
BATCH = 8  # the preset's BATCH_SIZE
LENGTHS = {"inputs": 256, "targets": 256}  # the preset's INPUTS_LENGTH / TARGETS_LENGTH
BUCKETS = {"inputs": (64, 128, 192, 256), "targets": (8, 16, 32, 256)}
LEARNING_RATE = 1e-3


# ---------------------------------------------------------------------------------------------
# Data: the few-shot splits as the T0 few-shot task renders them.


def render_fewshot(data_dir: pathlib.Path, name: str, seed: int = 0, shots: Optional[int] = None,
                   draw_seed: int = 0) -> list[dict[str, Any]]:
  """A few-shot file's examples (text), each under a template drawn at random from the
  dataset's training templates (``tasks.t0``): ``inputs``, ``answer_choices``, ``label``.
  ``shots=None``: the dataset's only ``<k>_shot`` folder."""
  from tasks import t0

  spec = eval_speed.dataset_spec(name)
  templates = t0.load_templates(data_dir / "promptsource_templates" / spec.templates /
                                "templates.yaml")
  kept = t0.training_templates([t for t in templates if t.original_task and t.answer_choices],
                               spec)
  path = t0.fewshot_file(data_dir, spec, shots, seed)
  per_template = [t0.render_rows(path, spec, t) for t in kept]
  rng = np.random.default_rng(draw_seed)
  out = []
  for renders in zip(*per_template):
    usable = [r for r in renders if r is not None]
    if usable:
      row = usable[rng.integers(len(usable))]
      out.append({k: row[k] for k in ("inputs", "answer_choices", "label")})
  return out


def tokenize(rows: Sequence[dict], vocab, name: str) -> list[dict[str, Any]]:
  """Rendered examples with ``inputs`` as token ids (+ EOS, at most 256) and ``task_name``."""
  return [dict(r, inputs=list(vocab.encode(r["inputs"]))[:LENGTHS["inputs"] - 1] + [1],
               task_name=name) for r in rows]


def load_fewshot(data_dir: pathlib.Path, name: str, seed: int = 0) -> list[dict[str, Any]]:
  """`render_fewshot` tokenized with the T5 vocabulary."""
  return tokenize(render_fewshot(data_dir, name, seed), vocabulary(data_dir), name)


def vocabulary(data_dir: pathlib.Path):
  from tasks import vocab as vocab_lib

  return vocab_lib.resolve(None, data_dir / "tokenizer" / "spiece.model")


def choice_batch(examples: Sequence[dict], vocab, task_id: int, n_choices: int,
                 lengths: dict[str, int] = LENGTHS) -> dict[str, np.ndarray]:
  """The T-Few batch of ``examples`` (``choices.multiple_choice_rows``) at fixed lengths, every
  row with routing id ``task_id`` (the examples' task named the table's ``task_id``-th)."""
  from mhr_jax import choices, data

  names = [f"task{i}" for i in range(task_id + 1)]
  rows = choices.multiple_choice_rows(
      [dict(e, task_name=names[-1]) for e in examples], vocab, data.TaskIdTable(tuple(names)),
      lengths, n_choices)
  return rows


def real_tokens(batch: dict[str, np.ndarray], n_choices: int) -> int:
  """Non-pad tokens of a T-Few batch: each example's input once, every choice's tokens."""
  inputs = batch["encoder_input_tokens"][::n_choices]
  return int((inputs > 0).sum() + (batch["decoder_target_tokens"] > 0).sum())


# ---------------------------------------------------------------------------------------------
# Ours: the library's train step of the T-Few loss.


class OursTrainer:
  """Our Poly model split into (graphdef, trainable, frozen), AdamW, one jitted T-Few step per
  number of choices (the batch layout depends on it)."""

  def __init__(self, model, buckets: Optional[dict] = None):
    import jax
    import optax

    from mhr_jax import adapters, steps

    self.graphdef, trainable, self.frozen = steps.split_model(
        model, adapters.trainable_filter("poly"))
    self.trainable = jax.tree.map(jax.numpy.copy, trainable)  # each trainer donates its own
    self.tx = optax.adamw(LEARNING_RATE, weight_decay=0.01)
    self.opt_state = self.tx.init(self.trainable)
    self.buckets = buckets or {}
    self._steps: dict[int, Callable] = {}
    self._key = jax.random.key(0)
    self.n = 0

  def step_fn(self, n_choices: int) -> Callable:
    import jax

    from mhr_jax import models, steps

    if n_choices not in self._steps:
      loss = lambda m, b: models.tfew_loss_fn(m, b, n_choices, deterministic=False)  # noqa: E731
      self._steps[n_choices] = jax.jit(steps.make_train_step(self.graphdef, self.tx, loss),
                                       donate_argnums=(0, 2))
    return self._steps[n_choices]

  def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model features of a batch, cut to its length buckets when set."""
    from mhr_jax import length_buckets

    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights", "task_ids", "is_correct")
    return length_buckets.trim({k: batch[k] for k in keys}, self.buckets)

  def step(self, batch: dict[str, np.ndarray], n_choices: int) -> float:
    """One train step, waited for; returns the loss."""
    import jax

    self.n += 1
    self.trainable, self.opt_state, metrics = self.step_fn(n_choices)(
        self.trainable, self.frozen, self.opt_state, batch, jax.random.fold_in(self._key, self.n))
    return float(jax.block_until_ready(metrics["loss"]))


# ---------------------------------------------------------------------------------------------
# PEFT: the T-Few step in PyTorch, dynamic padding.


def peft_tfew_loss(torch, model, enc, choices, labels, task_ids, n_choices: int):
  """T-Few's training loss (r-three/t-few ``EncoderDecoder.training_step``): LM on the gold
  choice + length-normalised MC + unlikelihood of the wrong choices' tokens.

  enc [B, Li], choices [B*C, Lt] (0 = padding), labels [B], task_ids [B].
  """
  logits = eval_speed.peft_choice_logits(torch, model, enc, choices, task_ids, n_choices)
  b = enc.shape[0]
  w = (choices > 0).float().view(b, n_choices, -1)  # [B*C, Lt] -> [B, C, Lt]
  nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), choices,
                                          reduction="none").view(b, n_choices, -1)
  gold = torch.nn.functional.one_hot(labels, n_choices).bool()  # [B, C]
  lm = (nll * w)[gold].sum() / w[gold].sum()
  length = w.sum(-1)
  score = -(nll * w).sum(-1) / length.clamp(min=1)  # [B, C]
  score = score.masked_fill(length == 0, float("-inf"))
  mc = torch.nn.functional.cross_entropy(score, labels)
  wrong = w * (~gold).float().unsqueeze(-1)
  ul = -(torch.log1p(-torch.exp(-nll) + 0.01) * wrong).sum() / wrong.sum().clamp(min=1)
  return lm + mc + ul


class PeftTrainer:
  """HF T5 + PEFT Poly in train mode, AdamW over its trainable parameters."""

  def __init__(self, model):
    self.torch = eval_speed.torch_setup()
    self.model = model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    self.opt = self.torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.01)

  def prepare(self, examples: Sequence[dict], vocab, task_id: int, n_choices: int):
    """Tensors of one batch, each padded to its own longest sequence."""
    enc = eval_speed.pad_rows([e["inputs"] for e in examples])
    rows = []
    for e in examples:
      chs = [list(vocab.encode(c)) + [1] for c in e["answer_choices"]]
      rows += chs + [[0]] * (n_choices - len(chs))
    labels = self.torch.tensor([e["label"] for e in examples])
    return (enc, eval_speed.pad_rows(rows), labels,
            self.torch.full((len(examples),), task_id), n_choices)

  def step(self, prepared) -> float:
    loss = peft_tfew_loss(self.torch, self.model, *prepared)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# The measurement.


def _batches(examples_by_ds: dict[str, list], n_batches: int):
  """(task id, dataset, examples of one batch, number of choices) of every pass step."""
  out = []
  for task_id, (name, examples) in enumerate(examples_by_ds.items()):
    c = max(len(e["answer_choices"]) for e in examples)
    for i in range(n_batches):
      part = examples[i * BATCH:(i + 1) * BATCH]
      if part:
        out.append((task_id, name, part, c))
  return out


def build_variants(examples_by_ds: dict[str, list], vocab, n_batches: int, shape: str = "small",
                   with_peft: bool = True) -> tuple[dict[str, Callable], dict[str, Any]]:
  """``({variant: pass function returning its step seconds}, pass facts)``; the batches are
  built before timing (data preparation is not measured)."""
  adapters_cfg = eval_speed.Adapters(n_tasks=len(examples_by_ds), n_skills=8, rank=1)
  steps = _batches(examples_by_ds, n_batches)
  fixed = [(choice_batch(part, vocab, tid, c), c) for tid, _, part, c in steps]
  facts = {"steps_per_pass": len(steps),
           "real_tokens_per_pass": sum(real_tokens(b, c) for b, c in fixed),
           "fixed_tokens_per_pass": sum(b["encoder_input_tokens"].size // c
                                        + b["decoder_target_tokens"].size for b, c in fixed)}
  variants: dict[str, Callable] = {}
  model = eval_speed.build_ours(shape, adapters_cfg, relaxed_bernoulli=True)
  # PEFT's copy of the weights first: our steps donate (and so delete) the arrays they update.
  peft_trainer = PeftTrainer(eval_speed.build_peft(model, adapters_cfg)) if with_peft else None
  for name, buckets in (("ours_fixed", None), ("ours_buckets", BUCKETS)):
    trainer = OursTrainer(model, buckets)
    batches = [(trainer.prepare(b), c) for b, c in fixed]
    variants[name] = _timed_pass(lambda b, t=trainer: t.step(*b), batches)
  if peft_trainer is not None:
    prepared = [peft_trainer.prepare(part, vocab, tid, c) for tid, _, part, c in steps]
    variants["peft_dynamic"] = _timed_pass(peft_trainer.step, prepared)
  return variants, facts


def _timed_pass(step: Callable, batches: list) -> Callable[[], list[float]]:
  def run():
    times = []
    for b in batches:
      t = time.perf_counter()
      step(b)
      times.append(time.perf_counter() - t)
    return times
  return run


def first_steps(examples_by_ds, vocab, n_batches: int, shape: str) -> dict[str, float]:
  """Seconds of the first step of each of our variants (compilation included)."""
  variants, _ = build_variants(examples_by_ds, vocab, n_batches, shape, with_peft=False)
  out = {}
  for name, run in variants.items():
    out[name] = run()[0]
  return out


def warm_first_steps(args, cache_dir: str) -> dict[str, Any]:
  """Our first steps in a second process reading ``cache_dir`` (the warm persistent cache)."""
  cmd = [sys.executable, "-m", f"benchmarks.{NAME}", "--first_step_only",
         "--cache_dir", cache_dir, "--data_dir", args.data_dir, "--datasets",
         ",".join(args.datasets), "--batches", "1", "--shape", args.shape, "--core", str(args.core)]
  cmd += ["--all_cores"] if args.all_cores else []
  t = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True, check=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return {"first_step_s": result, "process_s": time.perf_counter() - t}


def measure(args, cache_dir: str) -> list[dict]:
  """Cold first steps and passes here; then the warm first steps in a second process."""
  data_dir = pathlib.Path(args.data_dir)
  vocab = vocabulary(data_dir)
  examples = {d: load_fewshot(data_dir, d) for d in args.datasets}
  variants, facts = build_variants(examples, vocab, args.batches, args.shape)
  first_pass = {k: fn() for k, fn in variants.items()}  # compiles (ours) or warms up (PEFT)
  passes: dict[str, list[list[float]]] = {k: [] for k in variants}
  for _ in range(args.rounds):
    for k, fn in variants.items():
      passes[k].append(fn())
  warm = warm_first_steps(args, cache_dir)
  records = []
  for k in variants:
    pass_s = eval_speed.median([sum(p) for p in passes[k]])
    records.append({
        "variant": k, **facts, "datasets": list(args.datasets), "batch": BATCH,
        "shape": args.shape,
        "pass_s": pass_s, "all_pass_step_s": passes[k],
        "real_tokens_per_s": facts["real_tokens_per_pass"] / pass_s,
        "steps_per_s": facts["steps_per_pass"] / pass_s,
        "first_step_cold_s": first_pass[k][0], "first_pass_s": sum(first_pass[k]),
        "first_step_warm_s": warm["first_step_s"].get(k),
        "warm_process_s": warm["process_s"] if k.startswith("ours") else None})
  return records


def table(records: list[dict]) -> str:
  peft = next(r for r in records if r["variant"] == "peft_dynamic")
  lines = ["| variant | steps/pass | real tokens/pass | real tokens/s | steps/s | / peft_dynamic "
           "| first step, cold cache (s) | first step, warm cache (s) | first pass (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(
        f"| {r['variant']} | {r['steps_per_pass']} | {r['real_tokens_per_pass']} | "
        f"{eval_speed.fmt(r['real_tokens_per_s'])} | {eval_speed.fmt(r['steps_per_s'])} | "
        f"{r['real_tokens_per_s'] / peft['real_tokens_per_s']:.2f}x | "
        f"{eval_speed.fmt(r['first_step_cold_s'])} | {eval_speed.fmt(r['first_step_warm_s'])} | "
        f"{eval_speed.fmt(r['first_pass_s'])} |")
  return "\n".join(lines) + "\n"


def common_parser(doc: str, name: str, datasets: Sequence[str]) -> argparse.ArgumentParser:
  """The flags this module and ``fewshot_job`` share: data, datasets, shape, output, cores."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="../shared/data")
  parser.add_argument("--datasets", type=lambda s: [x for x in s.split(",") if x],
                      default=list(datasets))
  parser.add_argument("--shape", default="small", choices=sorted(eval_speed.SHAPES),
                      help="T5 shape (tiny: the tests)")
  parser.add_argument("--out", default=f"docs/bench/{name}")
  parser.add_argument("--all_cores", action="store_true",
                      help="do not pin the processes to one core (eval_speed.pin_to_one_core)")
  parser.add_argument("--core", type=int, default=0, help="the core they are pinned to")
  return parser


def main(argv=None) -> int:
  parser = common_parser(__doc__, NAME, DATASETS)
  parser.add_argument("--batches", type=int, default=2, help="batches of 8 per dataset per pass")
  parser.add_argument("--rounds", type=int, default=1, help="timed passes per variant")
  parser.add_argument("--cache_dir", default=None,
                      help="persistent compilation cache (default: a fresh temporary folder)")
  parser.add_argument("--first_step_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.all_cores:
    eval_speed.pin_to_one_core(args.core)
  from mhr_jax import compilation_cache

  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = compilation_cache.configure(args.cache_dir or tmp)
    if args.first_step_only:
      data_dir = pathlib.Path(args.data_dir)
      examples = {d: load_fewshot(data_dir, d) for d in args.datasets}
      print(json.dumps(first_steps(examples, vocabulary(data_dir), args.batches, args.shape)))
      return 0
    records = measure(args, cache_dir)
  text = table(records)
  eval_speed.write_records(pathlib.Path(args.out), NAME, records, text)
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
