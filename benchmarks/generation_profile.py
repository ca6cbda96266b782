"""The pieces of one generation, ours against PEFT + transformers, timed side by side.

    python -m benchmarks.generation_profile [--inputs synthetic] [--rounds 5]

What limits ``generation_speed``'s figures: for one batch of an input shape of
``generation_speed.INPUTS`` (every input at the shape's full length on both sides, so no padding
differs), in turn in one process (``eval_speed.interleave``):

  encode        the encoder on [B, Li]
  step_greedy   one cached decoder step on B rows (half the new tokens already in the cache)
  step_beam4    the same on B * 4 rows
  select_beam4  beam search's bookkeeping per step on B * 4 rows: log-softmax of the logits, the
                best 2 * 4 of 4 * V candidates per example, and the cache reordered to the
                parents (ours the self-attention cache, transformers' ``EncoderDecoderCache``
                both caches)
  generate_greedy / generate_beam4  the whole generation of the batch (ours the evaluation's
                compiled ``_generate``, PEFT ``generate``), no EOS, as ``generation_speed`` runs

Each piece compiled (ours) or in inference mode (PyTorch), same weights, same task-id routing.
A whole generation costs ``encode + new_tokens * (step + select)`` plus the loop's own
overhead per step, which ``generate`` minus the pieces shows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks import eval_speed as es
from benchmarks import generation_speed as gs

NAME = "generation_profile"


def ours_pieces(model, enc, tids, new_tokens: int) -> dict:
  """Our pieces as functions of no argument, each waiting for its result."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mhr_jax import decoding, evaluation

  graphdef, state = nnx.split(model)
  k = gs.BEAMS

  @jax.jit
  def encode(state, enc, tids):
    return nnx.merge(graphdef, state).encode(enc, tids, deterministic=True)

  @jax.jit
  def step(state, cache, tokens, position):
    return decoding.decode_step(nnx.merge(graphdef, state), cache, tokens, position)

  @jax.jit
  def select(logits, scores, cache):
    b, v = scores.shape[0], logits.shape[-1]
    # [B * K, V] -> [B, K, V] -> [B, K * V]
    cand = (jax.nn.log_softmax(logits).reshape(b, k, v) + scores[:, :, None]).reshape(b, k * v)
    # Compiled alone with the gathers below fused into it, XLA:CPU made this top-k a full sort
    # of the K * V candidates (1.5 s instead of 50 ms); in beam_search's loop it stays a top-k
    # (the compiled program's TopK call), so the barrier keeps this piece like the loop's.
    top, idx = jax.lax.optimization_barrier(jax.lax.top_k(cand, 2 * k))
    rows = (idx[:, :k] // v + jnp.arange(b)[:, None] * k).reshape(b * k)
    new = decoding.reorder_cache(cache, rows)  # only the self-attention state is returned
    return top, new.self_k, new.self_v

  enc, tids = jnp.asarray(enc), jnp.asarray(tids)
  encoded = encode(state, enc, tids)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  b, pos = enc.shape[0], jnp.int32(new_tokens // 2)
  caches = {1: decoding.init_cache(model, encoded, enc, tids, new_tokens),
            k: decoding.init_cache(model, rep(encoded), rep(enc), rep(tids), new_tokens)}
  tokens = {n: jnp.full((b * n,), 5, jnp.int32) for n in caches}
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(b * k, model.config.vocab_size)),
                       jnp.float32)
  scores = jnp.zeros((b, k))
  gen = lambda beams: lambda: evaluation._generate(
      graphdef, state, enc, tids, max_decode_len=new_tokens, num_beams=beams,
      eos_id=gs.NO_EOS).block_until_ready()
  return {
      "ours_generate_greedy": gen(1), f"ours_generate_beam{k}": gen(k),
      "ours_encode": lambda: encode(state, enc, tids).block_until_ready(),
      "ours_step_greedy": lambda: step(state, caches[1], tokens[1], pos)[0].block_until_ready(),
      f"ours_step_beam{k}": lambda: step(state, caches[k], tokens[k], pos)[0].block_until_ready(),
      f"ours_select_beam{k}": lambda: select(logits, scores, caches[k])[0].block_until_ready(),
  }


