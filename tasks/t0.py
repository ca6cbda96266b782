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
classification (`mhr_jax.choices.rank_classification_rows`) and the T-Few training batches
(`mhr_jax.choices.multiple_choice_rows`); its metric is the seqio score metric
`mhr_jax.choices.rank_classification_accuracy` over every choice's score (`mhr_jax.evaluation`),
and ``example_id``, the source row, by which the evaluation scores each dataset as a whole
(`dataset_of`, `mhr_jax.protocol`).

Few-shot fine-tuning trains on one task per held-out dataset, ``t0_<dataset>_fewshot``: one task
id (one routing row) for the whole dataset and a template drawn at random for each example, as the
authors fine-tune (docs/paper_settings.md). Evaluation stays per template.
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

import gin
import jinja2
import numpy as np
import seqio
import tensorflow as tf
import yaml

from mhr_jax import choices, protocol
from tasks import common, vocab as vocab_lib

DATA_DIR_ENV = "MHR_DATA_DIR"
# The feature naming an example's source row (its position in the data file), for the dataset
# scores of `mhr_jax.protocol`, which draw one template per source example.
EXAMPLE_ID = protocol.EXAMPLE_ID


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where one T0 held-out dataset's files live and how its labels read."""

  fewshot: str  # Folder under t0_heldout/fewshot.
  templates: str  # Folder under promptsource_templates.
  eval: Optional[str] = None  # Folder under t0_heldout/eval holding val.jsonl.
  label_names: tuple[str, ...] = ()  # String label -> its index.
  n_train_templates: Optional[int] = None  # Few-shot task: the first n templates by name.


