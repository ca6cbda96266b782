"""The T0 held-out tasks from local files: one seqio task per (dataset, promptsource template).

Data layout under the data directory (``register_t0(data_dir)``, default ``$MHR_DATA_DIR``)::

  t0_heldout/fewshot/<dataset>/<k>_shot/<seed>_seed.jsonl   T-Few few-shot splits -> "train"
  t0_heldout/eval/super_glue/<NAME>/val.jsonl                SuperGLUE validation -> "validation"
  promptsource_templates/<dataset>/<subset>/templates.yaml   promptsource templates
  tokenizer/spiece.model                                     default vocabulary (or $MHR_SPM_PATH)

Prompts are rendered the way promptsource 0.2 does (github.com/bigscience-workshop/promptsource,
``promptsource/templates.py``): the template's ``answer_choices`` is itself a Jinja template whose
output is split on ``|||``; the main template sees the example plus ``answer_choices`` and its
output is split on ``|||`` into input and target, each stripped. Unlike promptsource, an undefined
field is an error (jinja2 ``StrictUndefined``), so a data file whose fields do not match the
template fails loudly, and variables are not truncated to 2048 characters (feature lengths truncate
tokens later). As in T0's evaluation, only templates marked ``original_task`` and with answer
choices are used.

Labels are normalised to integer indices: the few-shot files hold integers, the SuperGLUE files
strings such as ``"not_entailment"`` (mapped through the dataset's label names). The gold choice is
the index of the rendered target among the rendered answer choices. Examples whose prompt renders to
an empty input or target (some COPA templates apply to "cause" questions only, unlabeled rows) are
dropped, counted and logged.

Each task carries ``answer_choices`` and ``label`` next to ``inputs``/``targets`` for rank
classification (`mhr_jax.data.rank_classification_rows`); its metric is
`mhr_jax.data.rank_accuracy`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
from typing import Any, Optional, Sequence, Union

import jinja2
import seqio
import tensorflow as tf
import yaml

from mhr_jax import data as data_lib
from tasks import common, vocab as vocab_lib

DATA_DIR_ENV = "MHR_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where one T0 held-out dataset's files live and how its labels read."""

  fewshot: str  # Folder under t0_heldout/fewshot.
  templates: str  # Folder under promptsource_templates.
  eval: Optional[str] = None  # Folder under t0_heldout/eval holding val.jsonl.
  label_names: tuple[str, ...] = ()  # String label -> its index.


DATASETS: dict[str, DatasetSpec] = {
  "rte": DatasetSpec("rte", "super_glue/rte", "super_glue/RTE", ("entailment", "not_entailment")),
  "cb": DatasetSpec("cb", "super_glue/cb", "super_glue/CB",
                    ("entailment", "contradiction", "neutral")),
  "copa": DatasetSpec("copa", "super_glue/copa", "super_glue/COPA", ("choice1", "choice2")),
  "wic": DatasetSpec("wic", "super_glue/wic", "super_glue/WiC", ("false", "true")),
  "wsc": DatasetSpec("wsc", "super_glue/wsc.fixed", "super_glue/WSC", ("false", "true")),
  "anli_r1": DatasetSpec("anli-r1", "anli"),
  "anli_r2": DatasetSpec("anli-r2", "anli"),
  "anli_r3": DatasetSpec("anli-r3", "anli"),
  "hswag": DatasetSpec("h-swag", "hellaswag"),
  "winogrande": DatasetSpec("winogrande", "winogrande/winogrande_xl"),
  "storycloze": DatasetSpec("storycloze", "story_cloze/2016"),
}


# ----------------------------------------------------------------------------- templates


def _most_frequent(items):
  counts = {}
  for x in items or ():
    counts[x] = counts.get(x, 0) + 1
  top = max(counts.values(), default=0)
  return [x for x, c in counts.items() if c == top] or None


def _jinja_env() -> jinja2.Environment:
  env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined)
  env.globals.update(zip=zip)
  # promptsource's `choice` filter is random.choice; here it takes the first item so renders repeat.
  env.filters["choice"] = lambda xs: list(xs)[0]
  env.filters["most_frequent"] = _most_frequent
  return env


_ENV = _jinja_env()


