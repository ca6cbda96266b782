"""A quiet console for ``python -m mhr_jax.train``: no TensorFlow start-up noise, no repeated
absl warnings, so that what looks like an error on stderr is one.

TensorFlow only feeds the input pipeline (seqio); as t5x does, it is hidden from accelerators so
that it never takes device memory from JAX. Importing it and listing its devices print a few
C++ lines on every machine (oneDNN, CUDA stubs, and on a CPU machine an ``E... failed call to
cuInit`` error); ``quiet_tensorflow`` does both with stderr captured and writes back every
captured line except those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

# TensorFlow's and XLA's start-up lines that say nothing about the run (their C++ logs are
# "I/W/E<date> <time> <thread> <file>:<line>] <message>").
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:.]+\s+\d+ (port\.cc|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc"
    r"|cpu_feature_guard\.cc|cuda_dnn\.cc|cuda_fft\.cc|cuda_blas\.cc)"
    r"|To enable the following instructions: .* rebuild TensorFlow)")


@contextlib.contextmanager
def _stderr_captured():
  """Collects what is written to file descriptor 2 (C++ logs included) and yields the list of
  lines, filled when the block ends; stderr is restored even when the block raises."""
  lines: list[str] = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      lines.extend(tmp.read().decode(errors="replace").splitlines())


def quiet_tensorflow() -> None:
  """Imports TensorFlow, hides accelerators from it, and drops its start-up lines (``NOISE``).

  ``TF_CPP_MIN_LOG_LEVEL`` defaults to 1 (TensorFlow's and XLA's C++ INFO lines hidden;
  warnings and errors kept); a value set in the environment wins.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  with _stderr_captured() as lines:
    try:
      import tensorflow as tf

      # GPUs only, as t5x: asking TensorFlow for TPUs would make it load libtpu, which JAX owns.
      tf.config.set_visible_devices([], "GPU")
    except ImportError:
      pass  # no TensorFlow: nothing to quiet
    except (ValueError, RuntimeError) as e:  # devices already initialised: nothing to hide then
      logging.getLogger(__name__).debug("TensorFlow devices left as they are: %s", e)
  kept = [line for line in lines if not NOISE.match(line)]
  if kept:
    print("\n".join(kept), file=sys.stderr, flush=True)


class _OncePerMessage(logging.Filter):
  """Lets each distinct warning through once; errors and other levels always pass."""

  def __init__(self):
    super().__init__()
    self._seen: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno != logging.WARNING:
      return True
    message = record.getMessage()
    if message in self._seen:
      return False
    self._seen.add(message)
    return True


def collapse_repeated_warnings(logger_name: str = "absl") -> None:
  """Shows each distinct warning of ``logger_name`` once (seqio warns once per task, through
  absl, about uncached datasets)."""
  logger = logging.getLogger(logger_name)
  if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
    logger.addFilter(_OncePerMessage())