DATASETS: dict[str, DatasetSpec] = {
  "rte": DatasetSpec("rte", "super_glue/rte", "super_glue/RTE", ("entailment", "not_entailment")),
  "cb": DatasetSpec("cb", "super_glue/cb", "super_glue/CB",
                    ("entailment", "contradiction", "neutral")),
  # The authors' COPA reader keeps the first 8 original-task templates by name, the ones that
  # render both "cause" and "effect" questions (mttl t0_dataset_readers.py, COPAReader).
  "copa": DatasetSpec("copa", "super_glue/copa", "super_glue/COPA", ("choice1", "choice2"), 8),
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


def render_rows(path: pathlib.Path, spec: DatasetSpec, template: Template) -> list[Optional[dict]]:
  """Every row of a data file rendered under one template, in file order.

  A row whose prompt renders an empty input or target is ``None``; a target that is not one of
  the rendered answer choices is an error naming the file and line. Each example carries
  ``example_id``, its row's position in the file: the same source example has the same id under
  every template, whichever rows a template drops.
  """
  out = []
  for index, (n, row) in enumerate(read_jsonl(path)):
    where = f"{path}:{n}"
    row = normalise_row(row, spec, where)
    inputs, targets, choices = template.render(row, where)
    if not inputs or not targets:
      out.append(None)
      continue
    if targets not in choices:
      raise ValueError(
        f"{where}: target {targets!r} (label {row['label']}) is not among the answer choices "
        f"{choices} of template {template.name!r}"
      )
    out.append({"inputs": inputs, "targets": targets, "answer_choices": choices,
                "label": choices.index(targets), EXAMPLE_ID: index})
  return out


def render_file(path: pathlib.Path, spec: DatasetSpec, template: Template) -> list[dict]:
  """The rendered examples of one data file under one template (dropped ones are logged)."""
  rows = render_rows(path, spec, template)
  out = [r for r in rows if r is not None]
  dropped = len(rows) - len(out)
  if dropped:
    logging.info("%s: template %r left %d of %d examples empty; dropped them",
                 path, template.name, dropped, len(rows))
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


_SIGNATURE = {
  "inputs": tf.TensorSpec([], tf.string),
  "targets": tf.TensorSpec([], tf.string),
  "answer_choices": tf.TensorSpec([None], tf.string),
  "label": tf.TensorSpec([], tf.int32),
  EXAMPLE_ID: tf.TensorSpec([], tf.int32),
}


def _add(name, dataset_fn, splits, vocabulary, routing_name=None):
  # Few-shot splits hold at most 70 rows; a larger shuffle buffer only slows the start.
  common.add_text_task(
    name, seqio.FunctionDataSource(dataset_fn, splits=list(splits)), vocabulary,
    postprocess_fn=_postprocess, metric_fns=[choices.rank_classification_accuracy],
    shuffle_buffer_size=128,
    routing_name=routing_name)


def _register_task(name: str, files: dict[str, pathlib.Path], spec: DatasetSpec,
                   template: Template, vocabulary: seqio.Vocabulary,
                   routing_name: Optional[str] = None):
  """One (dataset, template) task; ``routing_name`` as in ``common.add_text_task``."""
  @functools.lru_cache(maxsize=None)
  def rendered(split):
    return render_file(files[split], spec, template)

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed
    exs = rendered(split)
    return tf.data.Dataset.from_generator(lambda: iter(exs), output_signature=_SIGNATURE)

  _add(name, dataset_fn, files, vocabulary, routing_name)


def _register_fewshot_task(name: str, path: pathlib.Path, spec: DatasetSpec,
                           templates: Sequence[Template], vocabulary: seqio.Vocabulary):
  """The few-shot training task of a dataset: one task name, a template drawn per example.

  As the authors' fine-tuning data (mttl ``t0_data_module.py``, ``T0FinetuneDatasetWithTemplate``
  with ``ds_id=0``, ``np.random.choice`` of a template in ``__getitem__``): every visit of an
  example, every epoch, renders it with a template drawn uniformly from ``templates``. The draws
  come from a generator seeded by the seed seqio passes for the split (the run's seed; 0 without
  one), so a run and its resumption see the same prompts. Templates that render an example empty
  are left out of its draw (the authors' code would fail on them; their COPA keeps the 8
  templates that render every example).
  """
  @functools.lru_cache(maxsize=None)
  def choices():
    per_template = [render_rows(path, spec, t) for t in templates]
    out = []
    for i, renders in enumerate(zip(*per_template)):
      kept = [r for r in renders if r is not None]
      if not kept:
        raise ValueError(f"{path}: example {i + 1} renders empty under every template of {name}")
      out.append(kept)
    return out

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del split, shuffle_files
    rows = choices()
    rng = np.random.default_rng(0 if seed is None else seed)

    def visit():  # Called again for every epoch: the generator goes on drawing.
      for options in rows:
        yield options[int(rng.integers(len(options)))]

    return tf.data.Dataset.from_generator(visit, output_signature=_SIGNATURE)

  _add(name, dataset_fn, ["train"], vocabulary)


# Shots of the authors' few-shot runs (mttl ``dataloader/t0_dataset_readers.py``,
# ``NUM_SHOTS_CONFIG``); the T-Few release ships ANLI as 50-shot files only.
AUTHORS_SHOTS = {"rte": 32, "cb": 32, "copa": 32, "wic": 32, "wsc": 32, "anli_r1": 32,
                 "anli_r2": 32, "anli_r3": 32, "hswag": 20, "winogrande": 50, "storycloze": 70}


def fewshot_task(dataset: str) -> str:
  """Name of the few-shot training task of a dataset (one routing row; see `register_t0`)."""
  return f"t0_{dataset}_fewshot"


def fewshot_eval_mixture(dataset: str) -> str:
  """Name of the mixture that evaluates each template through the few-shot task's routing."""
  return f"t0_{dataset}_fewshot_eval"


def training_templates(templates: Sequence[Template], spec: DatasetSpec) -> list[Template]:
  """The templates the few-shot task draws from: by name, as promptsource lists them, and the
  first ``spec.n_train_templates`` of them when set (the authors' COPA reader keeps 8)."""
  ordered = sorted(templates, key=lambda t: t.name)
  return ordered[: spec.n_train_templates] if spec.n_train_templates else ordered


# dataset -> (what it was registered from, {"templates": [...], "fewshot": ..., "eval": [...]})
_DATASETS_DONE: dict[str, tuple[tuple, dict]] = {}
_CALLS: dict[tuple, dict[str, list[str]]] = {}


def dataset_of(task: str) -> Optional[str]:
  """The held-out dataset (``"rte"``) whose per-template task ``task`` is, evaluated through its
  own routing row or the few-shot task's; None for any other task."""
  for ds_name, (_, names) in _DATASETS_DONE.items():
    if task in names["templates"] or task in names["eval"]:
      return ds_name
  return None


def _register_dataset(ds_name: str, root: pathlib.Path, files: dict, vocabulary,
                      original_task_only: bool) -> dict:
  spec = DATASETS[ds_name]
  templates = load_templates(root / "promptsource_templates" / spec.templates / "templates.yaml")
  kept = [t for t in templates
          if t.answer_choices is not None and (t.original_task or not original_task_only)]
  logging.info("T0 %s: %d of %d templates kept (original task, with answer choices)",
               ds_name, len(kept), len(templates))
  out = {"templates": [], "eval": []}
  for t in kept:
    name = f"t0_{ds_name}_{t.slug}"
    if name in out["templates"]:
      name = f"{name}_{t.id[:8]}"
    _register_task(name, files, spec, t, vocabulary)
    out["templates"].append(name)
    eval_name = name.replace(f"t0_{ds_name}_", f"{fewshot_eval_mixture(ds_name)}_", 1)
    _register_task(eval_name, files, spec, t, vocabulary, routing_name=fewshot_task(ds_name))
    out["eval"].append(eval_name)
  seqio.MixtureRegistry.add(f"t0_{ds_name}", out["templates"], default_rate=1.0)
  seqio.MixtureRegistry.add(fewshot_eval_mixture(ds_name), out["eval"], default_rate=1.0)
  _register_fewshot_task(fewshot_task(ds_name), files["train"], spec,
                         training_templates(kept, spec), vocabulary)
  return out


@gin.configurable(denylist=["data_dir", "vocabulary"])
def register_t0(
  data_dir: Union[None, str, os.PathLike] = None,
  *,
  datasets: Sequence[str] = tuple(DATASETS),
  shots: Union[None, int, dict[str, int]] = None,
  fewshot_seed: int = 42,
  vocabulary: Union[None, str, os.PathLike, seqio.Vocabulary] = None,
  original_task_only: bool = True,
) -> dict[str, list[str]]:
  """Registers the T0 held-out tasks of ``datasets`` and their mixtures.

  Per dataset: ``t0_<dataset>_<template>`` tasks, one per template, in the mixture
  ``t0_<dataset>`` (evaluation, and the per-template training of earlier versions); the few-shot
  training task `fewshot_task` (``t0_<dataset>_fewshot``: one task id, a template drawn per
  example, as the authors fine-tune); and the mixture `fewshot_eval_mixture` of the same
  per-template tasks routed through the few-shot task's id. ``t0_heldout`` mixes the per-template
  tasks of every registered dataset.

  Datasets can be added by later calls; registering one again is a no-op when it resolves to the
  same files and fails otherwise. The trainer calls this with ``DataConfig.t0_data_dir``; the
  other arguments are gin-configurable (``register_t0.shots = 32``).

  Args:
    data_dir: the folder described in the module docstring; default ``$MHR_DATA_DIR``.
    datasets: keys of `DATASETS` to register.
    shots: picks ``<k>_shot`` folders: one k for every dataset, or ``{dataset: k}``; by default
      (and for datasets missing from the dict) the only folder present.
    fewshot_seed: which ``<seed>_seed.jsonl`` few-shot file is the train split (the authors use
      the run's seed).
    vocabulary: a seqio vocabulary or SentencePiece path; default ``$MHR_SPM_PATH`` or
      ``<data_dir>/tokenizer/spiece.model``.
    original_task_only: keep only templates marked ``original_task`` (T0's evaluation prompts).

  Returns:
    ``{dataset: [per-template task names]}`` of this call's datasets.
  """
  root = _data_dir(data_dir)
  unknown = [d for d in datasets if d not in DATASETS]
  if unknown:
    raise ValueError(f"Unknown T0 datasets {unknown}; known: {sorted(DATASETS)}")
  files = {}
  for ds_name in datasets:
    spec = DATASETS[ds_name]
    k = shots.get(ds_name) if isinstance(shots, dict) else shots
    files[ds_name] = {"train": fewshot_file(root, spec, k, fewshot_seed)}
    if spec.eval:
      files[ds_name]["validation"] = root / "t0_heldout" / "eval" / spec.eval / "val.jsonl"
  resolved = tuple((d, tuple(sorted((s, str(p)) for s, p in f.items()))) for d, f in files.items())
  call = (str(root.resolve()), resolved, str(vocabulary), original_task_only)
  if call in _CALLS:
    return _CALLS[call]
  for f in (f for ds_files in files.values() for f in ds_files.values()):
    if not f.is_file():
      raise FileNotFoundError(f"T0 data file not found: {f}")
  keys = {d: (call[0], sorted((s, str(p)) for s, p in f.items()), call[2], call[3])
          for d, f in files.items()}
  for ds_name, key in keys.items():
    done = _DATASETS_DONE.get(ds_name)
    if done is not None and done[0] != key:
      raise ValueError(f"T0 dataset {ds_name!r} is already registered with other arguments: "
                       f"{done[0]} (now {key})")
  vocabulary = vocab_lib.resolve(vocabulary, root / "tokenizer" / "spiece.model")
  for ds_name, ds_files in files.items():
    if ds_name not in _DATASETS_DONE:
      _DATASETS_DONE[ds_name] = (keys[ds_name], _register_dataset(
        ds_name, root, ds_files, vocabulary, original_task_only))
  if "t0_heldout" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("t0_heldout")
  seqio.MixtureRegistry.add(
    "t0_heldout", [n for _, names in _DATASETS_DONE.values() for n in names["templates"]],
    default_rate=1.0)
  _CALLS[call] = {d: list(_DATASETS_DONE[d][1]["templates"]) for d in datasets}
  return _CALLS[call]
