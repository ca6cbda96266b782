"""Super-NaturalInstructions from a local directory in the official format.

Layout (github.com/allenai/natural-instructions)::

  tasks/<task name>.json          {"Definition": [str], "Positive Examples": [{input, output}],
                                   "Instances": [{"id", "input", "output": [str, ...]}], ...}
  splits/default/train_tasks.txt  one task name per line
  splits/default/test_tasks.txt

Each task becomes ``super_ni_<task name>``. The prompt holds the definition, ``n_pos_examples``
positive examples and the instance, in the layout of Tk-Instruct (Wang et al., 2022, "Super-
NaturalInstructions"): ``Definition: ...`` / ``Positive Example k -`` / ``Input: ...`` / ``Output:
...`` / ``Now complete the following example -``. The target is an instance's first output; all its
outputs are kept as ``references``, and the metric is Rouge-L (F1, in %, best over the references,
`rouge_score` with Porter stemming).

Instances are shuffled once by ``seed``. Training tasks keep at most ``max_instances`` (``train``
split). Test tasks get disjoint ``train`` (``n_shots``), ``validation`` (``n_validation``) and
``test`` (``max_eval_instances``) splits for few-shot adaptation. Mixtures: ``super_ni_train``,
``super_ni_test``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
from typing import Any, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf
from rouge_score import rouge_scorer

from tasks import common, vocab as vocab_lib

DATA_DIR_ENV = "MHR_SUPER_NI_DIR"


def load_task(path: pathlib.Path) -> dict[str, Any]:
  """One official task file; fails naming the file (and line) when it is missing or malformed."""
  if not path.is_file():
    raise FileNotFoundError(f"Super-NI task file not found: {path}")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
  for key in ("Definition", "Positive Examples", "Instances"):
    if key not in raw:
      raise ValueError(f"{path}: no {key!r} field (has {sorted(raw)})")
  return raw


def prompt(task: dict[str, Any], instance_input: str, n_pos_examples: int) -> str:
  """The model input for one instance: definition, positive examples, the instance."""
  definition = task["Definition"]
  definition = " ".join(definition) if isinstance(definition, list) else str(definition)
  parts = [f"Definition: {definition.strip()}"]
  for k, ex in enumerate(task["Positive Examples"][:n_pos_examples], 1):
    parts.append(
      f"Positive Example {k} -\nInput: {ex['input'].strip()}\nOutput: {ex['output'].strip()}")
  parts.append(f"Now complete the following example -\nInput: {instance_input.strip()}\nOutput:")
  return "\n\n".join(parts)


def read_split(data_dir: pathlib.Path, split: str) -> list[str]:
  """Task names listed in ``splits/default/<split>_tasks.txt``."""
  path = data_dir / "splits" / "default" / f"{split}_tasks.txt"
  if not path.is_file():
    raise FileNotFoundError(f"Super-NI split file not found: {path}")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def examples(path: pathlib.Path, sizes: dict[str, int], n_pos_examples: int, seed: int):
  """``{split: [example]}`` of one task file; instances without output are dropped and logged."""
  task = load_task(path)
  kept, dropped = [], 0
  for i, inst in enumerate(task["Instances"]):
    outputs = inst.get("output")
    if isinstance(outputs, str):
      outputs = [outputs]
    if "input" not in inst or not outputs or not str(outputs[0]).strip():
      dropped += 1
      continue
    kept.append({"inputs": prompt(task, inst["input"], n_pos_examples),
                 "targets": str(outputs[0]).strip(),
                 "references": [str(o).strip() for o in outputs]})
  if dropped:
    logging.info("%s: dropped %d of %d instances without input or output",
                 path, dropped, dropped + len(kept))
  order = np.random.default_rng(seed).permutation(len(kept))
  kept = [kept[i] for i in order]
  out, start = {}, 0
  for split, size in sizes.items():
    out[split] = kept[start : start + size]
    start += size
  return out


def rouge_l(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Seqio metric: mean Rouge-L F1 (in %), each prediction against its best reference.

  A target is a string or a list of reference strings.
  """
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  scores = []
  for refs, pred in zip(targets, predictions):
    refs = [refs] if isinstance(refs, (str, bytes)) else list(refs)
    pred = common.as_text(pred)
    scores.append(max(scorer.score(common.as_text(r), pred)["rougeL"].fmeasure for r in refs))
  return {"rougeL": 100.0 * float(np.mean(scores)) if scores else float("nan")}


