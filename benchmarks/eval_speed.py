"""Evaluation speed: T0 held-out rank classification, ours against PEFT + transformers, side by side.

    python -m benchmarks.eval_speed [--max_examples 32] [--rounds 2]

The real SuperGLUE validation sets of ``../shared/data`` (RTE, CB, COPA, WiC, WSC, BoolQ), each
rendered with its first original-task promptsource template (``tasks.t0``), tokenized with the T5
vocabulary, inputs cut at 256 tokens (T-Few's ``max_seq_len``). Every example's answer choices
are scored by their length-normalised log-likelihood and the best one is the prediction.

Both sides hold the same T5 v1.1 small-shaped backbone (random weights; speed does not depend on
them) with Poly adapters (K = 8, rank 1, on q, k, v, o, wi_0, wi_1, wo), each dataset its own
task id. Per pass over a dataset, in turn in one process:

  ours_shared          the evaluation's ``score_fn`` (``evaluation.ModelFns``: the input encoded
                       once, every choice against it, ``decoding.score_choices``), fixed lengths
  ours_shared_buckets  the same with length buckets (inputs 64/128/192/256, choices 4/8/16)
  ours_repeated        ours with buckets, every (input, choice) pair through the whole model
  peft_tfew            PEFT as T-Few evaluates (``EncoderDecoder.predict`` of r-three/t-few): the
                       encoder once per input, its output repeated per choice, the decoder on
                       every (input, choice) pair; each batch padded to its longest sequence
  peft_tfew_sorted     the same with the examples batched in order of input length, as ours
                       batches them when length buckets are set
  peft_pairs           PEFT with every (input, choice) pair through the whole model

Both sides hold the same weights: ours is built first (random initialisation) and its parameters
are copied into a Hugging Face ``T5ForConditionalGeneration`` that PEFT's Poly tuner wraps, with
the same adapter shape on the same layers, both adapters as their libraries initialise them
(``lora_b`` / ``lora_B`` zero). Timing is in one process, the variants in turn, pass after pass
(`interleave`), so a machine shared with other work slows all alike: read the ratios.

Figures: examples per second (median pass), ours / PEFT ratios, and the share of examples where
ours and PEFT predict the same choice (same weights: it should be 100%).
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
from typing import Any, Callable, Mapping, Optional

import numpy as np

from benchmarks import configs

# The T5 v1.1 small shape (T0 / Super-NI), its 2 + 2-layer cut (small2) and the tiny shape (tests).
SHAPES = {k: configs.SHAPES[k] for k in ("tiny", "small2", "small")}
# Adapters of the T0 setting: every attention projection and the gated MLP.
TARGETS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")


@dataclasses.dataclass(frozen=True)
class Adapters:
  """The adapter shape both sides get (Poly when n_splits is 1, MHR otherwise)."""

  n_tasks: int = 8
  n_skills: int = 8
  n_splits: int = 1
  rank: int = 1


def pin_to_one_core(core: int = 0) -> None:
  """Runs this process (both frameworks' threads) on one core; call before importing jax/torch.

  On a machine shared with other work, PyTorch's default of one thread per core collapsed (a T5
  forward 8-10x slower with 2 threads than with 1, its threads waiting on each other), and a
  process with more threads takes a larger share of a loaded machine. With one core both sides
  size their thread pools from the affinity (one thread each) and get the same share.
  """
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {core})


def machine_info() -> dict[str, Any]:
  """CPU model and flags, cores, load, memory and library versions, for every record file."""
  info: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                          "python": platform.python_version(), "cpus": os.cpu_count(),
                          "affinity": sorted(os.sched_getaffinity(0)),
                          "loadavg_1_5_15": os.getloadavg()}
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    info["cpu_model"] = fields.get("Model name", "").strip()
    info["cpu_family_model"] = (fields.get("CPU family", "").strip(),
                                fields.get("Model", "").strip())
    flags = fields.get("Flags", "").split()
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
  except (OSError, subprocess.CalledProcessError):
    info["cpu_model"] = platform.processor()
  with open("/proc/meminfo") as f:
    info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
  for mod in ("jax", "jaxlib", "flax", "seqio", "torch", "transformers", "peft"):
    try:
      info[mod] = __import__(mod).__version__
    except ImportError:
      info[mod] = None
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return info


def write_records(out: pathlib.Path, name: str, records: list[dict[str, Any]],
                  table: str, module: Optional[str] = None) -> None:
  """``<out>/<name>.jsonl`` (a header line with the command and machine, then the records) and
  ``<out>/<name>.md`` (the table); the command is ``python -m benchmarks.<module or name>``."""
  out.mkdir(parents=True, exist_ok=True)
  header = {"command": " ".join([os.path.basename(sys.executable), "-m",
                                 f"benchmarks.{module or name}", *sys.argv[1:]]),
            "machine": machine_info()}
  with open(out / f"{name}.jsonl", "w") as f:
    for rec in [header, *records]:
      f.write(json.dumps(rec, default=float) + "\n")
  (out / f"{name}.md").write_text(table)


def interleave(fns: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
  """Seconds of each call, the functions called in turn ``rounds`` times (after one untimed call
  of each, which compiles or warms up)."""
  for fn in fns.values():
    fn()
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  return times


def median(xs) -> float:
  return float(statistics.median(xs))


def fmt(x: Optional[float], digits: int = 3) -> str:
  if x is None:
    return "-"
  return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


# ---------------------------------------------------------------------------------------------
# Ours.


def build_ours(shape: str, adapters_cfg: Adapters, *, dtype: str = "float32", seed: int = 0,
               relaxed_bernoulli: bool = False):
  """Our T5 of ``shape`` with Poly / MHR adapters on ``TARGETS`` (dropout 0); with
  ``relaxed_bernoulli`` the routing samples relaxed-Bernoulli noise in training (as PEFT's)."""
  from flax import nnx

  from mhr_jax import adapters, network

  cfg = adapters.AdapterConfig(
      mode="poly" if adapters_cfg.n_splits == 1 else "mhr", n_tasks=adapters_cfg.n_tasks,
      n_skills=adapters_cfg.n_skills, n_splits=adapters_cfg.n_splits,
      lora_rank=adapters_cfg.rank, layers="t0", relaxed_bernoulli=relaxed_bernoulli)
  t5 = network.T5Config(**SHAPES[shape], dropout_rate=0.0, dtype=dtype)
  return network.T5(t5, rngs=nnx.Rngs(seed), adapter_factory=adapters.make_adapter_factory(cfg))


# ---------------------------------------------------------------------------------------------
# PyTorch: Hugging Face T5 with PEFT's Poly tuner.


def torch_setup(threads: Optional[int] = None):
  import torch

  torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
  return torch


def build_peft(ours, adapters_cfg: Adapters, threads: Optional[int] = None):
  """PEFT Poly (or MHR) around a Hugging Face T5 holding ``ours``'s backbone weights; eval mode."""
  torch_setup(threads)
  return wrap_poly(hf_t5_from(ours), adapters_cfg).eval()


def hf_t5_from(ours):
  """A Hugging Face ``T5ForConditionalGeneration`` holding ``ours``'s backbone weights."""
  import torch
  import transformers

  from mhr_jax import hf_import

  hf_cfg = hf_import.config_to_hf(ours.config)
  hf_cfg.update(dropout_rate=0.0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg))
  if not ours.config.tie_word_embeddings:
    # transformers 5 ties lm_head to the embedding whatever the config says; v1.1 is untied.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  tensors = {k: torch.tensor(v) for k, v in hf_import.params_to_hf(ours).items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  missing = [k for k in missing if k not in ("encoder.embed_tokens.weight",
                                             "decoder.embed_tokens.weight")]
  if missing or unexpected:
    raise ValueError(f"backbone copy: missing {missing}, unexpected {unexpected}")
  return model