def peft_pieces(peft_model, enc, tids, new_tokens: int) -> dict:
  """PEFT's pieces as functions of no argument (transformers' cache, cropped back each step)."""
  torch = es.torch_setup()
  hf = peft_model.base_model.model
  k = gs.BEAMS
  enc, tids = torch.as_tensor(enc, dtype=torch.long), torch.as_tensor(tids)
  mask = (enc > 0).long()
  half = new_tokens // 2

  def with_ids(rows, fn):
    """``fn`` run with the task ids of ``rows`` examples' beams routed to every adapter."""
    ids = tids.repeat_interleave(rows // len(tids))

    @torch.inference_mode()
    def run():
      with gs.peft_task_ids(peft_model, ids):
        return fn()
    return run

  encode = lambda: hf.get_encoder()(input_ids=enc, attention_mask=mask)[0]
  hidden = with_ids(len(tids), encode)()
  generate = lambda beams: with_ids(len(tids), lambda: peft_model.generate(
      input_ids=enc, attention_mask=mask, max_new_tokens=new_tokens, num_beams=beams,
      do_sample=False, eos_token_id=None))
  pieces = {"peft_generate_greedy": generate(1), f"peft_generate_beam{k}": generate(k),
            "peft_encode": with_ids(len(tids), encode)}
  for n, name in ((1, "greedy"), (k, f"beam{k}")):
    h, m = hidden.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    prefix = torch.full((h.shape[0], half), 5)
    cache = with_ids(h.shape[0], lambda: hf(encoder_outputs=(h,), attention_mask=m,
                                            decoder_input_ids=prefix,
                                            use_cache=True).past_key_values)()

    def step(h=h, m=m, cache=cache, prefix=prefix):
      out = hf(encoder_outputs=(h,), attention_mask=m, decoder_input_ids=prefix[:, :1],
               past_key_values=cache, use_cache=True)
      cache.crop(-1)  # back to the prefix for the next call
      return out.logits
    pieces[f"peft_step_{name}"] = with_ids(h.shape[0], step)
  b, v = len(tids), hf.config.vocab_size
  logits = torch.randn(b * k, v)
  scores = torch.zeros(b, k)

  @torch.inference_mode()
  def select():
    # [B * K, V] -> [B, K, V] -> [B, K * V]
    cand = (torch.log_softmax(logits, -1).view(b, k, v) + scores[:, :, None]).view(b, k * v)
    top, idx = torch.topk(cand, 2 * k)
    cache.reorder_cache((idx[:, :k] // v + torch.arange(b)[:, None] * k).view(-1))
    return top
  pieces[f"peft_select_beam{k}"] = select
  return pieces


def measure(names, shape: str, rounds: int, batch=None, new_tokens=None) -> list[dict]:
  """One record per input shape: median seconds of every piece, ours and PEFT."""
  ours = es.build_ours(shape, gs.ADAPTERS)
  peft_model = es.build_peft(ours, gs.ADAPTERS)
  records = []
  for name in names:
    spec = gs.INPUTS[name]
    b, t = batch or spec.batch, new_tokens or spec.new_tokens
    full = dataclasses.replace(spec, min_input=spec.max_input)
    inputs, tids = gs.make_examples(full, b, es.SHAPES[shape]["vocab_size"], gs.ADAPTERS.n_tasks)
    enc = np.asarray(inputs, np.int32)
    fns = {**ours_pieces(ours, enc, tids, t), **peft_pieces(peft_model, enc, tids, t)}
    times = es.interleave(fns, rounds)
    rec = {"inputs": name, "batch": b, "input_tokens": spec.max_input, "new_tokens": t,
           "piece_s": {k: es.median(v) for k, v in times.items()}, "all_piece_s": times}
    records.append(rec)
    print(name, {k: round(v * 1e3, 2) for k, v in rec["piece_s"].items()}, flush=True)
  return records


def table(records: list[dict]) -> str:
  """Milliseconds of every piece, ours and PEFT, and PEFT / ours."""
  pieces = [k[len("ours_"):] for k in records[0]["piece_s"] if k.startswith("ours_")]
  lines = ["| inputs | batch x input tokens | new tokens | piece | ours ms | PEFT ms"
           " | PEFT / ours |",
           "|---|---|---|---|---|---|---|"]
  for r in records:
    for p in pieces:
      o, t = r["piece_s"][f"ours_{p}"], r["piece_s"][f"peft_{p}"]
      lines.append(f"| {r['inputs']} | {r['batch']} x {r['input_tokens']} | {r['new_tokens']} | "
                   f"{p} | {es.fmt(o * 1e3)} | {es.fmt(t * 1e3)} | {t / o:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = gs.arg_parser(__doc__, rounds=5).parse_args(argv)
  return gs.run(args, NAME, lambda: measure(args.inputs, args.shape, args.rounds, args.batch,
                                            args.new_tokens), table)


if __name__ == "__main__":
  raise SystemExit(main())
