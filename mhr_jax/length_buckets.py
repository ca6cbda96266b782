"""Length buckets: a padded batch cut to the smallest of a few lengths that holds it.

Batches come padded to the fixed feature lengths (``data.BatchIterator``, ``seqio.Evaluator``),
while real data (T0's few-shot splits, its validation sets) is mostly much shorter. Cutting each
batch to the smallest configured length that holds its longest sequence drops padding only, so
results do not change, and one compiled program per bucket serves every batch
(``DataConfig.length_buckets``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mhr_jax import errors

# Which task feature's length each model feature has.
_FEATURE_OF = {
  "encoder_input_tokens": "inputs",
  "decoder_input_tokens": "targets",
  "decoder_target_tokens": "targets",
  "decoder_loss_weights": "targets",
}


def check(
  buckets: Mapping[str, Sequence[int]], feature_lengths: Mapping[str, int]
) -> dict[str, tuple[int, ...]]:
  """Validated length buckets: ``{"inputs": (64, 128), ...}`` -> sorted tuples.

  A bucket is a padded length a batch may be cut to; the feature length is always the last
  bucket, so a feature without buckets keeps its fixed length.

  Raises:
    errors.ConfigError: naming every unknown feature and every length that is not a positive integer at
      most the feature length.
  """
  problems, out = [], {}
  for feature, lengths in buckets.items():
    if feature not in feature_lengths:
      problems.append(f"{feature!r} is not a feature ({sorted(feature_lengths)})")
      continue
    limit = feature_lengths[feature]
    bad = [n for n in lengths if not isinstance(n, int) or not 0 < n <= limit]
    if bad:
      problems.append(f"{feature!r} buckets {bad} are not integers in [1, {limit}]")
    out[feature] = tuple(sorted(set(n for n in lengths if n not in bad)))
  if problems:
    raise errors.ConfigError("Bad length buckets: " + "; ".join(problems))
  return out


def bucket_length(length: int, buckets: Sequence[int], limit: int) -> int:
  """The smallest bucket that holds ``length`` tokens; ``limit`` (the feature length) if none."""
  return min([b for b in buckets if b >= length] or [limit])


def real_length(tokens: np.ndarray) -> int:
  """Position after the last non-padding token in any row of ``tokens`` [..., L]."""
  nonzero = np.nonzero(np.any(tokens.reshape(-1, tokens.shape[-1]) != 0, axis=0))[0]
  return int(nonzero[-1]) + 1 if len(nonzero) else 1


def trim(
  batch: Mapping[str, np.ndarray], buckets: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
  """Cuts a padded batch to the smallest bucket lengths that hold all of its real tokens.

  Each feature is padded to its fixed length; this keeps only the leading positions that the
  chosen bucket allows, which drops padding only. One compiled program per bucket pair then
  serves every batch, instead of one program at the full lengths. On several hosts, every host
  takes the largest length over all hosts, so that the global arrays agree in shape.

  Args:
    batch: model features ``[..., L]`` (``encoder_input_tokens``, ``decoder_*``); other entries
      pass through.
    buckets: ``{"inputs": lengths, "targets": lengths}`` as `check` returns.

  Returns:
    The batch with each bucketed feature cut to its bucket.
  """
  if not buckets:
    return dict(batch)
  lengths = {}
  for key, feature in _FEATURE_OF.items():
    if key in batch and feature in buckets and key != "decoder_input_tokens":
      lengths[feature] = max(lengths.get(feature, 1), real_length(np.asarray(batch[key])))
  lengths = _agree_across_hosts(lengths)
  out = dict(batch)
  for key, feature in _FEATURE_OF.items():
    if key in out and feature in lengths:
      full = out[key].shape[-1]
      out[key] = out[key][..., : bucket_length(lengths[feature], buckets[feature], full)]
  return out


def _agree_across_hosts(lengths: dict[str, int]) -> dict[str, int]:
  import jax  # Only for the process count and the all-gather.

  if jax.process_count() == 1 or not lengths:
    return lengths
  from jax.experimental import multihost_utils

  names = sorted(lengths)
  gathered = multihost_utils.process_allgather(np.asarray([lengths[n] for n in names], np.int32))
  return dict(zip(names, np.max(np.asarray(gathered).reshape(-1, len(names)), axis=0).tolist()))