def wrap_poly(model, adapters_cfg: Adapters):
  """PEFT's Poly (or MHR) tuner on ``TARGETS`` of a Hugging Face T5."""
  import peft

  pcfg = peft.PolyConfig(
      task_type="SEQ_2_SEQ_LM", poly_type="poly", r=adapters_cfg.rank,
      n_tasks=adapters_cfg.n_tasks, n_skills=adapters_cfg.n_skills,
      n_splits=adapters_cfg.n_splits, target_modules=list(TARGETS))
  return peft.get_peft_model(model, pcfg)


def pad_rows(rows, length: Optional[int] = None):
  """Lists of token ids -> an int64 [N, max length] tensor, 0-padded (dynamic padding)."""
  import torch

  length = length or max(len(r) for r in rows)
  out = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r[:length]
  return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# The measurement.


NAME = "eval_speed"
DATASETS = ("rte", "cb", "copa", "wic", "wsc", "boolq")
MAX_INPUT = 256  # T-Few's max_seq_len
MAX_CHOICE = 16
BUCKETS = {"inputs": (64, 128, 192, 256), "targets": (4, 8, 16)}
ADAPTERS = Adapters(n_tasks=len(DATASETS), n_skills=8, rank=1)


def dataset_spec(name: str):
  """``tasks.t0``'s spec of a held-out dataset, and BoolQ's (not one of T0's held-out sets)."""
  from tasks import t0

  return t0.DATASETS.get(name) or t0.DatasetSpec(
      "boolq", "super_glue/boolq", "super_glue/BoolQ", ("false", "true"))


