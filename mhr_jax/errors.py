"""Expected failures: what a user can cause and fix (configuration, data, checkpoints, files).

Every class here derives from ``MhrError``. The command line (``python -m mhr_jax.train``) prints
such a failure as one message on stderr and exits with status 1; its traceback only shows with
``--traceback``. Anything else that escapes a run is a defect and keeps its traceback.

Each class also derives from the built-in exception it refines (``ValueError``,
``FileNotFoundError``, ...), so code that catches the built-in keeps working.
"""

from __future__ import annotations


class MhrError(Exception):
  """An expected failure whose message says what is wrong and how to put it right."""


class ConfigError(MhrError, ValueError):
  """The configuration (gin files, bindings, config dataclasses) asks for something impossible."""


class DataError(MhrError, ValueError):
  """Task data is missing, unregistered, malformed or does not fit the model."""


class CheckpointError(MhrError, ValueError):
  """A checkpoint cannot be used: unreadable, damaged, or absent where one is needed."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint does not fit the configured model or run; the message lists every difference."""


class CheckpointDamagedError(CheckpointError):
  """Checkpoints exist but none can be read; the message names each damaged step folder."""


class CheckpointDisagreementError(CheckpointError):
  """The processes of a run see different checkpoints (the folder is not one shared file system)."""


class FileSystemError(MhrError, OSError):
  """A path cannot be read or written (a missing file, an unwritable model directory)."""


class MissingFileError(FileSystemError, FileNotFoundError):
  """A file or folder the run needs does not exist."""


class NonFiniteLossError(MhrError, FloatingPointError):
  """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""
