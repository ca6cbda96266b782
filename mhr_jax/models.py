"""Losses and scoring on top of the T5 network (decoding is in ``decoding``).

Batches are dicts of arrays with seqio's encoder-decoder feature names plus ``task_ids``:
``encoder_input_tokens`` [B, Li], ``decoder_input_tokens`` [B, Lt] (targets shifted right, starting
with 0), ``decoder_target_tokens`` [B, Lt], optional ``decoder_loss_weights`` [B, Lt] (defaults to
``decoder_target_tokens > 0``) and ``task_ids`` [B]. Pad id 0, EOS id 1 (``PAD_ID``, ``EOS_ID``,
defined here only).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from mhr_jax.network import T5

Array = jax.Array
PAD_ID = 0  # padding, and the decoder's start token
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


# ----------------------------------------------------------------------------------------------
# T-Few losses of multiple-choice fine-tuning (Liu et al. 2022, "Few-Shot Parameter-Efficient
# Fine-Tuning is Better and Cheaper than In-Context Learning", section 3.2; the MHR authors'
# ``mttl/models/t0_encoder_decoder.py``, ``training_step``, with ``mc_loss``, ``length_norm`` and
# ``unlikely_loss`` all 1 in every ``projects/mhr/configs/t0/<dataset>.json``).


def tfew_losses(
    logits: Array, targets: Array, weights: Array, is_correct: Array, n_choices: int, *,
    length_norm: float = 1.0, mc_weight: float = 1.0, unlikely_weight: float = 1.0,
) -> tuple[Array, dict]:
  """The T-Few loss of a multiple-choice batch: LM + ``mc_weight`` MC + ``unlikely_weight`` UL.

  Rows are example-major (``choices.multiple_choice_rows``): row ``b * n_choices + c`` holds answer
  choice c of example b as its target; a padded choice has all-zero ``weights``. With s_bc the
  summed token NLL of choice c divided by its length ** ``length_norm``:

  - LM: token cross-entropy of the gold choices, averaged over their tokens;
  - MC: cross-entropy of softmax(-s_b) against the gold choice, averaged over examples;
  - UL: -log(1 - p + 0.01) over every token of the wrong choices (p its probability under
    teacher forcing), averaged over those tokens.

  The authors' UL adds -log(1.01) for every masked position (padding and gold rows) to the sum
  before dividing by the number of wrong-choice tokens: a constant with no gradient, left out
  here, so our value is theirs plus 0.00995 * n_masked / n_wrong_tokens.

  Args:
    logits: [B*C, L, V] decoder logits.
    targets: [B*C, L] choice tokens (EOS included, 0-padded).
    weights: [B*C, L] 1 on real target tokens.
    is_correct: [B*C] 1 on each example's gold choice.
    n_choices: C.
    length_norm: exponent of the length normalisation (0: summed NLL).
    mc_weight, unlikely_weight: weights of the MC and UL terms.

  Returns:
    (loss, metrics with ``loss``, ``lm_loss``, ``mc_loss``, ``unlikely_loss``, ``accuracy`` (of
    picking the lowest s_bc), ``n_tokens`` (gold tokens)).
  """
  n_rows, length = targets.shape
  if n_rows % n_choices:
    raise ValueError(f"{n_rows} rows are not a whole number of examples of {n_choices} choices")
  b = n_rows // n_choices
  nll = token_nll(logits.astype(jnp.float32), targets, 0.0).reshape(b, n_choices, length)
  w = weights.astype(jnp.float32).reshape(b, n_choices, length)  # [B*C, L] -> [B, C, L]
  gold = is_correct.reshape(b, n_choices) > 0  # [B*C] -> [B, C]
  choice_len = jnp.sum(w, axis=-1)  # [B, C]
  real = choice_len > 0
  scores = jnp.sum(nll * w, axis=-1) / jnp.maximum(choice_len, 1.0) ** length_norm  # [B, C]

  gold_w = w * gold[..., None]
  n_gold = jnp.sum(gold_w)
  lm = jnp.sum(nll * gold_w) / jnp.maximum(n_gold, 1.0)

  logit = jnp.where(real, -scores, -jnp.inf)
  per_example = jax.nn.logsumexp(logit, axis=-1) - jnp.sum(jnp.where(gold, logit, 0.0), axis=-1)
  has_gold = jnp.any(gold, axis=-1)
  mc = jnp.sum(jnp.where(has_gold, per_example, 0.0)) / jnp.maximum(jnp.sum(has_gold), 1)

  wrong_w = w * (~gold)[..., None]
  unlikely = -jnp.log(1.0 - jnp.exp(-nll) + 1e-2)
  ul = jnp.sum(unlikely * wrong_w) / jnp.maximum(jnp.sum(wrong_w), 1.0)

  loss = lm + mc_weight * mc + unlikely_weight * ul
  pred = jnp.argmin(jnp.where(real, scores, jnp.inf), axis=-1)
  correct = jnp.take_along_axis(gold, pred[:, None], axis=-1)[:, 0]
  accuracy = jnp.sum(correct & has_gold) / jnp.maximum(jnp.sum(has_gold), 1)
  return loss, {"loss": loss, "lm_loss": lm, "mc_loss": mc, "unlikely_loss": ul,
                "accuracy": accuracy, "n_tokens": n_gold}


def tfew_loss_fn(model: T5, batch, n_choices: int, *, deterministic: bool = False,
                 length_norm: float = 1.0, mc_weight: float = 1.0, unlikely_weight: float = 1.0
                 ) -> tuple[Array, dict]:
  """`tfew_losses` of a multiple-choice batch (``choices.multiple_choice_rows`` layout).

  The encoder runs once per example, on the first of its ``n_choices`` rows, and its output is
  repeated for every choice, as in the authors' ``training_step`` (one dropout mask per example
  for all its choices); the decoder runs on every row.
  """
  tokens = batch["encoder_input_tokens"]
  ids = batch.get("task_ids")
  encoded = model.encode(tokens[::n_choices], None if ids is None else ids[::n_choices],
                         deterministic=deterministic)  # [B, Li, E]
  encoded = jnp.repeat(encoded, n_choices, axis=0)  # [B, Li, E] -> [B*C, Li, E]
  logits = model.decode(encoded, tokens, batch["decoder_input_tokens"], ids,
                        deterministic=deterministic)
  return tfew_losses(logits, batch["decoder_target_tokens"], loss_weights(batch),
                     batch["is_correct"], n_choices, length_norm=length_norm,
                     mc_weight=mc_weight, unlikely_weight=unlikely_weight)


def score_targets(model: T5, batch) -> tuple[Array, Array]:
  """Summed target log-likelihood and target length per row: ([B], [B]).

  Rank classification divides the first by the second (length-normalised log-likelihood).
  """
  logits = forward(model, batch, deterministic=True)
  ll = token_log_likelihood(logits, batch["decoder_target_tokens"])
  w = loss_weights(batch)
  return jnp.sum(ll * w, axis=-1), jnp.sum(w, axis=-1)