def render_eval(data_dir: pathlib.Path, name: str, max_examples: int) -> list[dict[str, Any]]:
  """The first validation examples under the dataset's first original-task template (text)."""
  from tasks import t0

  spec = dataset_spec(name)
  templates = t0.load_templates(data_dir / "promptsource_templates" / spec.templates /
                                "templates.yaml")
  template = next(t for t in templates if t.original_task and t.answer_choices)
  rows = t0.render_file(data_dir / "t0_heldout" / "eval" / spec.eval / "val.jsonl", spec, template)
  return rows[:max_examples]


def tokenize_eval(rows, vocab) -> list[dict[str, Any]]:
  """``inputs`` (ids + EOS), ``choices`` (each ids + EOS), ``label`` of rendered examples."""
  return [{"inputs": (list(vocab.encode(row["inputs"]))[:MAX_INPUT - 1] + [1]),
           "choices": [(list(vocab.encode(c)) + [1])[:MAX_CHOICE]
                       for c in row["answer_choices"]],
           "label": row["label"]} for row in rows]


def load_examples(data_dir: pathlib.Path, name: str, max_examples: int) -> list[dict[str, Any]]:
  """Tokenized validation examples: ``inputs`` (ids + EOS), ``choices`` (each ids + EOS), label."""
  from tasks import vocab as vocab_lib

  vocab = vocab_lib.resolve(None, data_dir / "tokenizer" / "spiece.model")
  return tokenize_eval(render_eval(data_dir, name, max_examples), vocab)


# ---------------------------------------------------------------------------------------------
# Ours: the evaluation's model functions on an enumerated dataset, as seqio.Evaluator hands it.


def _eval_arrays(examples, task_id: int):
  """Inputs [N, MAX_INPUT], choices [N, C, MAX_CHOICE] and the enumerated feature dataset."""
  import tensorflow as tf

  n, c = len(examples), max(len(e["choices"]) for e in examples)
  enc = np.zeros((n, MAX_INPUT), np.int32)
  choices = np.zeros((n, c, MAX_CHOICE), np.int32)
  for i, e in enumerate(examples):
    enc[i, :len(e["inputs"])] = e["inputs"]
    for j, ch in enumerate(e["choices"]):
      choices[i, j, :len(ch)] = ch
  feats = {"encoder_input_tokens": enc, "task_ids": np.full(n, task_id, np.int32)}
  return enc, choices, tf.data.Dataset.from_tensor_slices(feats).enumerate().cache()


def shared_scorer(model, examples, task_id: int, batch: int, buckets) -> Callable[[], Any]:
  """A pass of the evaluation's ``score_fn`` (input encoded once, every choice against it);
  returns the predicted choice per example."""
  from mhr_jax import evaluation

  _, choices, ds = _eval_arrays(examples, task_id)
  fns = evaluation.ModelFns(model, batch_size=batch, max_decode_len=MAX_CHOICE,
                            buckets=buckets, choices=choices)
  return lambda: np.argmax(np.asarray([s for _, s in sorted(fns.score_fn(ds))]), -1)


def ours_passes(model, examples, task_id: int, batch: int) -> dict[str, Any]:
  """Pass functions of our three variants; each returns the predicted choice per example."""
  import tensorflow as tf

  from mhr_jax import evaluation

  n, c = len(examples), max(len(e["choices"]) for e in examples)
  enc, choices, _ = _eval_arrays(examples, task_id)
  # Repeated path: one row per (input, choice), the choice as the target.
  rows = {"encoder_input_tokens": np.repeat(enc, c, 0),
          "task_ids": np.full(n * c, task_id, np.int32),
          "decoder_target_tokens": choices.reshape(n * c, MAX_CHOICE)}
  rows["decoder_input_tokens"] = np.pad(rows["decoder_target_tokens"][:, :-1], ((0, 0), (1, 0)))
  row_ds = tf.data.Dataset.from_tensor_slices(rows).enumerate().cache()

  rep_fns = evaluation.ModelFns(model, batch_size=batch * c, max_decode_len=MAX_CHOICE,
                                buckets=BUCKETS)

  def repeated():
    ll = np.asarray([s for _, s in sorted(rep_fns.score_fn(row_ds))]).reshape(n, c)
    length = np.maximum((choices > 0).sum(-1), 1)
    return np.argmax(np.where((choices > 0).any(-1), ll / length, -np.inf), -1)

  return {"ours_shared": shared_scorer(model, examples, task_id, batch, {}),
          "ours_shared_buckets": shared_scorer(model, examples, task_id, batch, BUCKETS),
          "ours_repeated": repeated}