@dataclasses.dataclass(frozen=True)
class Template:
  """One promptsource template, read from its YAML."""

  id: str
  name: str
  jinja: str
  answer_choices: Optional[str]
  original_task: bool
  source: str  # The YAML file, for error messages.

  @property
  def slug(self) -> str:
    return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_") or self.id[:8]

  def choices(self, example: dict[str, Any], where: str) -> list[str]:
    """The rendered answer choices of one example (empty for open-ended templates)."""
    if self.answer_choices is None:
      return []
    rendered = self._render(self.answer_choices, example, where)
    return [c.strip() for c in rendered.split("|||")]

  def render(self, example: dict[str, Any], where: str) -> tuple[str, str, list[str]]:
    """(input, target, answer choices) of one example; ``where`` names it in errors."""
    choices = self.choices(example, where)
    label = example.get("label", -1)
    if choices and not -1 <= label < len(choices):
      raise ValueError(f"{where}: label {label} is outside the answer choices {choices} of "
                       "template "
                       f"{self.name!r} ({self.source})")
    parts = [p.strip() for p in self._render(self.jinja, {**example, "answer_choices": choices},
                                              where).split("|||")]
    if len(parts) > 2:
      raise ValueError(
        f"Template {self.name!r} in {self.source} renders {len(parts)} parts at {where}")
    return parts[0], parts[1] if len(parts) == 2 else "", choices

  def _render(self, source: str, example: dict[str, Any], where: str) -> str:
    try:
      return _compile(source).render(**example)
    except Exception as e:  # Jinja raises many types; all mean the same here.
      raise ValueError(
        f"Template {self.name!r} ({self.id}) in {self.source} does not render {where}: "
        f"{type(e).__name__}: {e}"
      ) from e


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> jinja2.Template:
  return _ENV.from_string(source)


class _Loader(yaml.SafeLoader):
  """Reads promptsource YAML without promptsource: its tagged objects become plain mappings."""


_Loader.add_constructor("!Template", lambda loader, node: loader.construct_mapping(node, deep=True))
_Loader.add_constructor(
  "!TemplateMetadata", lambda loader, node: loader.construct_mapping(node, deep=True))


