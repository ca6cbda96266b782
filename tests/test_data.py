"""Task-id table, feature conversion, resumable sharded batches, rank classification."""

import numpy as np
import pytest
import seqio

import tasks.mixtures  # noqa: F401
from mhr_jax import choices, data
from tasks import synthetic

TINY = synthetic.SyntheticConfig(
  n_primitives=6, n_train_tasks=4, n_heldout_tasks=2, train_examples=40, validation_examples=8,
  primitive_examples=20, n_shots=4, heldout_validation=4, heldout_test=10, seed=3)
LENGTHS = {"inputs": 24, "targets": 24}


@pytest.fixture(scope="module")
def tiny():
  return synthetic.register_synthetic(TINY, prefix="tiny")


def _text(tokens):
  return bytes(int(t) - 3 for t in tokens if t > 2).decode()


# ----------------------------------------------------------------------------- table


def test_table_from_mixture_is_sorted_and_round_trips(tiny, tmp_path):
  table = data.TaskIdTable.from_mixture("tiny_pretrain")
  assert table.names == tuple(sorted(n for n in tiny if "_compose_" in n))
  assert table.n_tasks == TINY.n_train_tasks
  table.save(tmp_path / "task_ids.json")
  assert data.TaskIdTable.load(tmp_path / "task_ids.json") == table


def test_extend_appends_new_tasks_after_old_ids(tiny):
  pre = data.TaskIdTable.from_mixture("tiny_pretrain")
  fine = pre.extend_with_mixture("tiny_heldout")
  assert fine.names[: pre.n_tasks] == pre.names
  assert fine.names[pre.n_tasks :] == ("tiny_heldout_000_v1", "tiny_heldout_001_v1")
  data.check_tables_match(pre, fine, allow_new=True)
  with pytest.raises(ValueError, match="not in the saved table"):
    data.check_tables_match(pre, fine)
  assert pre.extend(pre.names) == pre


def test_check_names_every_difference():
  saved = data.TaskIdTable(("a", "b", "c"))
  with pytest.raises(ValueError) as e:
    data.check_tables_match(saved, data.TaskIdTable(("b", "a", "d")))
  msg = str(e.value)
  assert "'a' has id 0 in the saved table but 1 now" in msg
  assert "'b' has id 1 in the saved table but 0 now" in msg
  assert "'c' (id 2) is missing" in msg
  assert "['d']" in msg


def test_table_errors():
  with pytest.raises(ValueError, match="more than once"):
    data.TaskIdTable(("a", "a"))
  with pytest.raises(KeyError, match=r"which holds \['a'\]"):
    data.TaskIdTable(("a",)).ids([b"zz"])
  with pytest.raises(ValueError, match="No seqio task or mixture named 'nope'.*synthetic_pretrain"):
    data.TaskIdTable.from_mixture("nope")


def test_load_rejects_other_files(tmp_path):
  (tmp_path / "x.json").write_text('{"a": 1}')
  with pytest.raises(ValueError, match="not a task-id table"):
    data.TaskIdTable.load(tmp_path / "x.json")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    data.TaskIdTable.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- batches


def test_mixture_batches_carry_the_task_id_of_every_source(tiny):
  table = data.TaskIdTable.from_mixture("tiny_pretrain")
  it = data.BatchIterator("tiny_pretrain", table, LENGTHS, batch_size=16, seed=0)
  seen = set()
  for _ in range(4):
    b = next(it)
    assert b["encoder_input_tokens"].shape == (16, 24) and b["task_ids"].dtype == np.int32
    assert b["decoder_loss_weights"].dtype == np.float32
    for row in range(16):
      name = table.names[b["task_ids"][row]]
      source, target = _text(b["encoder_input_tokens"][row]), _text(b["decoder_target_tokens"][row])
      # The target is the task's own function of the input, so the id names the true source.
      assert synthetic.apply(tiny[name], source, TINY.alphabet) == target
      seen.add(name)
  assert len(seen) == TINY.n_train_tasks
  assert it.position == 4


def test_decoder_inputs_are_targets_shifted_right(tiny):
  table = data.TaskIdTable.from_mixture("tiny_pretrain")
  b = next(data.BatchIterator("tiny_pretrain", table, LENGTHS, batch_size=4))
  tgt = b["decoder_target_tokens"]
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 0], 0)
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:], tgt[:, :-1])
  np.testing.assert_array_equal(b["decoder_loss_weights"], (tgt > 0).astype(np.float32))
  for row in tgt:  # EOS right after the last real token.
    n = int((row > 0).sum())
    assert row[n - 1] == 1


def test_resuming_from_a_position_gives_the_same_batches(tiny):
  table = data.TaskIdTable.from_mixture("tiny_pretrain")
  kw = dict(batch_size=8, seed=7)
  full = [next(it) for it in [data.BatchIterator("tiny_pretrain", table, LENGTHS, **kw)]
          for _ in range(12)]
  resumed = data.BatchIterator("tiny_pretrain", table, LENGTHS, start_batch=9, **kw)
  assert resumed.position == 9
  for expected in full[9:]:  # Crosses the end of the first epoch of some tasks.
    got = next(resumed)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], expected[k])
  other_seed = next(data.BatchIterator("tiny_pretrain", table, LENGTHS, batch_size=8, seed=8))
  assert not np.array_equal(other_seed["encoder_input_tokens"], full[0]["encoder_input_tokens"])


