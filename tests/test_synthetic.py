"""The embedded synthetic benchmark: determinism, held-out compositions, registration."""

import dataclasses

import numpy as np
import pytest
import seqio

import tasks.mixtures  # noqa: F401
from tasks import synthetic

DEFAULT = synthetic.SyntheticConfig()


@pytest.fixture(scope="module")
def bench():
  return synthetic.build(DEFAULT)


def test_same_seed_same_tasks_and_examples(bench):
  again = synthetic.build(DEFAULT)
  assert again.train == bench.train and again.heldout == bench.heldout
  cases = [("compose", 3, "train"), ("heldout", 1, "test"), ("primitive", 0, "train")]
  for kind, idx, split in cases:
    assert bench.examples(kind, idx, split) == again.examples(kind, idx, split)


def test_other_seed_other_benchmark(bench):
  other = synthetic.build(dataclasses.replace(DEFAULT, seed=1))
  assert other.train != bench.train
  assert other.examples("compose", 0, "train") != bench.examples("compose", 0, "train")


def test_heldout_compositions_absent_from_training(bench):
  train_sigs = {bench.signature(c) for c in bench.train}
  train_prims = {p for c in bench.train for p in c}
  assert len(bench.heldout) == DEFAULT.n_heldout_tasks
  for comp in bench.heldout:
    assert comp not in bench.train
    assert bench.signature(comp) not in train_sigs  # Not even the same function.
    assert set(comp) <= train_prims  # Every skill it needs was trained.


def test_all_tasks_compute_distinct_functions(bench):
  comps = list(bench.train) + list(bench.heldout) + [(p,) for p in DEFAULT.primitive_names] + [()]
  sigs = [bench.signature(c) for c in comps]
  assert len(set(sigs)) == len(sigs)
  # A composition that the checker must have rejected: sort after sort is sort.
  assert bench.signature(("sort", "reverse", "sort")) == bench.signature(("sort",))
  assert ("sort", "reverse", "sort") not in bench.train + bench.heldout


def test_primitives_behave_as_named():
  a = "abcdefghij"
  assert synthetic.apply(["reverse"], "abc", a) == "cba"
  assert synthetic.apply(["sort"], "cab", a) == "abc"
  assert synthetic.apply(["rotate"], "abc", a) == "bca"
  assert synthetic.apply(["shift"], "abj", a) == "bca"
  assert synthetic.apply(["swap_pairs"], "abcde", a) == "badce"
  assert synthetic.apply(["drop_odd"], "abcde", a) == "ace"
  assert synthetic.apply(["mirror_letters"], "aj", a) == "ja"
  assert synthetic.apply(["riffle"], "abcde", a) == "adbec"
  assert synthetic.apply(["dedupe"], "aabbba", a) == "aba"
  assert synthetic.apply(["append_first"], "abc", a) == "abca"
  assert synthetic.apply(["reverse", "append_first"], "abc", a) == "cbac"


def test_heldout_splits_are_disjoint_and_sized(bench):
  splits = {s: bench.examples("heldout", 0, s)["inputs"] for s in ("train", "validation", "test")}
  assert [len(v) for v in splits.values()] == [DEFAULT.n_shots, DEFAULT.heldout_validation,
                                               DEFAULT.heldout_test]
  assert not set(splits["train"]) & set(splits["test"])
  assert not set(splits["validation"]) & set(splits["test"])


def test_lengths_are_short_and_inputs_carry_no_task_hint(bench):
  ex = bench.examples("compose", 0, "train")
  assert all(DEFAULT.min_length <= len(s) <= DEFAULT.max_length for s in ex["inputs"])
  assert all(set(s) <= set(DEFAULT.alphabet) for s in ex["inputs"])
  assert max(len(t) for t in ex["targets"]) <= DEFAULT.max_length + DEFAULT.max_depth
  prim = bench.examples("primitive", 2, "train")
  assert all(s.startswith(f"{DEFAULT.primitive_names[2]}: ") for s in prim["inputs"])


def test_registered_tasks_and_mixtures():
  mix = seqio.get_mixture_or_task("synthetic_pretrain")
  assert len(mix.tasks) == DEFAULT.n_train_tasks
  assert "synthetic_compose_000_v1" in seqio.TaskRegistry.names()
  held = seqio.get_mixture_or_task("synthetic_heldout_000_v1")
  assert set(held.splits) == {"train", "validation", "test"}
  assert len(seqio.get_mixture_or_task("synthetic_primitives").tasks) == DEFAULT.n_primitives
  ex = next(held.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
  assert ex["task_name"] == b"synthetic_heldout_000_v1"
  comp = synthetic.NAMES["synthetic"]["synthetic_heldout_000_v1"]
  assert ex["targets_pretokenized"].decode() == synthetic.apply(
    comp, ex["inputs_pretokenized"].decode(), DEFAULT.alphabet)
  assert ex["targets"][-1] == 1  # EOS


def test_registration_is_idempotent_and_refuses_a_different_config():
  assert synthetic.register_synthetic() is synthetic.NAMES["synthetic"]
  with pytest.raises(ValueError, match="already registered"):
    synthetic.register_synthetic(dataclasses.replace(DEFAULT, seed=5))


def test_impossible_config_fails_clearly():
  with pytest.raises(ValueError, match="lower n_train_tasks"):
    synthetic.build(synthetic.SyntheticConfig(n_primitives=3, n_train_tasks=100))


def test_exact_match():
  assert synthetic.exact_match(["ab", b"cd"], ["ab", "cx"]) == {"exact_match": 50.0}
  with pytest.raises(ValueError):
    synthetic.exact_match(["a"], [])
  assert np.isnan(synthetic.exact_match([], [])["exact_match"])


def test_default_examples_fit_the_default_job_lengths():
  """The default job's lengths (EOS included) hold every example, described ones too."""
  from mhr_jax.experiments.synthetic import SyntheticSettings

  settings = SyntheticSettings()
  for described, inputs_length in ((False, settings.inputs_length),
                                   (True, settings.described_inputs_length)):
    bench = synthetic.build(dataclasses.replace(settings.task_config, described=described))
    kinds = {"compose": len(bench.train), "heldout": len(bench.heldout),
             "primitive": bench.config.n_primitives}
    longest_in = longest_out = 0
    for kind, n in kinds.items():
      splits = ("train", "validation", "test") if kind == "heldout" else ("train", "validation")
      for i in range(n):
        for split in splits:
          ex = bench.examples(kind, i, split)
          longest_in = max(longest_in, max(len(s.encode()) for s in ex["inputs"]))
          longest_out = max(longest_out, max(len(s.encode()) for s in ex["targets"]))
    assert longest_in + 1 <= inputs_length, (described, longest_in)
    assert longest_out + 1 <= settings.targets_length, longest_out
    # SyntheticConfig.longest bounds what the examples hold (EOS included).
    bound = settings.task_config.longest()
    assert longest_in + 1 <= bound["described_inputs" if described else "inputs"]
    assert longest_out + 1 <= bound["targets"]
  with pytest.raises(ValueError, match="inputs_length = 20 < 22.*truncated"):
    SyntheticSettings(inputs_length=20)
