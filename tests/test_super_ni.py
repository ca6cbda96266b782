"""Super-NaturalInstructions from task files in the official format, written here."""

import json
import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

from mhr_jax import data
from tasks import super_ni

VOCAB = seqio.ByteVocabulary()


def _task(name, n, definition="Reverse the words.", drop_output_of=()):
  return {
    "Definition": [definition],
    "Positive Examples": [{"input": "a b", "output": "b a", "explanation": "."},
                          {"input": "c d e", "output": "e d c", "explanation": "."},
                          {"input": "unused", "output": "unused", "explanation": "."}],
    "Negative Examples": [],
    "Instances": [{"id": f"{name}-{i}", "input": f"w{i} x{i}",
                   "output": [] if i in drop_output_of else [f"x{i} w{i}", f"alt{i}"]}
                  for i in range(n)],
  }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("super_ni")
  (root / "tasks").mkdir()
  (root / "splits" / "default").mkdir(parents=True)
  files = {"task001_reverse_words": _task("t1", 150), "task002_other": _task("t2", 30, "Other."),
           "task900_heldout": _task("t9", 200, drop_output_of=(3,))}
  for name, content in files.items():
    (root / "tasks" / f"{name}.json").write_text(json.dumps(content))
  (root / "splits/default/train_tasks.txt").write_text("task001_reverse_words\ntask002_other\n")
  (root / "splits/default/test_tasks.txt").write_text("task900_heldout\n")
  return root


@pytest.fixture(scope="module")
def names(root):
  return super_ni.register_super_ni(root, vocabulary=VOCAB, max_instances=100)


def _split(name, split):
  return list(seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
              .as_numpy_iterator())


def test_registers_tasks_and_mixtures(names, root):
  assert names == {"train": ["super_ni_task001_reverse_words", "super_ni_task002_other"],
                   "test": ["super_ni_task900_heldout"]}
  assert len(seqio.get_mixture_or_task("super_ni_train").tasks) == 2
  assert super_ni.register_super_ni(root, vocabulary=VOCAB, max_instances=100) is names
  with pytest.raises(ValueError, match="already registered"):
    super_ni.register_super_ni(root, vocabulary=VOCAB, max_instances=7)


def test_prompt_has_definition_k_positive_examples_and_instance(names):
  ex = _split("super_ni_task001_reverse_words", "train")[0]
  text = ex["inputs_pretokenized"].decode()
  i = text.split("Input: w")[-1].split(" ")[0]
  assert text == (
    "Definition: Reverse the words.\n\n"
    "Positive Example 1 -\nInput: a b\nOutput: b a\n\n"
    "Positive Example 2 -\nInput: c d e\nOutput: e d c\n\n"
    f"Now complete the following example -\nInput: w{i} x{i}\nOutput:")
  assert ex["targets_pretokenized"].decode() == f"x{i} w{i}"
  assert [r.decode() for r in ex["references"]] == [f"x{i} w{i}", f"alt{i}"]
  assert ex["task_name"] == b"super_ni_task001_reverse_words"


def test_at_most_n_instances_and_disjoint_few_shot_splits(names):
  assert len(_split("super_ni_task001_reverse_words", "train")) == 100
  assert len(_split("super_ni_task002_other", "train")) == 30
  splits = {s: {e["targets_pretokenized"] for e in _split("super_ni_task900_heldout", s)}
            for s in ("train", "validation", "test")}
  assert [len(v) for v in splits.values()] == [32, 32, 100]
  assert not (splits["train"] & splits["test"]) and not (splits["validation"] & splits["test"])
  # The benchmark evaluates a test task's first instances, in file order (instance 3 has none).
  test = [e["targets_pretokenized"].decode() for e in _split("super_ni_task900_heldout", "test")]
  assert test == [f"x{i} w{i}" for i in range(101) if i != 3]


def test_instances_without_output_are_counted_and_logged(root, caplog):
  with caplog.at_level(logging.INFO):
    out = super_ni.examples(root / "tasks/task900_heldout.json", {"all": 1000}, 2, 0)
  assert len(out["all"]) == 199
  assert "dropped 1 of 200 instances" in caplog.text


def test_rouge_l_takes_the_best_reference():
  assert super_ni.rouge_l(["the cat sat"], ["the cat sat"]) == {"rougeL": 100.0}
  # LCS 2 of 3 reference words, precision 1: F = 0.8.
  assert super_ni.rouge_l([["dog", "the cat sat"]], ["the cat"])["rougeL"] == pytest.approx(80.0)
  assert super_ni.rouge_l([[b"x"]], [b"y"]) == {"rougeL": 0.0}


