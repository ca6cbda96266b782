"""Run directories on a local disk or in a bucket (``gs://...``), through ``etils.epath``.

Every file a run writes (``config.gin``, ``task_ids.json``, ``metrics.jsonl``, TensorBoard events,
``results.json``) goes through ``epath.Path``, which serves local paths with ``os`` and
``gs://`` with TensorFlow's ``tf.io.gfile`` (or ``gcsfs``); orbax writes the checkpoints through
the same abstraction and tensorstore. On a pod slice every host has its own disk, so the model
directory of a multi-host run belongs in a bucket.

Object stores cannot append to a file: ``AppendedFile`` keeps what it was given and writes the
whole file again (at most every ``interval`` seconds, and on ``close``).
"""

from __future__ import annotations

import os
import time

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
  """Whether ``path`` names an object store (``scheme://...``) rather than a local file."""
  return "://" in os.fspath(path)


def run_dir(path: epath.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: absolute when local (orbax needs it), a bucket URL as is."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def find(root: epath.Path, name: str) -> list[epath.Path]:
  """Every file called ``name`` under ``root`` (a local folder or a bucket prefix), sorted.

  Walks the tree (``epath`` refuses recursive ``**`` globs on object stores).
  """
  return sorted(epath.Path(folder) / name for folder, _, files in root.walk() if name in files)


class AppendedFile:
  """A text file grown by ``write``: appended to locally, rewritten whole on an object store.

  A file that exists already (a resumed run's) keeps its lines; new ones follow them.
  """

  def __init__(self, path: epath.PathLike, *, interval: float = 10.0):
    self.path = epath.Path(path)
    self._remote = is_remote(path)
    self._interval = interval
    if self._remote:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._written = time.monotonic()
      self._dirty = False
    else:
      self._file = open(self.path, "a", buffering=1)

  def write(self, text: str) -> None:
    if not self._remote:
      self._file.write(text)
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._written >= self._interval:
      self.flush()

  def flush(self) -> None:
    """Writes out everything given so far (a local file is flushed line by line anyway)."""
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      self.path.write_text(self._text)
      self._written, self._dirty = time.monotonic(), False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()


class _RecordWriter:
  """tensorboardX's record writer for any ``epath`` URL: the event file rewritten on flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self._data = bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    self.path.write_bytes(bytes(self._data))

  def close(self) -> None:
    self.flush()


class _RecordWriterFactory:
  def open(self, path: str) -> _RecordWriter:
    return _RecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def tensorboard_writer(logdir: epath.Path):
  """A ``tensorboardX.SummaryWriter`` for ``logdir``, local or on any store ``epath`` serves
  (tensorboardX's own ``gs://`` writer needs ``google-cloud-storage``; this one needs nothing)."""
  from tensorboardX import SummaryWriter, record_writer

  if is_remote(logdir):
    record_writer.register_writer_factory(os.fspath(logdir).split("://")[0],
                                          _RecordWriterFactory())
  return SummaryWriter(os.fspath(logdir))
