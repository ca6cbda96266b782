"""Decoding for evaluation: greedy and beam search with a KV cache, and choice scoring.

Both searches run the encoder once per example. Beam search computes each cross-attention's keys
and values once per example too, then repeats them, the encoder mask and the task ids per beam
(example ``b``'s beams are rows ``b * num_beams + k``), so every beam of an example goes through
the adapters with that example's task id.

The cached decoder reuses the T5's own modules and parameters, calling each dense layer through
``Dense.__call__`` with the task ids, so adapters act exactly as in ``T5.decode``. Self-attention
keys and values are written into a fixed ``[N, H, max_decode_len, K]`` buffer one position per
step; cross-attention keys and values are computed once from the encoder outputs. A step then
costs O(max_decode_len) instead of re-running the decoder over the whole prefix.

``score_choices`` is rank classification's counterpart: it scores every answer choice of an
input against one encoder pass, with each cross-attention's keys and values computed once per input.

Token conventions follow ``models`` (``PAD_ID``, ``EOS_ID``): the decoder starts from PAD (0),
EOS is 1, and positions after a hypothesis' EOS are PAD. ``greedy_decode`` and ``beam_search``
are the project's only decoders.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from mhr_jax.layers import Attention
from mhr_jax.models import EOS_ID, PAD_ID
from mhr_jax.network import NEG_INF, T5

Array = jax.Array
_NEG = -jnp.inf  # score of an empty finished slot or a masked candidate


class DecodeCache(NamedTuple):
  """State of the incremental decoder for N = batch (x beams) rows.

  Attributes:
    self_k: per decoder layer, self-attention keys [N, H, max_decode_len, K]; rows hold positions
      already decoded, later positions are zeros (masked). Heads come before positions so that the
      attention reads the cache as it lies (XLA:CPU otherwise transposes the whole cache every
      step).
    self_v: per decoder layer, self-attention values, like ``self_k``.
    cross_k: per decoder layer, cross-attention keys of the encoder outputs [N, H, Li, K].
    cross_v: per decoder layer, cross-attention values [N, H, Li, K].
    cross_bias: additive mask of encoder padding [N, 1, 1, Li].
    task_ids: [N] int32, or None for a model without adapters.
  """

  self_k: tuple[Array, ...]
  self_v: tuple[Array, ...]
  cross_k: tuple[Array, ...]
  cross_v: tuple[Array, ...]
  cross_bias: Array
  task_ids: Optional[Array]


def _heads(att: Attention, x: Array) -> Array:
  """[N, L, H*K] -> [N, H, L, K]."""
  n, length, _ = x.shape
  return x.reshape(n, length, att.num_heads, att.d_kv).transpose(0, 2, 1, 3)


def _attend(att: Attention, q: Array, k: Array, v: Array, bias: Array, task_ids) -> Array:
  """The attention of ``Attention.__call__`` (no dropout) from projected queries, keys, values."""
  n, _, lq, _ = q.shape
  # [N, H, Lq, K] x [N, H, Lk, K] -> [N, H, Lq, Lk]
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores + bias.astype(jnp.float32)
  weights = jax.nn.softmax(scores, axis=-1).astype(att.dtype)
  # [N, H, Lq, Lk] x [N, H, Lk, K] -> [N, Lq, H, K] -> [N, Lq, H*K]
  out = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(n, lq, att.num_heads * att.d_kv)
  return att.o(out, task_ids, deterministic=True)


def init_cache(
    model: T5, encoded: Array, encoder_input_tokens: Array, task_ids: Optional[Array],
    max_decode_len: int,
) -> DecodeCache:
  """An empty cache for decoding ``max_decode_len`` positions.

  Args:
    model: the T5 whose decoder is run.
    encoded: encoder outputs [N, Li, E] (already repeated per beam for beam search).
    encoder_input_tokens: [N, Li], 0 = padding.
    task_ids: [N] int32 or None.
    max_decode_len: number of decoder positions (the first holds the start token).
  """
  dec = model.decoder
  n = encoded.shape[0]
  self_k, self_v, cross_k, cross_v = [], [], [], []
  for i in range(dec.num_layers):
    att = getattr(dec, f"layers_{i}").encoder_decoder_attention
    cross_k.append(_heads(att, att.k(encoded, task_ids, deterministic=True)))
    cross_v.append(_heads(att, att.v(encoded, task_ids, deterministic=True)))
    shape = (n, att.num_heads, max_decode_len, att.d_kv)
    self_k.append(jnp.zeros(shape, att.dtype))
    self_v.append(jnp.zeros(shape, att.dtype))
  # [N, Li] -> [N, 1, 1, Li]
  cross_bias = jnp.where(encoder_input_tokens > 0, 0.0, NEG_INF)[:, None, None, :]
  return DecodeCache(
      tuple(self_k), tuple(self_v), tuple(cross_k), tuple(cross_v),
      cross_bias.astype(jnp.float32), task_ids)


def decode_step(
    model: T5, cache: DecodeCache, tokens: Array, position,
) -> tuple[Array, DecodeCache]:
  """Runs the decoder on one position for every row, reading and extending the cache.

  Args:
    model: the T5 the cache was built for.
    cache: keys and values of positions ``< position``.
    tokens: [N] decoder input tokens at ``position``.
    position: int32 scalar (may be traced), the decoder position of ``tokens``.

  Returns:
    (logits [N, V] float32 for the next token, cache with ``position`` filled in).
  """
  dec = model.decoder
  task_ids = cache.task_ids
  kw = dict(deterministic=True)
  max_len = cache.self_k[0].shape[2]
  # [N] -> [N, 1, E]
  y = model.token_embedder(tokens[:, None])
  causal = jnp.where(jnp.arange(max_len) <= position, 0.0, NEG_INF)
  # [1, H, 1, max_len] + [max_len] -> [1, H, 1, max_len]
  self_bias = dec.relpos_bias(1, max_len, q_offset=position) + causal
  self_k, self_v = list(cache.self_k), list(cache.self_v)
  for i in range(dec.num_layers):
    layer = getattr(dec, f"layers_{i}")
    att = layer.self_attention
    h = layer.pre_self_attention_layer_norm(y)
    q = _heads(att, att.q(h, task_ids, **kw))
    self_k[i] = jax.lax.dynamic_update_slice_in_dim(
        self_k[i], _heads(att, att.k(h, task_ids, **kw)).astype(self_k[i].dtype), position, axis=2)
    self_v[i] = jax.lax.dynamic_update_slice_in_dim(
        self_v[i], _heads(att, att.v(h, task_ids, **kw)).astype(self_v[i].dtype), position, axis=2)
    y = y + _attend(att, q, self_k[i], self_v[i], self_bias, task_ids)
    att = layer.encoder_decoder_attention
    h = layer.pre_cross_attention_layer_norm(y)
    q = _heads(att, att.q(h, task_ids, **kw))
    y = y + _attend(att, q, cache.cross_k[i], cache.cross_v[i], cache.cross_bias, task_ids)
    y = y + layer.mlp(layer.pre_mlp_layer_norm(y), task_ids, **kw)
  cache = cache._replace(self_k=tuple(self_k), self_v=tuple(self_v))
  # [N, 1, V] -> [N, V]
  return _output_logits(model, y)[:, 0], cache


def reorder_cache(cache: DecodeCache, rows: Array) -> DecodeCache:
  """The self-attention state of rows ``rows`` [N] (beam search's parent hypotheses).

  Cross-attention state, the mask and the task ids are per example, shared by its beams, and
  parents are always beams of the same example, so they stay as they are.
  """
  take = lambda x: jnp.take(x, rows, axis=0, mode="clip")  # rows are in range: no fill mask
  return cache._replace(
      self_k=tuple(map(take, cache.self_k)), self_v=tuple(map(take, cache.self_v)))


class _Decoder:
  """Next-token logits for rows of a [N, max_decode_len + 1] token buffer, cached or not.

  The encoder outputs, tokens and task ids are per example ([B, ...]); with ``beams`` > 1 the
  decoder's rows are example b's beams ``b * beams + k`` (N = B * beams). The cross-attention keys
  and values are computed once per example and repeated per beam: beams share them.
  """

  def __init__(self, model: T5, encoded, encoder_input_tokens, task_ids, max_decode_len, use_cache,
               beams: int = 1):
    self.model = model
    self.encoded = encoded
    self.encoder_input_tokens = encoder_input_tokens
    self.task_ids = task_ids
    self.max_decode_len = max_decode_len
    self.use_cache = use_cache
    self.beams = beams

  def _per_beam(self, tree):
    """[B, ...] leaves -> [B * beams, ...], example b's rows first."""
    if self.beams == 1:
      return tree
    return jax.tree.map(lambda x: jnp.repeat(x, self.beams, axis=0), tree)

  def init(self):
    if not self.use_cache:
      return ()
    return self._per_beam(init_cache(
        self.model, self.encoded, self.encoder_input_tokens, self.task_ids, self.max_decode_len))

  def __call__(self, state, buf: Array, i) -> tuple[Array, object]:
    """Logits [N, V] for position ``i + 1`` given ``buf[:, :i + 1]``; returns the new state."""
    if self.use_cache:
      return decode_step(self.model, state, buf[:, i], i)
    # Re-runs the decoder over the whole fixed-size buffer; causal masking ignores later slots.
    encoded, tokens, task_ids = self._per_beam(
        (self.encoded, self.encoder_input_tokens, self.task_ids))
    logits = self.model.decode(encoded, tokens, buf[:, :self.max_decode_len], task_ids)
    # [N, L, V] -> [N, V]
    return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), state

  def reorder(self, state, rows: Array):
    return reorder_cache(state, rows) if self.use_cache else state