def _postprocess(output, example=None, is_target=False):
  """Targets become the list of references; predictions are decoded strings."""
  if is_target and example is not None and "references" in example:
    return [common.as_text(r) for r in example["references"]]
  return common.as_text(output)


def _slug(task_name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", task_name.lower()).strip("_")


def _register_task(name, path, sizes, n_pos_examples, seed, vocabulary):
  @functools.lru_cache(maxsize=None)
  def split_examples():
    return examples(path, sizes, n_pos_examples, seed)

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed
    exs = split_examples()[split]
    signature = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string),
                 "references": tf.TensorSpec([None], tf.string)}
    return tf.data.Dataset.from_generator(lambda: iter(exs), output_signature=signature)

  common.add_text_task(
    name, seqio.FunctionDataSource(dataset_fn, splits=list(sizes)), vocabulary,
    postprocess_fn=_postprocess, metric_fns=[rouge_l], shuffle_buffer_size=max(sizes.values()))


_REGISTERED: dict[tuple, dict[str, list[str]]] = {}


def register_super_ni(
  data_dir: Union[None, str, os.PathLike] = None,
  *,
  n_pos_examples: int = 2,
  max_instances: int = 100,
  n_shots: int = 32,
  n_validation: int = 32,
  max_eval_instances: int = 100,
  seed: int = 42,
  vocabulary: Union[None, str, os.PathLike, seqio.Vocabulary] = None,
) -> dict[str, list[str]]:
  """Registers the Super-NI tasks of the default split and the mixtures (idempotent).

  Args:
    data_dir: the official layout (module docstring); default ``$MHR_SUPER_NI_DIR``.
    n_pos_examples: positive examples in every prompt.
    max_instances: instances per training task.
    n_shots, n_validation, max_eval_instances: split sizes of test tasks.
    seed: shuffles every task's instances before they are split.
    vocabulary: a seqio vocabulary or SentencePiece path; default ``$MHR_SPM_PATH``.

  Returns:
    ``{"train": [task names], "test": [task names]}``.
  """
  root = common.data_root(data_dir, DATA_DIR_ENV, "Super-NI directory", "tasks")
  listed = {split: read_split(root, split) for split in ("train", "test")}
  for split, task_names in listed.items():
    for task_name in task_names:
      path = root / "tasks" / f"{task_name}.json"
      if not path.is_file():
        raise FileNotFoundError(
          f"Super-NI task {task_name!r} listed in splits/default/{split}_tasks.txt has no "
          f"file {path}")
  key = (str(root.resolve()), n_pos_examples, max_instances, n_shots, n_validation,
         max_eval_instances, seed, str(vocabulary))
  if key in _REGISTERED:
    return _REGISTERED[key]
  if _REGISTERED:
    raise ValueError(
      f"Super-NI is already registered with other arguments: {next(iter(_REGISTERED))}")
  vocabulary = vocab_lib.resolve(vocabulary)
  names: dict[str, list[str]] = {"train": [], "test": []}
  for split, sizes in (("train", {"train": max_instances}),
                       ("test", {"train": n_shots, "validation": n_validation,
                                 "test": max_eval_instances})):
    for task_name in listed[split]:
      name = f"super_ni_{_slug(task_name)}"
      _register_task(name, root / "tasks" / f"{task_name}.json", sizes, n_pos_examples, seed,
                     vocabulary)
      names[split].append(name)
    if names[split]:
      seqio.MixtureRegistry.add(f"super_ni_{split}", names[split], default_rate=1.0)
  _REGISTERED[key] = names
  return names
