"""Super-NaturalInstructions from a local directory in the official format.

Layout (github.com/allenai/natural-instructions)::

  tasks/<task name>.json          {"Definition": [str], "Positive Examples": [{input, output}],
                                   "Instances": [{"id", "input", "output": [str, ...]}], ...}
  splits/default/train_tasks.txt  one task name per line
  splits/default/test_tasks.txt

Each task becomes ``super_ni_<task name>``. The prompt holds the definition, ``n_pos_examples``
positive examples and the instance, in one of two layouts (``prompt_style``):

- ``"tk_instruct"``: Tk-Instruct's (Wang et al., 2022, "Super-NaturalInstructions"):
  ``Definition: ...`` / ``Positive Example k -`` / ``Input: ...`` / ``Output: ...`` /
  ``Now complete the following example -``, parts separated by blank lines;
- ``"mttl"``: the MHR authors' (mttl ``datamodule/ni_original_data_module.py``,
  ``DataCollatorForNI``): ``Task definition: <first definition>.`` on one line, then
  ``Now complete the following example -`` / ``Input: <input>.`` / ``Output:``, a period added
  where a part does not end in punctuation; a prompt longer than the input length is cut before
  its final ``Output:``, which is kept.

The target is an instance's first output, or with ``sample_targets`` (the authors' collator) one
drawn at random each time a training example is visited; all outputs are kept as ``references``,
and the metric is Rouge-L (F1, in %, best over the references, `rouge_score` with Porter stemming).

Training tasks keep at most ``max_instances`` instances, drawn at random by ``seed``. Test tasks
are evaluated on their first ``max_eval_instances`` instances in file order (``test``; the
benchmark's evaluation instances, as in the authors' ``ni_original_dataset.py``); their
``train`` (``n_shots``) and ``validation`` (``n_validation``) splits for few-shot adaptation are
drawn at random by ``seed`` from the instances after those. Mixtures: ``super_ni_train``,
``super_ni_test``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
import string
from typing import Any, Optional, Sequence, Union

import gin
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


PROMPT_STYLES = ("tk_instruct", "mttl")
_OUTPUT = "\nOutput:"  # The end of every "mttl" prompt, kept when a long prompt is cut.


def _period(text: str) -> str:
  return text if text and text[-1] in string.punctuation else text + "."


def prompt(task: dict[str, Any], instance_input: str, n_pos_examples: int,
           style: str = "tk_instruct") -> str:
  """The model input for one instance: definition, positive examples, the instance."""
  definition = task["Definition"]
  if style == "mttl":
    first = definition[0] if isinstance(definition, list) else definition
    parts = [_period(f"Task definition: {str(first).strip()}") + "\n"]
    for k, ex in enumerate(task["Positive Examples"][:n_pos_examples], 1):
      parts.append(_period(f" Positive Example {k} -\nInput: {ex['input'].strip()}") + "\n"
                   + _period(f" Output: {ex['output'].strip()}") + "\n\n")
    parts.append("Now complete the following example -\n"
                 + _period(f"Input: {instance_input.strip()}") + _OUTPUT)
    return "".join(parts)
  if style != "tk_instruct":
    raise ValueError(f"prompt style must be one of {PROMPT_STYLES}; got {style!r}")
  definition = " ".join(definition) if isinstance(definition, list) else str(definition)
  parts = [f"Definition: {definition.strip()}"]
  for k, ex in enumerate(task["Positive Examples"][:n_pos_examples], 1):
    parts.append(
      f"Positive Example {k} -\nInput: {ex['input'].strip()}\nOutput: {ex['output'].strip()}")
  parts.append(f"Now complete the following example -\nInput: {instance_input.strip()}\nOutput:")
  return "\n\n".join(parts)


def keep_prompt_end(suffix: Sequence[int]):
  """A seqio preprocessor (after tokenization): an ``inputs`` longer than its length minus one
  (room for EOS) keeps its head and ends with the ``suffix`` tokens, as the authors cut prompts."""
  def fn(ds: tf.data.Dataset, sequence_length=None) -> tf.data.Dataset:
    if not sequence_length or not sequence_length.get("inputs"):
      return ds
    room = sequence_length["inputs"] - 1
    if room <= len(suffix):
      raise ValueError(f"inputs length {room + 1} leaves no room before the prompt's end")

    def trim(ex):
      x = ex["inputs"]
      end = tf.constant(list(suffix), x.dtype)
      x = tf.cond(tf.size(x) > room, lambda: tf.concat([x[: room - len(suffix)], end], 0),
                  lambda: x)
      return {**ex, "inputs": x}

    return ds.map(trim, num_parallel_calls=tf.data.AUTOTUNE)

  return fn


def read_split(data_dir: pathlib.Path, split: str) -> list[str]:
  """Task names listed in ``splits/default/<split>_tasks.txt``."""
  path = data_dir / "splits" / "default" / f"{split}_tasks.txt"
  if not path.is_file():
    raise FileNotFoundError(f"Super-NI split file not found: {path}")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def examples(path: pathlib.Path, sizes: dict[str, int], n_pos_examples: int, seed: int,
             style: str = "tk_instruct"):
  """``{split: [example]}`` of one task file; instances without output are dropped and logged.

  A ``"test"`` split takes the first instances in file order; the other splits, in the order of
  ``sizes``, take disjoint random draws (by ``seed``) from the instances after them.
  """
  task = load_task(path)
  kept, dropped = [], 0
  for i, inst in enumerate(task["Instances"]):
    outputs = inst.get("output")
    if isinstance(outputs, str):
      outputs = [outputs]
    if "input" not in inst or not outputs or not str(outputs[0]).strip():
      dropped += 1
      continue
    kept.append({"inputs": prompt(task, inst["input"], n_pos_examples, style),
                 "targets": str(outputs[0]).strip(),
                 "references": [str(o).strip() for o in outputs]})
  if dropped:
    logging.info("%s: dropped %d of %d instances without input or output",
                 path, dropped, dropped + len(kept))
  out = {}
  if "test" in sizes:
    out["test"], kept = kept[: sizes["test"]], kept[sizes["test"]:]
  order = np.random.default_rng(seed).permutation(len(kept))
  kept = [kept[i] for i in order]
  start = 0
  for split, size in sizes.items():
    if split != "test":
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


def _register_task(name, path, sizes, n_pos_examples, seed, vocabulary, style, sample_targets):
  @functools.lru_cache(maxsize=None)
  def split_examples():
    return examples(path, sizes, n_pos_examples, seed, style)

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files
    exs = split_examples()[split]
    signature = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string),
                 "references": tf.TensorSpec([None], tf.string)}
    if not (sample_targets and split == "train"):
      return tf.data.Dataset.from_generator(lambda: iter(exs), output_signature=signature)
    rng = np.random.default_rng(0 if seed is None else seed)

    def visit():  # Called again for every epoch: each visit draws its target anew.
      for ex in exs:
        yield {**ex, "targets": ex["references"][int(rng.integers(len(ex["references"])))]}

    return tf.data.Dataset.from_generator(visit, output_signature=signature)

  end = [keep_prompt_end(list(vocabulary.encode(_OUTPUT)))] if style == "mttl" else []
  common.add_text_task(
    name, seqio.FunctionDataSource(dataset_fn, splits=list(sizes)), vocabulary,
    postprocess_fn=_postprocess, metric_fns=[rouge_l], shuffle_buffer_size=max(sizes.values()),
    preprocessors=end)


_REGISTERED: dict[tuple, dict[str, list[str]]] = {}


@gin.configurable(denylist=["data_dir", "vocabulary"])
def register_super_ni(
  data_dir: Union[None, str, os.PathLike] = None,
  *,
  n_pos_examples: int = 2,
  max_instances: int = 100,
  n_shots: int = 32,
  n_validation: int = 32,
  max_eval_instances: int = 100,
  seed: int = 42,
  prompt_style: str = "tk_instruct",
  sample_targets: bool = False,
  vocabulary: Union[None, str, os.PathLike, seqio.Vocabulary] = None,
) -> dict[str, list[str]]:
  """Registers the Super-NI tasks of the default split and the mixtures (idempotent).

  The trainer calls this with ``DataConfig.super_ni_dir``; the other arguments are
  gin-configurable (``register_super_ni.n_pos_examples = 0``).

  Args:
    data_dir: the official layout (module docstring); default ``$MHR_SUPER_NI_DIR``.
    n_pos_examples: positive examples in every prompt.
    max_instances: instances per training task.
    n_shots, n_validation, max_eval_instances: split sizes of test tasks.
    seed: draws the training tasks' instances and the test tasks' train and validation splits.
    prompt_style: one of `PROMPT_STYLES` (module docstring).
    sample_targets: training targets drawn from an instance's outputs at every visit.
    vocabulary: a seqio vocabulary or SentencePiece path; default ``$MHR_SPM_PATH``.

  Returns:
    ``{"train": [task names], "test": [task names]}``.
  """
  if prompt_style not in PROMPT_STYLES:
    raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}; got {prompt_style!r}")
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
         max_eval_instances, seed, prompt_style, sample_targets, str(vocabulary))
  if key in _REGISTERED:
    return _REGISTERED[key]
  if _REGISTERED:
    raise ValueError(
      f"Super-NI is already registered with other arguments: {next(iter(_REGISTERED))}")
  vocabulary = vocab_lib.resolve(vocabulary)
  names: dict[str, list[str]] = {"train": [], "test": []}
  for split, sizes in (("train", {"train": max_instances}),
                       ("test", {"test": max_eval_instances, "train": n_shots,
                                 "validation": n_validation})):
    for task_name in listed[split]:
      name = f"super_ni_{_slug(task_name)}"
      _register_task(name, root / "tasks" / f"{task_name}.json", sizes, n_pos_examples, seed,
                     vocabulary, prompt_style, sample_targets)
      names[split].append(name)
    if names[split]:
      seqio.MixtureRegistry.add(f"super_ni_{split}", names[split], default_rate=1.0)
  _REGISTERED[key] = names
  return names