@functools.partial(nnx.jit, static_argnames=("max_decode_len", "use_cache", "eos_id"))
def greedy_decode(
    model: T5, encoder_input_tokens: Array, task_ids: Optional[Array], max_decode_len: int, *,
    use_cache: bool = True, eos_id: int = EOS_ID,
) -> Array:
  """Greedy decoding, each row stopping at EOS (later positions PAD), the loop once all have;
  compiled.

  Gives the tokens of ``beam_search`` with one beam; with ``use_cache=False`` every step re-runs
  the teacher-forced decoder over the whole buffer (the reference the cache is tested against).

  Args:
    model: a T5.
    encoder_input_tokens: [B, Li], 0 = padding.
    task_ids: [B] int32 adapter task ids, or None.
    max_decode_len: number of tokens generated (static).
    use_cache: decode incrementally with a KV cache (else re-run the decoder each step).
    eos_id: the token that ends a row (static); an id outside the vocabulary (e.g. -1) ends
      none, so every row runs ``max_decode_len`` steps (HF's ``generate(eos_token_id=None)``).

  Returns:
    [B, max_decode_len] tokens, without the start token.
  """
  b = encoder_input_tokens.shape[0]
  encoded = model.encode(encoder_input_tokens, task_ids, deterministic=True)
  step_fn = _Decoder(model, encoded, encoder_input_tokens, task_ids, max_decode_len, use_cache)
  buf = jnp.zeros((b, max_decode_len + 1), jnp.int32)  # position 0 is the start token

  def step(carry):
    i, buf, done, state = carry
    logits, state = step_fn(state, buf, i)
    nxt = jnp.where(done, PAD_ID, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, i + 1, axis=1)
    return i + 1, buf, done | (nxt == eos_id), state

  def running(carry):  # stop once every row has ended: the rest of the buffer stays PAD
    i, _, done, _ = carry
    return (i < max_decode_len) & ~jnp.all(done)

  carry = (jnp.zeros((), jnp.int32), buf, jnp.zeros((b,), bool), step_fn.init())
  _, buf, _, _ = jax.lax.while_loop(running, step, carry)
  return buf[:, 1:]


