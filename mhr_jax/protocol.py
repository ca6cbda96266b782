"""One score per T0 held-out dataset from per-template rank classification.

A T0 held-out dataset (RTE, CB, ...) is evaluated under each of its promptsource templates (one
seqio task per template, ``tasks/t0.py``). Two published protocols turn those into one number:

* ``accuracy_random_template`` -- the MHR authors' protocol, taken from T-Few: every validation
  example is scored under one template drawn uniformly at random from the dataset's evaluation
  templates (``eval_template_idx = -1`` in ``mttl/dataloader/t0_dataset_readers.py`` and
  ``np.random.choice(self.templates)`` in ``mttl/datamodule/t0_data_module.py``, microsoft/mttl
  at tag ``mhr-camera-ready``). Here the draw is keyed by the run's seed, the dataset and the
  example, so it repeats exactly when a run is evaluated again and an example's draw does not
  depend on which other examples are evaluated.
* ``accuracy_median_template`` -- T0's protocol (Sanh et al., 2022, "Multitask Prompted Training
  Enables Zero-Shot Task Generalization", ICLR 2022, which reports the median over prompts):
  the accuracy of each template on the examples it renders, then the median over templates.

Both are percentages, like the per-template ``accuracy``. Per-template scores stay what they are;
these names are only ever used for a whole dataset. `docs/protocol.md` describes where they go
and how the report aggregates them over runs.
"""

from __future__ import annotations

import zlib
from typing import Callable, Mapping, Optional

import numpy as np

# The example feature naming its source example (its row in the dataset's file): the same id
# under every template (``tasks/t0.py`` adds it).
EXAMPLE_ID = "example_id"
RANDOM_TEMPLATE = "accuracy_random_template"
MEDIAN_TEMPLATE = "accuracy_median_template"
METRICS = (RANDOM_TEMPLATE, MEDIAN_TEMPLATE)


def _check(name: str, outcome: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(example ids, correct) of one template's rank classification; bad input names the template."""
  missing = [k for k in ("example_ids", "predictions", "labels") if k not in outcome]
  if missing:
    raise ValueError(f"template {name!r}: missing {missing} (rank classification's "
                     "example_ids, predictions and labels)")
  ids = np.asarray(outcome["example_ids"]).astype(np.int64)
  preds = np.asarray(outcome["predictions"])
  labels = np.asarray(outcome["labels"])
  if not ids.shape == preds.shape == labels.shape or ids.ndim != 1:
    raise ValueError(f"template {name!r}: example_ids {ids.shape}, predictions {preds.shape} and "
                     f"labels {labels.shape} must be equal-length vectors")
  if len(ids) == 0:
    raise ValueError(f"template {name!r} has no examples")
  if np.any(ids < 0):
    raise ValueError(f"template {name!r}: negative example ids (padding rows must be dropped)")
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"template {name!r}: an example id appears twice")
  if np.any(labels < 0):
    raise ValueError(f"template {name!r}: {int(np.sum(labels < 0))} examples have no gold "
                     "answer (label -1) and cannot be scored")
  return ids, preds == labels


