"""Hugging Face T5 module names of the adaptable dense layers and our layer paths.

PEFT and mttl both name an adapter after the ``transformers`` module it wraps, for example
``encoder.block.0.layer.0.SelfAttention.q``; our T5 names the same layer
``encoder/layers_0/attention/q`` (``mhr_jax.network``).
"""

from __future__ import annotations

import re
from typing import Optional

# (Hugging Face module pattern, our layer path template): the five places a dense layer sits.
_LAYERS = (
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)",
     "encoder/layers_{}/attention/{}"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)",
     "encoder/layers_{}/mlp/{}"),
    (r"decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)",
     "decoder/layers_{}/self_attention/{}"),
    (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.(q|k|v|o)",
     "decoder/layers_{}/encoder_decoder_attention/{}"),
    (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)",
     "decoder/layers_{}/mlp/{}"),
)
_PATHS = (
    (r"encoder/layers_(\d+)/attention/(q|k|v|o)", "encoder.block.{}.layer.0.SelfAttention.{}"),
    (r"encoder/layers_(\d+)/mlp/(wi|wi_0|wi_1|wo)", "encoder.block.{}.layer.1.DenseReluDense.{}"),
    (r"decoder/layers_(\d+)/self_attention/(q|k|v|o)",
     "decoder.block.{}.layer.0.SelfAttention.{}"),
    (r"decoder/layers_(\d+)/encoder_decoder_attention/(q|k|v|o)",
     "decoder.block.{}.layer.1.EncDecAttention.{}"),
    (r"decoder/layers_(\d+)/mlp/(wi|wi_0|wi_1|wo)", "decoder.block.{}.layer.2.DenseReluDense.{}"),
)


def split_key(key: str) -> Optional[tuple[str, str]]:
  """``(our layer path, rest)`` of a tensor name that holds a T5 module name, else None.

  The module name may be preceded by any prefix (``base_model.model.``, Lightning's ``model.``)
  and must be followed by the tensor's own name, e.g. for
  ``base_model.model.decoder.block.1.layer.1.EncDecAttention.k.poly_lora_A``:
  ``("decoder/layers_1/encoder_decoder_attention/k", "poly_lora_A")``.
  """
  for pattern, template in _LAYERS:
    m = re.search(r"(?:^|\.)" + pattern + r"\.(.+)$", key)
    if m:
      return template.format(m.group(1), m.group(2)), m.group(3)
  return None


def to_module(path: str) -> str:
  """The Hugging Face module name of one of our adaptable layer paths."""
  for pattern, template in _PATHS:
    m = re.fullmatch(pattern, path)
    if m:
      return template.format(m.group(1), m.group(2))
  raise ValueError(f"{path!r} is not an adaptable T5 layer path (attention q/k/v/o or mlp)")


def leaf(path: str) -> str:
  """The layer's own name (``q``, ``wi_0``, ...): what PEFT's ``target_modules`` list holds."""
  return path.rsplit("/", 1)[-1]