def test_postprocess_gives_references_as_targets(names):
  task = seqio.get_mixture_or_task("super_ni_task002_other")
  ex = _split("super_ni_task002_other", "train")[0]
  refs = task.postprocess_fn(None, example=ex, is_target=True)
  assert len(refs) == 2 and refs[0] == ex["targets_pretokenized"].decode()
  assert task.postprocess_fn(b"pred") == "pred"


def test_mixture_batches_carry_task_ids(names):
  table = data.TaskIdTable.from_mixture("super_ni_train").extend_with_mixture("super_ni_test")
  assert table.names[-1] == "super_ni_task900_heldout"
  it = data.BatchIterator("super_ni_train", table, {"inputs": 160, "targets": 16}, 16, seed=1)
  b = next(it)
  for row in range(16):
    text = VOCAB.decode(b["encoder_input_tokens"][row].tolist())
    expect = "Other." if "Other." in text else "Reverse the words."
    assert table.names[b["task_ids"][row]] == (
      "super_ni_task002_other" if expect == "Other." else "super_ni_task001_reverse_words")
  assert np.all(b["task_ids"] < 2)


def test_bad_input_names_the_file(tmp_path):
  bad = tmp_path / "tasks"
  bad.mkdir()
  (bad / "broken.json").write_text('{"Definition": ["x"],\n "Instances": [}')
  with pytest.raises(ValueError, match=r"broken.json:2: malformed JSON"):
    super_ni.load_task(bad / "broken.json")
  (bad / "nodef.json").write_text('{"Instances": []}')
  with pytest.raises(ValueError, match=r"nodef.json: no 'Definition' field"):
    super_ni.load_task(bad / "nodef.json")
  (tmp_path / "splits/default").mkdir(parents=True)
  (tmp_path / "splits/default/train_tasks.txt").write_text("broken\n")
  with pytest.raises(FileNotFoundError, match=r"test_tasks.txt"):
    super_ni.register_super_ni(tmp_path, vocabulary=VOCAB)
  (tmp_path / "splits/default/test_tasks.txt").write_text("task404_missing\n")
  with pytest.raises(FileNotFoundError, match=r"'task404_missing' listed in .*test_tasks.txt.*"
                                              r"task404_missing.json"):
    super_ni.register_super_ni(tmp_path, vocabulary=VOCAB)


def test_missing_directory(tmp_path, monkeypatch):
  monkeypatch.delenv(super_ni.DATA_DIR_ENV, raising=False)
  with pytest.raises(ValueError, match="MHR_SUPER_NI_DIR"):
    super_ni.register_super_ni()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    super_ni.register_super_ni(tmp_path / "nowhere")


def test_authors_prompt_layout():
  task = _task("t", 1, definition="Reverse the words")
  assert super_ni.prompt(task, " w0 x0 ", 0, "mttl") == (
    "Task definition: Reverse the words.\n"
    "Now complete the following example -\nInput: w0 x0.\nOutput:")
  assert super_ni.prompt(task, "Why?", 1, "mttl") == (
    "Task definition: Reverse the words.\n"
    " Positive Example 1 -\nInput: a b.\n Output: b a.\n\n"
    "Now complete the following example -\nInput: Why?\nOutput:")
  with pytest.raises(ValueError, match="prompt style"):
    super_ni.prompt(task, "x", 0, "alpaca")


def test_long_prompts_keep_their_end():
  end = list(VOCAB.encode("\nOutput:"))
  ds = tf.data.Dataset.from_tensors({"inputs": tf.range(3, 40, dtype=tf.int32)})
  short = tf.data.Dataset.from_tensors({"inputs": tf.range(3, 10, dtype=tf.int32)})
  cut = next(iter(super_ni.keep_prompt_end(end)(ds, {"inputs": 20})))["inputs"].numpy().tolist()
  assert len(cut) == 19 and cut[-len(end):] == end and cut[:10] == list(range(3, 13))
  same = next(iter(super_ni.keep_prompt_end(end)(short, {"inputs": 20})))["inputs"].numpy()
  assert same.tolist() == list(range(3, 10))


def test_sampled_targets_vary_between_visits(root):
  name = "super_ni_sampled_targets_probe"
  super_ni._register_task(name, root / "tasks/task002_other.json", {"train": 30}, 0, 0, VOCAB,
                          "mttl", True)
  ds = seqio.get_mixture_or_task(name).get_dataset(
    {"inputs": 64, "targets": 8}, split="train", shuffle=False, seed=3, num_epochs=4)
  seen = {}
  for ex in ds.as_numpy_iterator():
    seen.setdefault(ex["inputs_pretokenized"], set()).add(ex["targets_pretokenized"])
    assert ex["targets_pretokenized"] in set(ex["references"])
    assert ex["inputs_pretokenized"].startswith(b"Task definition: Other.\n")
  assert len(seen) == 30 and sum(len(v) == 2 for v in seen.values()) > 10