class _BeamState(NamedTuple):
  """Loop state of ``beam_search``; sequences hold the start token at position 0."""

  step: Array  # int32 scalar: tokens generated so far
  running_seqs: Array  # [B, K, T + 1]
  running_scores: Array  # [B, K] summed log-probabilities, best first
  finished_seqs: Array  # [B, K, T + 1]
  finished_scores: Array  # [B, K] length-penalised scores, best first; -inf for empty slots
  finished_flags: Array  # [B, K] bool, slot holds a finished hypothesis
  open: Array  # [B] bool: running beams may still beat a finished one (HF's early-stop heuristic)
  decoder_state: object  # DecodeCache of the B * K running rows, or () without a cache


def _gather_beams(x: Array, idx: Array) -> Array:
  """x [B, M, ...], idx [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    model: T5, encoder_input_tokens: Array, task_ids: Optional[Array], *, num_beams: int,
    max_decode_len: int, length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
    eos_id: int = EOS_ID, use_cache: bool = True,
) -> tuple[Array, Array]:
  """Beam search with the semantics of Hugging Face's ``generate(num_beams=...)``; compiled.

  The search follows transformers' vectorised beam search (``GenerationMixin._beam_search``):

  * Each step ranks all ``num_beams * V`` continuations of the running beams by summed
    log-probability and keeps the best ``2 * num_beams``. Of those, the ones among the best
    ``num_beams`` that end in ``eos_id`` (or reach ``max_decode_len``) are offered to the finished
    set, scored ``sum logprob / length ** length_penalty`` with ``length`` the number of generated
    tokens including EOS; the finished set keeps the ``num_beams`` best. The best ``num_beams``
    continuations that did not end go on running.
  * ``early_stopping`` decides when an example stops accepting finished hypotheses:
    ``True``: as soon as it has ``num_beams`` of them. ``False`` (HF's default): when the best
    running beam, scored at its current length, cannot beat the worst finished one. ``"never"``:
    as ``False`` but, for ``length_penalty > 0``, scoring the running beam at ``max_decode_len``
    (the canonical beam search; it only stops when no running beam can improve).
  * Hypotheses still running at ``max_decode_len`` are finished there, without EOS.

  The loop stops when every example has stopped, or after ``max_decode_len`` steps.

  The length penalty is HF's ``length ** alpha``, not the GNMT form ``((5 + length) / 6) ** alpha``
  of t5x's ``decoding.beam_search``, so scores and hypotheses match ``generate``.

  Args:
    model: a T5 (with or without adapters).
    encoder_input_tokens: [B, Li], 0 = padding.
    task_ids: [B] int32 adapter task ids, or None; every beam of example b uses task_ids[b].
    num_beams: beams per example (static).
    max_decode_len: most tokens generated per hypothesis (static), HF's ``max_new_tokens``.
    length_penalty: exponent ``alpha`` of the length in the finished score (may be traced).
    early_stopping: ``True``, ``False`` or ``"never"`` as above (a Python value, not traced).
    eos_id: end-of-sequence token (static); an id outside the vocabulary (e.g. -1) ends no
      hypothesis before ``max_decode_len`` (HF's ``generate(eos_token_id=None)``).
    use_cache: decode incrementally with a KV cache (else re-run the decoder each step).

  Returns:
    (tokens [B, num_beams, max_decode_len] without the start token, PAD after EOS;
     scores [B, num_beams] length-penalised), best first.
  """
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  if num_beams < 1 or max_decode_len < 1:
    raise ValueError(
        f"need num_beams >= 1 and max_decode_len >= 1, got {num_beams} and {max_decode_len}")
  # Penalty and stopping rule are traced, so one compilation serves every setting.
  return _beam_search(
      model, encoder_input_tokens, task_ids, jnp.float32(length_penalty),
      jnp.bool_(early_stopping is True), jnp.bool_(early_stopping == "never"),
      num_beams=num_beams, max_decode_len=max_decode_len, eos_id=eos_id, use_cache=use_cache)


@functools.partial(
    nnx.jit, static_argnames=("num_beams", "max_decode_len", "eos_id", "use_cache"))
def _beam_search(
    model: T5, encoder_input_tokens: Array, task_ids: Optional[Array], length_penalty: Array,
    stop_when_full: Array, never: Array, *, num_beams: int, max_decode_len: int, eos_id: int,
    use_cache: bool,
) -> tuple[Array, Array]:
  """``beam_search`` with ``early_stopping`` as flags: True sets stop_when_full, "never" never.

  Long because the loop's condition and body are closures over the static sizes, the decoder
  and the stopping flags; as separate functions each would take all of them as arguments.
  """
  b = encoder_input_tokens.shape[0]
  k, t = num_beams, max_decode_len
  encoded = model.encode(encoder_input_tokens, task_ids, deterministic=True)
  # Example b's beams are decoder rows b * K + j.
  step_fn = _Decoder(model, encoded, encoder_input_tokens, task_ids, t, use_cache, beams=k)

  seqs = jnp.zeros((b, k, t + 1), jnp.int32)
  # Only beam 0 is live at the start, so the first step does not pick the same token K times.
  running_scores = jnp.where(jnp.arange(k) == 0, 0.0, _NEG) * jnp.ones((b, 1))
  init = _BeamState(
      step=jnp.zeros((), jnp.int32), running_seqs=seqs, running_scores=running_scores,
      finished_seqs=seqs, finished_scores=jnp.full((b, k), _NEG), finished_flags=jnp.zeros(
          (b, k), bool), open=jnp.ones((b,), bool), decoder_state=step_fn.init())

  def accepting(s: _BeamState) -> Array:
    """[B] bool: the example may still add finished hypotheses."""
    full = jnp.all(s.finished_flags, axis=-1) & stop_when_full
    return s.open & ~full

  def cond(s: _BeamState):
    return (s.step < t) & jnp.any(accepting(s))

  def body(s: _BeamState) -> _BeamState:
    i = s.step
    # [B, K, T + 1] -> [B * K, T + 1]
    logits, dstate = step_fn(s.decoder_state, s.running_seqs.reshape(b * k, t + 1), i)
    v = logits.shape[-1]
    # [B * K, V] -> [B, K, V] -> [B, K * V]
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, v)
    cand = (logp + s.running_scores[:, :, None]).reshape(b, k * v)
    top_scores, top_idx = jax.lax.top_k(cand, 2 * k)  # [B, 2K], best first
    parent, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    top_seqs = _gather_beams(s.running_seqs, parent)  # [B, 2K, T + 1]
    top_seqs = jax.lax.dynamic_update_index_in_dim(top_seqs, token, i + 1, axis=2)
    ended = (token == eos_id) | (i + 1 >= t)  # [B, 2K]

    # The best K continuations that did not end keep running.
    run_scores, run_idx = jax.lax.top_k(jnp.where(ended, _NEG, top_scores), k)
    running_seqs = _gather_beams(top_seqs, run_idx)
    # [B, K] parent beams -> [B * K] rows of the flat decoder state
    rows = (_gather_beams(parent, run_idx) + jnp.arange(b)[:, None] * k).reshape(b * k)
    dstate = step_fn.reorder(dstate, rows)

    # Ended continuations among the best K join the finished set if they rank in its best K.
    new = ended & (jnp.arange(2 * k) < k) & accepting(s)[:, None]
    new_scores = jnp.where(new, top_scores / (i + 1.0) ** length_penalty, _NEG)
    merged_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)  # [B, 3K]
    fin_scores, fin_idx = jax.lax.top_k(merged_scores, k)
    fin_seqs = _gather_beams(jnp.concatenate([s.finished_seqs, top_seqs], axis=1), fin_idx)
    fin_flags = _gather_beams(jnp.concatenate([s.finished_flags, new], axis=1), fin_idx)

    # HF's early-stop heuristic: can the best running beam still beat the worst finished one?
    best_len = jnp.where(never & (length_penalty > 0.0), float(t), i + 1.0)
    best_running = run_scores[:, 0] / best_len ** length_penalty
    worst_finished = jnp.where(jnp.all(fin_flags, axis=-1), jnp.min(fin_scores, axis=-1), _NEG)
    still_open = s.open & (best_running > worst_finished)
    return _BeamState(i + 1, running_seqs, run_scores, fin_seqs, fin_scores, fin_flags,
                      still_open, dstate)

  final = jax.lax.while_loop(cond, body, init)
  return final.finished_seqs[:, :, 1:], final.finished_scores


def _output_logits(model: T5, y: Array) -> Array:
  """The decoder's final norm, output scaling and head: [N, L, E] -> [N, L, V] float32."""
  dec = model.decoder
  y = dec.decoder_norm(y)
  if dec.scale is not None:
    y = y * dec.scale
  logits = model.token_embedder.attend(y) if dec.tied else dec.logits_dense(y)
  return logits.astype(jnp.float32)


@nnx.jit
def score_choices(
    model: T5, encoder_input_tokens: Array, task_ids: Optional[Array], choice_tokens: Array,
) -> tuple[Array, Array]:
  """Rank classification with one encoder pass per input: every choice's log-likelihood.

  Equal to running the whole model on every (input, choice) pair (``models.score_targets`` on the
  input repeated once per choice), but the encoder runs once per input and each cross-attention's
  keys and values are computed once per input: the decoder holds the C choices of an input side
  by side as one sequence of C * Lt positions, which attend the shared encoder output together
  (attention is independent per query), while self-attention runs per choice. For short choices
  after a long input this removes most of the repeated path's work.

  Args:
    model: a T5 (with or without adapters).
    encoder_input_tokens: [B, Li], 0 = padding.
    task_ids: [B] int32, or None; every choice of input b uses task_ids[b].
    choice_tokens: [B, C, Lt] target tokens of each choice, ending with EOS, 0-padded. A choice
      of all padding scores 0 over 0 tokens.

  Returns:
    (summed log-likelihood [B, C] float32, number of target tokens [B, C] float32).
  """
  b, c, lt = choice_tokens.shape
  kw = dict(deterministic=True)
  encoded = model.encode(encoder_input_tokens, task_ids, **kw)
  dec = model.decoder
  # [B, C, Lt] -> [B * C, Lt]; decoder inputs are the targets shifted right after a 0.
  targets = choice_tokens.reshape(b * c, lt)
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  # [B * C, Lt, E] -> [B, C * Lt, E]
  y = model.token_embedder(decoder_inputs).reshape(b, c * lt, -1)
  causal = jnp.tril(jnp.ones((lt, lt), dtype=bool))
  # [1, H, Lt, Lt]
  self_bias = dec.relpos_bias(lt, lt) + jnp.where(causal, 0.0, NEG_INF)[None, None]
  # [B, Li] -> [B, 1, 1, Li]
  cross_bias = jnp.where(encoder_input_tokens > 0, 0.0, NEG_INF)[:, None, None, :]
  row_ids = None if task_ids is None else jnp.repeat(task_ids, c)  # [B * C]
  for i in range(dec.num_layers):
    layer = getattr(dec, f"layers_{i}")
    # Self-attention per choice: [B, C * Lt, E] -> [B * C, Lt, E] and back.
    h = layer.pre_self_attention_layer_norm(y).reshape(b * c, lt, -1)
    h = layer.self_attention(h, h, self_bias, row_ids, **kw)
    y = y + h.reshape(b, c * lt, -1)
    h = layer.pre_cross_attention_layer_norm(y)
    y = y + layer.encoder_decoder_attention(h, encoded, cross_bias, task_ids, **kw)
    y = y + layer.mlp(layer.pre_mlp_layer_norm(y), task_ids, **kw)
  # [B, C * Lt, V] -> [B * C, Lt, V]
  logits = _output_logits(model, y).reshape(b * c, lt, -1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  # [B * C, Lt, V] -> [B * C, Lt]
  token_ll = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = (targets > 0).astype(jnp.float32)
  # [B * C] -> [B, C]
  return ((token_ll * weights).sum(-1).reshape(b, c), weights.sum(-1).reshape(b, c))
