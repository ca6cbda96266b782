"""Teacher-forced logits through one compiled program per model structure, for the tests.

The model is split at the jit boundary, so models of the same structure share the compiled
program and calling it leaves the model untouched (``nnx.jit`` writes the state back, after
which the next call compiles again).
"""

import functools

import jax
import numpy as np
from flax import nnx

from mhr_jax import models


@functools.lru_cache(maxsize=None)
def _compiled(graphdef):
  return jax.jit(lambda state, batch: models.forward(nnx.merge(graphdef, state), batch))


def forward(model, batch) -> np.ndarray:
  """``models.forward(model, batch)`` as a NumPy array."""
  graphdef, state = nnx.split(model)
  return np.asarray(_compiled(graphdef)(state, batch))


def hf_batch_logits(model, batch, task_ids) -> np.ndarray:
  """Logits for a Hugging Face style batch (``input_ids``, ``labels`` with -100 padding)."""
  targets = np.where(batch["labels"] < 0, 0, batch["labels"]).astype(np.int32)
  return forward(model, {
      "encoder_input_tokens": np.asarray(batch["input_ids"], np.int32),
      "decoder_input_tokens": np.asarray(models.shift_right(targets)),
      "decoder_target_tokens": targets, "task_ids": np.asarray(task_ids, np.int32)})
