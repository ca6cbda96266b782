"""Dataset-level T0 scores: T0's median over templates, the authors' random template per example."""

import numpy as np
import pytest

from mhr_jax import protocol


def outcome(ids, preds, labels):
  return {"example_ids": np.asarray(ids), "predictions": np.asarray(preds),
          "labels": np.asarray(labels)}


def right(ids):
  return outcome(ids, [0] * len(ids), [0] * len(ids))


def wrong(ids):
  return outcome(ids, [1] * len(ids), [0] * len(ids))


def test_median_over_templates_known_values():
  # Template accuracies 75, 25 and 50 (4 examples each): median 50.
  per_template = {
      "t_a": outcome(range(4), [0, 1, 1, 0], [0, 1, 1, 1]),
      "t_b": outcome(range(4), [0, 0, 0, 0], [1, 1, 1, 0]),
      "t_c": outcome(range(4), [2, 2, 0, 0], [2, 2, 1, 1]),
  }
  assert protocol.template_accuracies(per_template) == {"t_a": 75.0, "t_b": 25.0, "t_c": 50.0}
  assert protocol.median_template_accuracy(protocol.template_accuracies(per_template)) == 50.0
  # An even number of templates: the mean of the middle two.
  assert protocol.median_template_accuracy([10.0, 40.0, 20.0, 90.0]) == 30.0


def test_random_template_equals_the_shared_accuracy_when_templates_agree():
  ids = np.arange(40)
  preds = (ids % 5 == 0).astype(int)  # right on 8 of 40 examples under every template
  per_template = {f"t{i}": outcome(ids, preds, np.ones(40, int)) for i in range(6)}
  acc, n = protocol.random_template_accuracy(per_template, seed=3, dataset="rte")
  assert (acc, n) == (20.0, 40)


def test_an_example_draws_only_templates_that_render_it():
  # Examples 0-5 exist only under t_a (all right), 6-9 only under t_b (all wrong): 60% whatever
  # the draw.
  per_template = {"t_a": right(range(6)), "t_b": wrong(range(6, 10))}
  for seed in range(5):
    acc, n = protocol.random_template_accuracy(per_template, seed=seed, dataset="copa")
    assert (acc, n) == (60.0, 10)


def test_random_template_is_uniform_and_reproducible():
  n = 4000
  per_template = {"t_a": right(range(n)), "t_b": wrong(range(n)), "t_c": wrong(range(n)),
                  "t_d": wrong(range(n))}
  acc, count = protocol.random_template_accuracy(per_template, seed=0, dataset="rte")
  assert count == n
  # One template in four is right: 25% +- 4 binomial standard deviations (0.68 points each).
  assert abs(acc - 25.0) < 2.8
  again, _ = protocol.random_template_accuracy(per_template, seed=0, dataset="rte")
  assert again == acc
  other, _ = protocol.random_template_accuracy(per_template, seed=1, dataset="rte")
  assert other != acc
  counts = np.bincount(protocol.draw_templates(np.arange(n), np.full(n, 4), seed=0,
                                               dataset="rte"), minlength=4)
  assert counts.min() > 900 and counts.max() < 1100


def test_draw_ignores_template_order_and_other_examples():
  ids = np.arange(50)
  per_template = {f"t{i}": outcome(ids, (ids * (i + 1)) % 3, ids % 3) for i in range(5)}
  reversed_order = dict(reversed(list(per_template.items())))
  assert (protocol.random_template_accuracy(per_template, seed=7, dataset="cb")
          == protocol.random_template_accuracy(reversed_order, seed=7, dataset="cb"))
  # The first 10 examples draw the same templates when evaluated alone (max_eval_examples).
  full = protocol.draw_templates(ids, np.full(50, 5), seed=7, dataset="cb")
  head = protocol.draw_templates(ids[:10], np.full(10, 5), seed=7, dataset="cb")
  np.testing.assert_array_equal(full[:10], head)


def test_dataset_scores_names_both_protocols():
  per_template = {"t_a": right(range(3)), "t_b": wrong(range(3)), "t_c": right(range(3))}
  out = protocol.dataset_scores(per_template, seed=0, dataset="wic")
  assert set(out) == {"accuracy_random_template", "accuracy_median_template", "n_examples",
                      "n_templates"}
  assert out["accuracy_median_template"] == 100.0
  assert out["n_examples"] == 3 and out["n_templates"] == 3
  assert out["accuracy_random_template"] in (0.0, 100 / 3, 200 / 3, 100.0)


@pytest.mark.parametrize("bad, message", [
    ({"t": {"example_ids": [0], "predictions": [0]}}, "missing \\['labels'\\]"),
    ({"t": outcome([0, 1], [0], [0, 0])}, "equal-length"),
    ({"t": outcome([0, 0], [0, 0], [0, 0])}, "appears twice"),
    ({"t": outcome([0, -1], [0, 0], [0, 0])}, "padding rows"),
    ({"t": outcome([0, 1], [0, 0], [0, -1])}, "no gold answer"),
    ({"t": outcome([], [], [])}, "no examples"),
    ({}, "no templates"),
])
def test_bad_input_names_the_problem(bad, message):
  with pytest.raises(ValueError, match=message):
    protocol.random_template_accuracy(bad, seed=0, dataset="rte")


def test_grouped_scores_one_entry_per_dataset_other_tasks_left_out():
  outcomes = {"t0_rte_a": right(range(4)), "t0_rte_b": wrong(range(4)),
              "t0_cb_a": wrong(range(3)), "synthetic_x": right(range(2))}
  dataset_of = {"t0_rte_a": "rte", "t0_rte_b": "rte", "t0_cb_a": "cb"}.get
  got = protocol.grouped_dataset_scores(outcomes, dataset_of, seed=7)
  assert sorted(got) == ["t0_cb", "t0_rte"]
  assert got["t0_cb"] == {"accuracy_random_template": 0.0, "accuracy_median_template": 0.0,
                          "n_examples": 3, "n_templates": 1}
  # RTE: median of 100 and 0; each example right exactly when template a is drawn for it.
  picks = protocol.draw_templates(np.arange(4), np.full(4, 2), seed=7, dataset="rte")
  assert got["t0_rte"]["accuracy_median_template"] == 50.0
  assert got["t0_rte"]["accuracy_random_template"] == 100.0 * np.mean(picks == 0)
  assert got == protocol.grouped_dataset_scores(outcomes, dataset_of, seed=7)  # reproducible
