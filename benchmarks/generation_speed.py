"""Generation speed: greedy and 4-beam decoding, ours against PEFT + transformers ``generate``.

    python -m benchmarks.generation_speed [--inputs synthetic super_ni] [--rounds 2]

Two input shapes, random token ids (speed does not depend on them), each example ending with EOS
and carrying a random adapter task id:

  synthetic  the synthetic benchmark's (``gin_configs/experiments/synthetic.gin``): inputs of 6
             to 22 tokens (its ``inputs_length`` is 22), 8 generated tokens (``targets_length``)
  super_ni   the Super-NI presets' (``gin_configs/experiments/super_ni_*.gin``, lengths
             1024/128): inputs of 128 to 1024 tokens (task definition and instance), 128
             generated tokens; the length spread is a stand-in (no Super-NI data here)

Random weights generate arbitrary tokens, often EOS early on one side and not the other, so both
sides are told that no token ends a sequence (ours ``eos_id=-1``, Hugging Face's
``eos_token_id=None``): every example generates exactly the stated number of tokens, checked on
the outputs. Tokens per second count generated tokens (examples x new tokens; beams not counted).

Same model and weights as ``eval_speed`` (T5 v1.1 small shape, Poly K = 8 rank 1 on q, k, v, o,
wi_0, wi_1, wo; ours built first, its parameters copied into the PEFT model). Per pass over the
examples, in turn in one process (``eval_speed.interleave``), batch sizes equal on both sides:

  ours_greedy / ours_beam4                  the evaluation's ``predict_fn`` (``ModelFns``), every
                                            batch at the fixed input length, in input order
  ours_greedy_buckets / ours_beam4_buckets  the same with length buckets: examples batched in
                                            order of input length, each batch cut to a bucket
  peft_greedy / peft_beam4                  PEFT's ``generate`` (HF defaults otherwise: KV cache,
                                            length_penalty 1, early_stopping False), batched in
                                            order of input length (as ours with buckets), each
                                            batch padded to its longest input (dynamic padding)

PEFT's Poly passes its task ids to every adapted layer by a forward pre-hook holding the
``[B]`` ids given to ``generate``; beam search runs the decoder on ``B * 4`` rows, which those
ids do not fit (a shape error in PEFT 0.21). ``peft_task_ids`` registers the same hooks with the
ids repeated per row as transformers expands the batch (row ``b * K + k`` is example ``b``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pathlib

import numpy as np

from benchmarks import eval_speed as es

NAME = "generation_speed"
NO_EOS = -1  # an id no token has: no sequence ends before its last position
BEAMS = 4


@dataclasses.dataclass(frozen=True)
class Inputs:
  """One input shape: input lengths, generated tokens, default size, length buckets."""

  min_input: int
  max_input: int  # the feature length: ours pads to it without buckets
  new_tokens: int
  n_examples: int
  batch: int
  buckets: tuple[int, ...]


INPUTS = {
    "synthetic": Inputs(6, 22, 8, n_examples=64, batch=32, buckets=(8, 16, 22)),
    "super_ni": Inputs(128, 1024, 128, n_examples=8, batch=4, buckets=(256, 512, 768, 1024)),
}
ADAPTERS = es.Adapters(n_tasks=8, n_skills=8, rank=1)


def make_examples(spec: Inputs, n: int, vocab_size: int, n_tasks: int, seed: int = 0):
  """(inputs: list of token-id lists ending with EOS, task ids [n]) with lengths uniform in
  [min_input, max_input]."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(spec.min_input, spec.max_input + 1, n)
  inputs = [list(rng.integers(2, vocab_size, length - 1)) + [1] for length in lengths]
  return inputs, rng.integers(0, n_tasks, n)


# ---------------------------------------------------------------------------------------------