# ---------------------------------------------------------------------------------------------
# PyTorch: PEFT Poly, dynamic padding per batch.


def _choice_loglik(torch, logits, targets):
  """Summed log-likelihood of each row's target tokens (0 = padding): [N, L, V], [N, L] -> [N]."""
  logp = torch.log_softmax(logits.float(), -1)
  ll = torch.gather(logp, -1, targets.unsqueeze(-1)).squeeze(-1)
  return (ll * (targets > 0)).sum(-1)


def peft_choice_logits(torch, model, enc, choices, task_ids, n_choices: int):
  """Decoder logits [B*C, Lt, V] of every answer choice as T-Few computes them: the encoder once
  per input (enc [B, Li]), its output repeated per choice (choices [B*C, Lt], 0 = padding)."""
  mask = (enc > 0).long()
  with model.base_model._manage_pre_hooks(task_ids):  # PEFT Poly passes task ids by hooks
    hidden = model.base_model.model.get_encoder()(input_ids=enc, attention_mask=mask)[0]
  dec_in = torch.nn.functional.pad(choices[:, :-1], (1, 0))
  return model(encoder_outputs=[hidden.repeat_interleave(n_choices, 0)],
               attention_mask=mask.repeat_interleave(n_choices, 0), decoder_input_ids=dec_in,
               task_ids=task_ids.repeat_interleave(n_choices)).logits


def peft_passes(model, examples, task_id: int, batch: int) -> dict[str, Any]:
  """Pass functions of the PyTorch variants; each returns the predicted choice per example."""
  torch = torch_setup()
  c = max(len(e["choices"]) for e in examples)

  def make_batches(order):
    out = []
    for start in range(0, len(order), batch):
      part = [examples[i] for i in order[start:start + batch]]
      enc = pad_rows([e["inputs"] for e in part])
      choices = pad_rows([ch for e in part for ch in e["choices"]])  # [B * C, Lt]
      out.append((enc, choices, torch.full((len(part),), task_id)))
    return out

  in_order = np.arange(len(examples))
  by_length = np.argsort([len(e["inputs"]) for e in examples], kind="stable")
  batches = make_batches(in_order)

  def predict(ll, choices):
    n_tok = (choices > 0).sum(-1).clamp(min=1)
    return (ll / n_tok).view(-1, c).argmax(-1)

  @torch.inference_mode()
  def tfew(batches, order):
    preds = []
    for enc, choices, tids in batches:
      logits = peft_choice_logits(torch, model, enc, choices, tids, c)
      preds.append(predict(_choice_loglik(torch, logits, choices), choices))
    result = np.empty(len(order), np.int64)
    result[order] = torch.cat(preds).numpy()
    return result

  sorted_batches = make_batches(by_length)

  @torch.inference_mode()
  def pairs():
    preds = []
    for enc, choices, tids in batches:
      rows = enc.repeat_interleave(c, 0)
      out = model(input_ids=rows, attention_mask=(rows > 0).long(),
                  decoder_input_ids=torch.nn.functional.pad(choices[:, :-1], (1, 0)),
                  task_ids=tids.repeat_interleave(c))
      preds.append(predict(_choice_loglik(torch, out.logits, choices), choices))
    return torch.cat(preds).numpy()

  return {"peft_tfew": lambda: tfew(batches, in_order),
          "peft_tfew_sorted": lambda: tfew(sorted_batches, by_length), "peft_pairs": pairs}


# ---------------------------------------------------------------------------------------------


def input_buckets(examples, batch: int) -> list[int]:
  """The input bucket of each batch as ``ours_shared_buckets`` forms them: the examples in order
  of input length, ``batch`` at a time, each batch at the bucket of its longest input."""
  lengths = sorted(len(e["inputs"]) for e in examples)
  return [next(b for b in BUCKETS["inputs"] if b >= max(lengths[i:i + batch]))
          for i in range(0, len(lengths), batch)]


