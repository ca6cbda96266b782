"""Losses, scoring and decoding on top of the T5 network.

Batches are dicts of arrays with seqio's encoder-decoder feature names plus ``task_ids``:
``encoder_input_tokens`` [B, Li], ``decoder_input_tokens`` [B, Lt] (targets shifted right, starting
with 0), ``decoder_target_tokens`` [B, Lt], optional ``decoder_loss_weights`` [B, Lt] (defaults to
``decoder_target_tokens > 0``) and ``task_ids`` [B]. Pad id 0, EOS id 1.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mhr_jax.network import T5

Array = jax.Array
PAD_ID = 0
EOS_ID = 1


def shift_right(targets: Array, start_id: int = 0) -> Array:
  """Decoder inputs from targets: [B, L] -> [B, L] starting with ``start_id``."""
  shifted = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=start_id)
  return shifted


def loss_weights(batch) -> Array:
  w = batch.get("decoder_loss_weights")
  if w is None:
    w = batch["decoder_target_tokens"] > 0
  return w.astype(jnp.float32)


def token_log_likelihood(logits: Array, targets: Array) -> Array:
  """Per-token log p(target): [B, L, V], [B, L] -> [B, L] (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _smoothed_nll(logits: Array, targets: Array, label_smoothing: float) -> tuple[Array, Array]:
  """Per-token loss and log-sum-exp: nll = lse - (1 - s) x[target] - s mean(x)."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - (1.0 - label_smoothing) * target_logit
  if label_smoothing:
    nll = nll - label_smoothing * jnp.mean(logits, axis=-1)
  return nll, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_nll(logits: Array, targets: Array, label_smoothing: float = 0.0) -> Array:
  """Per-token cross-entropy [B, L] of float32 logits [B, L, V], with label smoothing.

  Equal to ``-((1 - s) log_softmax(x)[target] + s mean(log_softmax(x)))``. Its gradient is written
  out, ``g (softmax(x) - (1 - s) onehot(target) - s / V)``, so the backward pass is one fused
  pass over the [B, L, V] logits; autodiff of log_softmax and take_along_axis instead builds a
  zero-filled one-hot scatter and adds several [B, L, V] arrays.
  """
  return _smoothed_nll(logits, targets, label_smoothing)[0]


def _token_nll_fwd(logits, targets, label_smoothing):
  nll, lse = _smoothed_nll(logits, targets, label_smoothing)
  return nll, (logits, targets, lse)


def _token_nll_bwd(label_smoothing, residuals, g):
  logits, targets, lse = residuals
  vocab = logits.shape[-1]
  onehot = jnp.arange(vocab, dtype=targets.dtype) == targets[..., None]
  target_mass = jnp.where(onehot, 1.0 - label_smoothing, 0.0) + label_smoothing / vocab
  grad = g[..., None] * (jnp.exp(logits - lse[..., None]) - target_mass)
  return grad.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy_loss(
    logits: Array, targets: Array, weights: Array, *, label_smoothing: float = 0.0,
    normalize_by: str = "tokens",
) -> tuple[Array, Array]:
  """Weighted token cross-entropy (``token_nll``).

  Args:
    logits: [B, L, V].
    targets: [B, L] int.
    weights: [B, L], 0 on padding.
    label_smoothing: mass spread uniformly over the vocabulary (0.1 in the Super-NI setting).
    normalize_by: "tokens" divides the summed loss by the number of target tokens (Hugging Face's
      mean); "batch" divides by the batch size (the Super-NI setting of algorithm.md section 5).

  Returns:
    (loss, number of target tokens).
  """
  if normalize_by not in ("tokens", "batch"):
    raise ValueError(f"normalize_by must be 'tokens' or 'batch', got {normalize_by!r}")
  nll = token_nll(logits.astype(jnp.float32), targets, float(label_smoothing))
  total = jnp.sum(nll * weights)
  n_tokens = jnp.sum(weights)
  if normalize_by == "tokens":
    return total / jnp.maximum(n_tokens, 1.0), n_tokens
  return total / targets.shape[0], n_tokens


def forward(model: T5, batch, *, deterministic: bool = True) -> Array:
  """Teacher-forced logits [B, Lt, V] for a batch."""
  return model(
      batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch.get("task_ids"),
      deterministic=deterministic)


def loss_fn(model: T5, batch, *, deterministic: bool = False, label_smoothing: float = 0.0,
            normalize_by: str = "tokens") -> tuple[Array, dict]:
  """Training loss of a batch and a few metrics."""
  logits = forward(model, batch, deterministic=deterministic)
  loss, n_tokens = cross_entropy_loss(
      logits, batch["decoder_target_tokens"], loss_weights(batch),
      label_smoothing=label_smoothing, normalize_by=normalize_by)
  return loss, {"loss": loss, "n_tokens": n_tokens}


def score_targets(model: T5, batch) -> tuple[Array, Array]:
  """Summed target log-likelihood and target length per row: ([B], [B]).

  Rank classification divides the first by the second (length-normalised log-likelihood).
  """
  logits = forward(model, batch, deterministic=True)
  ll = token_log_likelihood(logits, batch["decoder_target_tokens"])
  w = loss_weights(batch)
  return jnp.sum(ll * w, axis=-1), jnp.sum(w, axis=-1)


def greedy_decode(
    model: T5, encoder_input_tokens: Array, task_ids: Optional[Array], max_decode_len: int,
) -> Array:
  """Greedy decoding, stopping each row at EOS (later positions are PAD).

  Returns [B, max_decode_len] generated tokens (without the start token). Each step re-runs the
  decoder over a fixed-size buffer; causal masking makes later (still empty) positions irrelevant.
  """
  b = encoder_input_tokens.shape[0]
  encoded = model.encode(encoder_input_tokens, task_ids, deterministic=True)
  buf = jnp.zeros((b, max_decode_len + 1), jnp.int32)  # position 0 is the start token (0)
  done = jnp.zeros((b,), bool)

  def step(i, carry):
    buf, done = carry
    logits = model.decode(encoded, encoder_input_tokens, buf[:, :-1], task_ids)
    # [B, L, V] -> [B] at position i
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), axis=-1)
    nxt = jnp.where(done, PAD_ID, nxt).astype(jnp.int32)
    buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, i + 1, axis=1)
    return buf, done | (nxt == EOS_ID)

  buf, _ = jax.lax.fori_loop(0, max_decode_len, step, (buf, done))
  return buf[:, 1:]