def ours_passes(model, inputs, task_ids, spec: Inputs, batch: int, new_tokens: int):
  """Pass functions of our variants; each returns the tokens [n, new_tokens] in input order."""
  import tensorflow as tf

  from mhr_jax import evaluation

  enc = np.zeros((len(inputs), spec.max_input), np.int32)
  for i, row in enumerate(inputs):
    enc[i, :len(row)] = row
  feats = {"encoder_input_tokens": enc, "task_ids": np.asarray(task_ids, np.int32)}
  ds = tf.data.Dataset.from_tensor_slices(feats).enumerate().cache()

  def variant(beams, buckets):
    fns = evaluation.ModelFns(model, batch_size=batch, max_decode_len=new_tokens,
                              num_beams=beams, buckets=buckets, eos_id=NO_EOS)
    return lambda: np.asarray([t for _, t in sorted(fns.predict_fn(ds))])

  buckets = {"inputs": spec.buckets}
  return {"ours_greedy": variant(1, {}), "ours_greedy_buckets": variant(1, buckets),
          f"ours_beam{BEAMS}": variant(BEAMS, {}),
          f"ours_beam{BEAMS}_buckets": variant(BEAMS, buckets)}


@contextlib.contextmanager
def peft_task_ids(model, task_ids):
  """PEFT Poly's task-id hooks, the ids repeated to the rows of each call (beams: ``B * K``)."""
  from peft.tuners.poly.layer import Linear

  def pre_hook(_, args, kwargs):
    rows = args[0].shape[0] if args else kwargs["x"].shape[0]
    kwargs["task_ids"] = task_ids.repeat_interleave(rows // len(task_ids))
    return args, kwargs

  handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True)
             for m in model.modules() if isinstance(m, Linear)]
  try:
    yield
  finally:
    for h in handles:
      h.remove()


def peft_passes(model, inputs, task_ids, batch: int, new_tokens: int):
  """Pass functions of PEFT's ``generate``; each returns the tokens [n, new_tokens] in input
  order (the start token dropped)."""
  torch = es.torch_setup()
  order = np.argsort([len(r) for r in inputs], kind="stable")
  batches = []
  for start in range(0, len(order), batch):
    rows = order[start:start + batch]
    enc = es.pad_rows([inputs[i] for i in rows])
    batches.append((rows, enc, (enc > 0).long(), torch.as_tensor(task_ids[rows])))

  def variant(beams):
    @torch.inference_mode()
    def run():
      out = np.zeros((len(inputs), new_tokens), np.int64)
      for rows, enc, mask, tids in batches:
        with peft_task_ids(model, tids):
          seqs = model.generate(input_ids=enc, attention_mask=mask, max_new_tokens=new_tokens,
                                num_beams=beams, do_sample=False, eos_token_id=None)
        if seqs.shape[1] != new_tokens + 1:
          raise RuntimeError(f"generate gave {seqs.shape[1] - 1} tokens, not {new_tokens}")
        out[rows] = seqs[:, 1:].numpy()
      return out
    return run

  return {"peft_greedy": variant(1), f"peft_beam{BEAMS}": variant(BEAMS)}


# ---------------------------------------------------------------------------------------------


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  """Share of equal tokens and of wholly equal sequences of two [n, T] token arrays."""
  return {"tokens": float(np.mean(a == b)), "sequences": float(np.mean(np.all(a == b, -1)))}