def test_host_shards_partition_the_data(tiny):
  table = data.TaskIdTable(("tiny_heldout_000_v1",))
  kw = dict(split="test", shuffle=False, num_epochs=1, drop_remainder=False, batch_size=3)
  rows = []
  for shard in range(2):
    it = data.BatchIterator("tiny_heldout_000_v1", table, LENGTHS, shard_index=shard, num_shards=2,
                            **kw)
    rows.append([_text(r) for b in it for r in b["encoder_input_tokens"]])
  whole = synthetic.build(TINY).examples("heldout", 0, "test")["inputs"]
  assert len(rows[0]) == len(rows[1]) == TINY.heldout_test // 2
  assert sorted(rows[0] + rows[1]) == sorted(whole)


def test_global_batches_depend_on_data_shards_not_on_processes(tiny):
  """Two processes' halves, and one process reading both shards, give the same global batches,
  also resumed from a position."""
  table = data.TaskIdTable.from_mixture("tiny_pretrain")
  kw = dict(seed=5, data_shards=2)
  one = data.HostBatches("tiny_pretrain", table, LENGTHS, 8, rows=slice(0, 8), **kw)
  halves = [data.HostBatches("tiny_pretrain", table, LENGTHS, 8, rows=slice(4 * p, 4 * p + 4),
                             start_batch=2, **kw) for p in range(2)]
  assert one.shards == (0, 1) and [h.shards for h in halves] == [(0,), (1,)]
  batches = [next(one) for _ in range(4)]
  for expected in batches[2:]:
    got = [next(h) for h in halves]
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), expected[k])
  # A shard's rows are not the other shard's (the halves are distinct data).
  assert not np.array_equal(batches[0]["encoder_input_tokens"][:4],
                            batches[0]["encoder_input_tokens"][4:])
  with pytest.raises(ValueError, match="do not tile"):
    data.HostBatches("tiny_pretrain", table, LENGTHS, 8, rows=slice(0, 4), seed=0, data_shards=1)


def test_iterator_refuses_tasks_outside_the_table(tiny):
  with pytest.raises(KeyError, match="tiny_heldout_001_v1"):
    data.BatchIterator("tiny_heldout", data.TaskIdTable(("tiny_heldout_000_v1",)), LENGTHS, 2)


# ----------------------------------------------------------------------------- rank classification


def _rank_rows():
  vocab = seqio.ByteVocabulary()
  table = data.TaskIdTable(("t_a", "t_b"))
  examples = [
    {"inputs": [10, 11, 1], "answer_choices": ["yes", "no"], "label": 1, "task_name": "t_b"},
    {"inputs": [12, 1], "answer_choices": [b"x", b"yy", b"zzz"], "label": 0, "task_name": "t_a"},
  ]
  return choices.rank_classification_rows(examples, vocab, table, {"inputs": 8, "targets": 6})


def test_rank_rows_repeat_examples_and_task_ids():
  rows = _rank_rows()
  np.testing.assert_array_equal(rows["example_ids"], [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(rows["choice_ids"], [0, 1, 0, 1, 2])
  np.testing.assert_array_equal(rows["is_correct"], [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows["task_ids"], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["encoder_input_tokens"][1], [10, 11, 1, 0, 0, 0, 0, 0])
  assert _text(rows["decoder_target_tokens"][4]) == "zzz"
  np.testing.assert_array_equal(rows["decoder_loss_weights"].sum(1), [4, 3, 2, 3, 4])


def test_rank_prediction_is_length_normalised():
  rows = _rank_rows()
  lengths = rows["decoder_loss_weights"].sum(1)
  # Example 0: "yes" sums to -4 over 4 tokens (-1.0), "no" -3.3 over 3 (-1.1): "yes" wins although
  # "no" has the higher sum. Example 1: -1.0 / 2, -1.2 / 3, -2.0 / 4 -> choice 1.
  loglik = np.array([-4.0, -3.3, -1.0, -1.2, -2.0])
  out = choices.rank_classification_predict(loglik, lengths, rows["example_ids"], rows["choice_ids"],
                                         rows["is_correct"])
  np.testing.assert_array_equal(out["predictions"], [0, 1])
  np.testing.assert_array_equal(out["labels"], [1, 0])
  assert out["accuracy"] == 0.0
  assert choices.rank_accuracy(out["labels"], out["predictions"]) == {"accuracy": 0.0}


def test_rank_batches_pad_the_last_batch_and_padding_is_ignored():
  rows = _rank_rows()
  batches = list(choices.rank_classification_batches(rows, batch_size=4))
  assert len(batches) == 2 and all(b["example_ids"].shape == (4,) for b in batches)
  np.testing.assert_array_equal(batches[1]["example_ids"], [1, -1, -1, -1])
  assert batches[1]["decoder_loss_weights"][1:].sum() == 0
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  loglik = np.where(cat["is_correct"] > 0, -0.1, -5.0)
  loglik[cat["example_ids"] < 0] = 100.0  # Padding must not win.
  out = choices.rank_classification_predict(loglik, cat["decoder_loss_weights"].sum(1),
                                         cat["example_ids"], cat["choice_ids"], cat["is_correct"])
  assert out["accuracy"] == 100.0 and len(out["predictions"]) == 2


def test_rank_rows_reject_label_outside_choices():
  with pytest.raises(ValueError, match="label 2 outside"):
    choices.rank_classification_rows(
      [{"inputs": [5, 1], "answer_choices": ["a", "b"], "label": 2, "task_name": "t"}],
      seqio.ByteVocabulary(), data.TaskIdTable(("t",)), {"inputs": 4, "targets": 4})