@functools.lru_cache(maxsize=None)
def load_templates(path: Union[str, os.PathLike]) -> tuple[Template, ...]:
  """All templates of a promptsource ``templates.yaml``, in file order."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"promptsource templates not found: {path}")
  try:
    raw = yaml.load(path.read_text(), Loader=_Loader)
  except yaml.YAMLError as e:
    raise ValueError(f"{path}: not valid YAML: {e}") from e
  out = []
  for tid, t in raw["templates"].items():
    meta = t.get("metadata") or {}
    out.append(Template(str(tid), t["name"], t["jinja"], t.get("answer_choices"),
                        bool(meta.get("original_task")), str(path)))
  return tuple(out)


# ----------------------------------------------------------------------------- examples


def read_jsonl(path: pathlib.Path) -> list[tuple[int, dict]]:
  """(line number, row) of every non-empty line; a malformed line fails naming file and line."""
  if not path.is_file():
    raise FileNotFoundError(f"T0 data file not found: {path}")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append((n, json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: malformed JSON line: {e}") from e
  return rows


def normalise_row(row: dict, spec: DatasetSpec, where: str) -> dict:
  """A row in the field names promptsource expects, with an integer label."""
  row = dict(row)
  if isinstance(row.get("target"), dict):  # SuperGLUE WSC nests the spans.
    row.update(row.pop("target"))
  label = row.get("label", -1)
  if isinstance(label, str):
    key = label.strip().lower()
    names = [n.lower() for n in spec.label_names]
    if key.lstrip("-").isdigit():
      label = int(key)
    elif key in names:
      label = names.index(key)
    else:
      raise ValueError(f"{where}: label {label!r} is not one of {list(spec.label_names)}")
  elif isinstance(label, bool):
    label = int(label)
  row["label"] = int(label)
  return row


def render_file(path: pathlib.Path, spec: DatasetSpec, template: Template) -> list[dict]:
  """The rendered examples of one data file under one template (dropped ones are logged)."""
  out, dropped = [], 0
  for n, row in read_jsonl(path):
    where = f"{path}:{n}"
    row = normalise_row(row, spec, where)
    inputs, targets, choices = template.render(row, where)
    if not inputs or not targets:
      dropped += 1
      continue
    if targets not in choices:
      raise ValueError(
        f"{where}: target {targets!r} (label {row['label']}) is not among the answer choices "
        f"{choices} of template {template.name!r}"
      )
    out.append({"inputs": inputs, "targets": targets, "answer_choices": choices,
                "label": choices.index(targets)})
  if dropped:
    logging.info("%s: template %r left %d of %d examples empty; dropped them",
                 path, template.name, dropped, dropped + len(out))
  if not out:
    raise ValueError(f"{path}: template {template.name!r} renders no example")
  return out


# ----------------------------------------------------------------------------- registration


def _data_dir(data_dir) -> pathlib.Path:
  return common.data_root(data_dir, DATA_DIR_ENV, "T0 data directory", "t0_heldout")


def fewshot_file(data_dir: pathlib.Path, spec: DatasetSpec, shots: Optional[int], seed: int):
  """The few-shot file of a dataset; with ``shots=None`` the only ``<k>_shot`` folder present."""
  base = data_dir / "t0_heldout" / "fewshot" / spec.fewshot
  if shots is None:
    found = sorted(base.glob("*_shot"))
    if len(found) != 1:
      raise ValueError(f"{base}: pass shots=, found {[p.name for p in found]}")
    return found[0] / f"{seed}_seed.jsonl"
  return base / f"{shots}_shot" / f"{seed}_seed.jsonl"


def _postprocess(output, example=None, is_target=False):
  """Targets become the gold choice index; predictions (choice indices) pass through."""
  if is_target and example is not None:
    return int(example["label"])
  return output


def _register_task(name: str, files: dict[str, pathlib.Path], spec: DatasetSpec,
                   template: Template, vocabulary: seqio.Vocabulary):
  @functools.lru_cache(maxsize=None)
  def rendered(split):
    return render_file(files[split], spec, template)

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed
    exs = rendered(split)
    signature = {
      "inputs": tf.TensorSpec([], tf.string),
      "targets": tf.TensorSpec([], tf.string),
      "answer_choices": tf.TensorSpec([None], tf.string),
      "label": tf.TensorSpec([], tf.int32),
    }
    return tf.data.Dataset.from_generator(lambda: iter(exs), output_signature=signature)

  # Few-shot splits hold at most 70 rows; a larger shuffle buffer only slows the start.
  common.add_text_task(
    name, seqio.FunctionDataSource(dataset_fn, splits=list(files)), vocabulary,
    postprocess_fn=_postprocess, metric_fns=[data_lib.rank_accuracy], shuffle_buffer_size=128)


_REGISTERED: dict[tuple, dict[str, list[str]]] = {}


def register_t0(
  data_dir: Union[None, str, os.PathLike] = None,
  *,
  datasets: Sequence[str] = tuple(DATASETS),
  shots: Optional[dict[str, int]] = None,
  fewshot_seed: int = 42,
  vocabulary: Union[None, str, os.PathLike, seqio.Vocabulary] = None,
  original_task_only: bool = True,
) -> dict[str, list[str]]:
  """Registers ``t0_<dataset>_<template>`` tasks and the mixtures ``t0_<dataset>``, ``t0_heldout``.

  Safe to call twice with the same arguments; other arguments after a first call fail.

  Args:
    data_dir: the folder described in the module docstring; default ``$MHR_DATA_DIR``.
    datasets: keys of `DATASETS` to register.
    shots: ``{dataset: k}`` picking ``<k>_shot`` folders; by default the only folder present.
    fewshot_seed: which ``<seed>_seed.jsonl`` few-shot file is the train split.
    vocabulary: a seqio vocabulary or SentencePiece path; default ``$MHR_SPM_PATH`` or
      ``<data_dir>/tokenizer/spiece.model``.
    original_task_only: keep only templates marked ``original_task`` (T0's evaluation prompts).

  Returns:
    ``{dataset: [task names]}``.
  """
  root = _data_dir(data_dir)
  unknown = [d for d in datasets if d not in DATASETS]
  if unknown:
    raise ValueError(f"Unknown T0 datasets {unknown}; known: {sorted(DATASETS)}")
  key = (str(root.resolve()), tuple(datasets), tuple(sorted((shots or {}).items())), fewshot_seed,
         str(vocabulary), original_task_only)
  if key in _REGISTERED:
    return _REGISTERED[key]
  if _REGISTERED:
    raise ValueError(
      f"T0 tasks are already registered with other arguments: {next(iter(_REGISTERED))}")
  vocabulary = vocab_lib.resolve(vocabulary, root / "tokenizer" / "spiece.model")
  names: dict[str, list[str]] = {}
  for ds_name in datasets:
    spec = DATASETS[ds_name]
    files = {"train": fewshot_file(root, spec, (shots or {}).get(ds_name), fewshot_seed)}
    if spec.eval:
      files["validation"] = root / "t0_heldout" / "eval" / spec.eval / "val.jsonl"
    for f in files.values():
      if not f.is_file():
        raise FileNotFoundError(f"T0 data file not found: {f}")
    templates = load_templates(root / "promptsource_templates" / spec.templates / "templates.yaml")
    kept = [t for t in templates
            if t.answer_choices is not None and (t.original_task or not original_task_only)]
    logging.info("T0 %s: %d of %d templates kept (original task, with answer choices)",
                 ds_name, len(kept), len(templates))
    names[ds_name] = []
    for t in kept:
      name = f"t0_{ds_name}_{t.slug}"
      if name in names[ds_name]:
        name = f"{name}_{t.id[:8]}"
      _register_task(name, files, spec, t, vocabulary)
      names[ds_name].append(name)
    seqio.MixtureRegistry.add(f"t0_{ds_name}", names[ds_name], default_rate=1.0)
  seqio.MixtureRegistry.add("t0_heldout", [n for v in names.values() for n in v], default_rate=1.0)
  _REGISTERED[key] = names
  return names