def measure(names, shape: str, rounds: int, n_examples=None, batch=None, new_tokens=None):
  """One record per input shape of ``names``: pass seconds of every variant and agreement."""
  ours = es.build_ours(shape, ADAPTERS)
  peft_model = es.build_peft(ours, ADAPTERS)
  records = []
  for name in names:
    spec = INPUTS[name]
    n, b = n_examples or spec.n_examples, batch or spec.batch
    t = new_tokens or spec.new_tokens
    inputs, tids = make_examples(spec, n, es.SHAPES[shape]["vocab_size"], ADAPTERS.n_tasks)
    fns = {**ours_passes(ours, inputs, tids, spec, b, t),
           **peft_passes(peft_model, inputs, tids, b, t)}
    outs = {k: fn() for k, fn in fns.items()}
    for k, o in outs.items():
      if o.shape != (n, t):
        raise RuntimeError(f"{k} gave tokens of shape {o.shape}, not {(n, t)}")
    times = es.interleave(fns, rounds)
    rec = {"inputs": name, "n_examples": n, "batch": b, "new_tokens": t,
           "mean_input_tokens": float(np.mean([len(r) for r in inputs])),
           "pass_s": {k: es.median(v) for k, v in times.items()}, "all_pass_s": times,
           "agreement_with_peft": {
               k: agreement(o, outs[f"peft_beam{BEAMS}" if "beam" in k else "peft_greedy"])
               for k, o in outs.items() if k.startswith("ours")}}
    rec["examples_per_s"] = {k: n / v for k, v in rec["pass_s"].items()}
    rec["tokens_per_s"] = {k: n * t / v for k, v in rec["pass_s"].items()}
    records.append(rec)
    print(name, {k: round(v, 1) for k, v in rec["tokens_per_s"].items()}, flush=True)
  return records


def table(records: list[dict]) -> str:
  """Tokens and examples per second of every variant, ours / PEFT ratios and agreement."""
  variants = list(records[0]["pass_s"])
  lines = ["| inputs | examples x new tokens | batch | mean input tokens | "
           + " | ".join(f"{v} tok/s (ex/s)" for v in variants)
           + " | greedy: ours / peft (buckets) | beam4: ours / peft (buckets)"
           " | same tokens greedy | same tokens beam4 |",
           "|---" * (8 + len(variants)) + "|"]
  for r in records:
    tps, eps, agree = r["tokens_per_s"], r["examples_per_s"], r["agreement_with_peft"]
    ratio = lambda mode: (f"{tps[f'ours_{mode}'] / tps[f'peft_{mode}']:.2f}x "
                          f"({tps[f'ours_{mode}_buckets'] / tps[f'peft_{mode}']:.2f}x)")
    same = lambda k: (f"{100 * agree[k]['tokens']:.0f}% tokens, "
                      f"{100 * agree[k]['sequences']:.0f}% sequences")
    lines.append(
        f"| {r['inputs']} | {r['n_examples']} x {r['new_tokens']} | {r['batch']} | "
        f"{r['mean_input_tokens']:.0f} | "
        + " | ".join(f"{es.fmt(tps[v])} ({es.fmt(eps[v])})" for v in variants)
        + f" | {ratio('greedy')} | {ratio(f'beam{BEAMS}')} | {same('ours_greedy')} | "
        f"{same(f'ours_beam{BEAMS}')} |")
  return "\n".join(lines) + "\n"


def arg_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
  """The options of both generation benchmarks (this one and ``generation_profile``)."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--inputs", nargs="+", choices=sorted(INPUTS), default=list(INPUTS))
  parser.add_argument("--batch", type=int, help="examples per batch (else the shape's own)")
  parser.add_argument("--new_tokens", type=int, help="tokens generated (else the shape's own)")
  parser.add_argument("--rounds", type=int, default=rounds, help="timed calls per variant")
  parser.add_argument("--shape", default="small", choices=sorted(es.SHAPES))
  parser.add_argument("--out", default="docs/bench/generation_speed")
  parser.add_argument("--all_cores", action="store_true",
                      help="do not pin the process to one core (see eval_speed.pin_to_one_core)")
  return parser


def run(args, name: str, measure_fn, table_fn) -> int:
  """Pins the process (unless ``--all_cores``), measures, writes the records and the table."""
  if not args.all_cores:
    es.pin_to_one_core()
  records = measure_fn()
  text = table_fn(records)
  es.write_records(pathlib.Path(args.out), name, records, text)
  print(text)
  return 0


def main(argv=None) -> int:
  parser = arg_parser(__doc__, rounds=2)
  parser.add_argument("--n_examples", type=int, help="examples per input shape (else its own)")
  args = parser.parse_args(argv)
  return run(args, NAME, lambda: measure(args.inputs, args.shape, args.rounds, args.n_examples,
                                         args.batch, args.new_tokens), table)


if __name__ == "__main__":
  raise SystemExit(main())