def template_accuracies(per_template: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Accuracy (%) of each template on the examples it renders."""
  return {name: 100.0 * float(np.mean(_check(name, out)[1]))
          for name, out in per_template.items()}


def median_template_accuracy(accuracies) -> float:
  """T0's protocol: the median of per-template accuracies (the mean of the middle two for an
  even number of templates)."""
  values = np.asarray(list(accuracies.values()) if isinstance(accuracies, Mapping)
                      else list(accuracies), np.float64)
  if values.size == 0:
    raise ValueError("no template accuracies to take the median of")
  return float(np.median(values))


def draw_templates(example_ids: np.ndarray, n_choices: np.ndarray, *, seed: int,
                   dataset: str) -> np.ndarray:
  """For each example, the index of its template among ``n_choices`` (uniform, reproducible).

  The draw of example ``e`` comes from a generator keyed by ``(seed, crc32(dataset), e)`` alone:
  the same run seed gives the same draw, and evaluating fewer examples (``max_eval_examples``)
  leaves the draws of the others unchanged.
  """
  salt = zlib.crc32(dataset.encode())
  return np.asarray([np.random.default_rng([int(seed), salt, int(e)]).integers(int(n))
                     for e, n in zip(example_ids, n_choices)], np.int64)


def random_template_accuracy(per_template: Mapping[str, Mapping[str, np.ndarray]], *, seed: int,
                             dataset: str) -> tuple[float, int]:
  """The MHR authors' protocol: (accuracy in %, examples) with one random template per example.

  Args:
    per_template: ``{template task name: rank classification outcome}`` for one dataset, each with
      ``example_ids`` (the source example: the same id in every template), ``predictions`` (the
      chosen answer) and ``labels`` (the gold answer), as the evaluation keeps them
      (``evaluation.TaskEvaluator.outcome``). An example is drawn among the templates that render it (templates sorted by
      name), so a template that skips some examples (COPA's cause-only prompts) is never drawn
      for them.
    seed: the run's seed.
    dataset: the dataset's name (``"rte"``); decorrelates the draws of different datasets.
  """
  if not per_template:
    raise ValueError(f"dataset {dataset!r}: no templates to score")
  names = sorted(per_template)
  checked = [_check(n, per_template[n]) for n in names]
  all_ids = np.unique(np.concatenate([ids for ids, _ in checked]))
  # correct[t, i]: template t is right on example all_ids[i]; present[t, i]: t renders it.
  present = np.zeros((len(names), len(all_ids)), bool)
  correct = np.zeros((len(names), len(all_ids)), bool)
  for t, (ids, ok) in enumerate(checked):
    cols = np.searchsorted(all_ids, ids)
    present[t, cols] = True
    correct[t, cols] = ok
  n_choices = present.sum(axis=0)
  pick = draw_templates(all_ids, n_choices, seed=seed, dataset=dataset)
  # The pick-th present template of each example: the first t whose running count exceeds pick.
  rank = np.cumsum(present, axis=0) - 1  # [T, N]
  chosen = np.argmax(present & (rank == pick[None, :]), axis=0)  # [N]
  hits = correct[chosen, np.arange(len(all_ids))]
  return 100.0 * float(np.mean(hits)), int(len(all_ids))


def dataset_scores(per_template: Mapping[str, Mapping[str, np.ndarray]], *, seed: int,
                   dataset: str) -> dict[str, float]:
  """Both protocols' scores of one dataset, for the ``eval`` entry named after the dataset.

  Returns ``{"accuracy_random_template", "accuracy_median_template", "n_examples",
  "n_templates"}``; ``n_examples`` counts distinct examples over all templates.
  """
  random_acc, n = random_template_accuracy(per_template, seed=seed, dataset=dataset)
  return {RANDOM_TEMPLATE: random_acc,
          MEDIAN_TEMPLATE: median_template_accuracy(template_accuracies(per_template)),
          "n_examples": n, "n_templates": len(per_template)}


def dataset_key(dataset: str) -> str:
  """The ``eval`` entry of a dataset's scores: its mixture's name, ``t0_<dataset>``."""
  return f"t0_{dataset}"


def grouped_dataset_scores(outcomes: Mapping[str, Mapping[str, np.ndarray]],
                           dataset_of: Callable[[str], Optional[str]], *,
                           seed: int) -> dict[str, dict[str, float]]:
  """`dataset_scores` of every dataset among the evaluated templates.

  Args:
    outcomes: ``{template task: rank classification outcome}`` of one evaluation, as in
      `random_template_accuracy`; tasks of several datasets (and others) may be mixed.
    dataset_of: a task's held-out dataset (``tasks.t0.dataset_of``), None for tasks of none.
    seed: the run's seed.

  Returns:
    ``{dataset_key(dataset): dataset_scores(...)}``, one entry per dataset with templates here.
  """
  groups: dict[str, dict[str, Mapping[str, np.ndarray]]] = {}
  for task, outcome in outcomes.items():
    dataset = dataset_of(task)
    if dataset is not None:
      groups.setdefault(dataset, {})[task] = outcome
  return {dataset_key(d): dataset_scores(per_template, seed=seed, dataset=d)
          for d, per_template in sorted(groups.items())}