def measure(data_dir: pathlib.Path, max_examples: int, batch: int, rounds: int,
            datasets: tuple[str, ...] = DATASETS) -> list[dict]:
  ours = build_ours("small", ADAPTERS)
  peft_model = build_peft(ours, ADAPTERS)
  records = []
  for task_id, name in enumerate(DATASETS):
    if name not in datasets:
      continue
    examples = load_examples(data_dir, name, max_examples)
    fns = {**ours_passes(ours, examples, task_id, batch),
           **peft_passes(peft_model, examples, task_id, batch)}
    preds = {k: np.asarray(fn()) for k, fn in fns.items()}
    times = interleave(fns, rounds)
    n = len(examples)
    rec = {"dataset": name, "n_examples": n, "n_choices": max(len(e["choices"]) for e in examples),
           "mean_input_tokens": float(np.mean([len(e["inputs"]) for e in examples])),
           "max_input_tokens": max(len(e["inputs"]) for e in examples),
           "batch": batch, "batch_input_buckets": input_buckets(examples, batch),
           "pass_s": {k: median(v) for k, v in times.items()},
           "all_pass_s": times,
           "agreement_with_peft_tfew": {k: float(np.mean(p == preds["peft_tfew"]))
                                        for k, p in preds.items()}}
    rec["examples_per_s"] = {k: n / v for k, v in rec["pass_s"].items()}
    records.append(rec)
    print(name, {k: round(v, 2) for k, v in rec["examples_per_s"].items()}, flush=True)
  return records


def table(records: list[dict]) -> str:
  variants = list(records[0]["pass_s"])
  lines = ["| dataset | examples | choices | mean input tokens | "
           + " | ".join(f"{v} ex/s" for v in variants)
           + " | ours buckets / peft_tfew | ours buckets / peft_tfew_sorted"
           " | ours buckets / peft_pairs | same predictions |",
           "|---" * (8 + len(variants)) + "|"]
  totals = {v: 0.0 for v in variants}
  for r in records:
    eps = r["examples_per_s"]
    for v in variants:
      totals[v] += r["pass_s"][v]
    lines.append(f"| {r['dataset']} | {r['n_examples']} | {r['n_choices']} | "
                 f"{r['mean_input_tokens']:.0f} | " + " | ".join(fmt(eps[v]) for v in variants)
                 + f" | {eps['ours_shared_buckets'] / eps['peft_tfew']:.2f}x"
                 f" | {eps['ours_shared_buckets'] / eps['peft_tfew_sorted']:.2f}x"
                 f" | {eps['ours_shared_buckets'] / eps['peft_pairs']:.2f}x"
                 f" | {100 * r['agreement_with_peft_tfew']['ours_shared_buckets']:.0f}% |")
  n = sum(r["n_examples"] for r in records)
  lines.append(f"| all | {n} | | | " + " | ".join(fmt(n / totals[v]) for v in variants)
               + f" | {totals['peft_tfew'] / totals['ours_shared_buckets']:.2f}x"
               f" | {totals['peft_tfew_sorted'] / totals['ours_shared_buckets']:.2f}x"
               f" | {totals['peft_pairs'] / totals['ours_shared_buckets']:.2f}x | |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="../shared/data")
  parser.add_argument("--max_examples", type=int, default=32, help="per dataset")
  parser.add_argument("--batch", type=int, default=16, help="examples per batch")
  parser.add_argument("--rounds", type=int, default=2, help="timed passes per variant")
  parser.add_argument("--datasets", default=",".join(DATASETS),
                      help=f"comma-separated subset of {','.join(DATASETS)}")
  parser.add_argument("--name", default=NAME, help="the record files' name in --out")
  parser.add_argument("--out", default="docs/bench/evaluation_speed")
  parser.add_argument("--all_cores", action="store_true",
                      help="do not pin the process to one core (see pin_to_one_core)")
  args = parser.parse_args(argv)
  datasets = tuple(args.datasets.split(","))
  if set(datasets) - set(DATASETS):
    parser.error(f"unknown datasets {sorted(set(datasets) - set(DATASETS))}; known: {DATASETS}")
  if not args.all_cores:
    pin_to_one_core()
  records = measure(pathlib.Path(args.data_dir), args.max_examples, args.batch, args.rounds,
                    datasets)
  text = table(records)
  write_records(pathlib.Path(args.out), args.name, records, text, module=NAME)
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
