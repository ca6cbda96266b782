"""Pieces shared by the task collections: the task-name feature, text helpers, data folders."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import seqio
import tensorflow as tf

from mhr_jax import errors

TASK_NAME = "task_name"  # The feature mhr_jax.data turns into task_ids.


def data_root(data_dir, env: str, label: str, subdir: str) -> pathlib.Path:
  """``data_dir``, else ``$env``, as a path that must hold the folder ``subdir``.

  Raises ``errors.DataError`` (a ValueError) when neither is given and ``errors.MissingFileError``
  (a FileNotFoundError) naming the path when ``subdir`` is missing; ``label`` names the collection
  in both messages ("T0 data directory", ...).
  """
  data_dir = data_dir or os.environ.get(env)
  if not data_dir:
    raise errors.DataError(f"No {label}: pass data_dir or set ${env}")
  root = pathlib.Path(data_dir)
  if not (root / subdir).is_dir():
    raise errors.MissingFileError(f"{label} {root} has no {subdir}/ folder ({root / subdir})")
  return root


def add_task_name(name: str) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  """A seqio preprocessor that adds the constant feature ``task_name`` to every example."""

  def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(lambda ex: {**ex, TASK_NAME: tf.constant(name)})

  return fn


def as_text(x: Any) -> str:
  """Decodes bytes (as seqio hands out strings) to str; other values pass through str()."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def add_text_task(
  name: str,
  source: seqio.DataSource,
  vocabulary: seqio.Vocabulary,
  *,
  metric_fns: Sequence[Callable],
  shuffle_buffer_size: int,
  postprocess_fn: Optional[Callable] = None,
  routing_name: Optional[str] = None,
  preprocessors: Sequence[Callable] = (),
) -> None:
  """Registers a task of ``inputs`` / ``targets`` strings: task name added, tokenized, EOS added.

  ``routing_name`` (default ``name``) is the ``task_name`` feature, the name the task-id table
  looks up: tasks that share one routing row carry the same routing name. ``preprocessors`` run
  after tokenization, before EOS is appended.
  """
  features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
              "targets": seqio.Feature(vocabulary, add_eos=True)}
  seqio.TaskRegistry.add(
    name,
    source=source,
    preprocessors=[add_task_name(routing_name or name), seqio.preprocessors.tokenize,
                   *preprocessors, seqio.preprocessors.append_eos_after_trim],
    output_features=features,
    postprocess_fn=postprocess_fn,
    metric_fns=list(metric_fns),
    shuffle_buffer_size=shuffle_buffer_size,
  )
