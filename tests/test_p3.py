"""The T0 training mixture from P3, on small shards written here in both published layouts."""

import json

import pytest
import seqio
import tensorflow as tf

from mhr_jax import data
from tasks import p3

VOCAB = seqio.ByteVocabulary()


def _rows(config, n, eos):
  """n examples whose ids encode (config, row) so every output can be traced back."""
  out = []
  for i in range(n):
    inp, tgt = f"{config[:6]} in {i}", f"out {i}"
    ids_in, ids_tgt = list(VOCAB.encode(inp)), list(VOCAB.encode(tgt))
    out.append({"inputs": ids_in + [1] * eos, "targets": ids_tgt + [1],
                "inputs_pretokenized": inp, "targets_pretokenized": tgt})
  return out


def _write_parquet(folder, split, rows):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  folder.mkdir(parents=True, exist_ok=True)
  table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
  pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")


def _write_tfrecord(folder, split, rows, with_info=True):
  folder.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(folder / f"{split}.tfrecord-00000-of-00001")) as w:
    for r in rows:
      feats = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=r[k]))
               for k in ("inputs", "targets")}
      feats.update({k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[r[k].encode()]))
                    for k in ("inputs_pretokenized", "targets_pretokenized")})
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
  if with_info:
    features = {"inputs": {"dtype": "int32", "shape": [None]},
                "targets": {"dtype": "int32", "shape": [None]},
                "inputs_pretokenized": {"dtype": "string", "shape": []},
                "targets_pretokenized": {"dtype": "string", "shape": []}}
    (folder / f"info.{split}.json").write_text(json.dumps({"features": features, "num_shards": 1}))
    (folder / f"stats.{split}.json").write_text(json.dumps({"examples": len(rows)}))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("p3")
  d = root / "data"
  _write_parquet(d / "glue_mrpc_equivalent", "train", _rows("glue_mrpc_equivalent", 5, eos=True))
  _write_parquet(d / "glue_mrpc_equivalent", "validation", _rows("glue_mrpc_equivalent", 2, True))
  _write_tfrecord(d / "glue_mrpc_paraphrase", "train", _rows("glue_mrpc_paraphrase", 3, eos=False))
  _write_tfrecord(d / "imdb_Movie_Expressed_Sentiment", "train",
                  _rows("imdb_Movie_Expressed_Sentiment", 4, eos=True), with_info=False)
  _write_tfrecord(d / "gigaword_TLDR", "train", _rows("gigaword_TLDR", 2, eos=True))
  _write_tfrecord(d / "gigaword_summarize_", "train", _rows("gigaword_summarize_", 2, eos=True))
  _write_tfrecord(d / "super_glue_rte_GPT_3_style", "train", _rows("super_glue_rte", 2, True))
  return root


@pytest.fixture(scope="module")
def names(root):
  return p3.register_p3(root, datasets=["glue/mrpc", "imdb", "gigaword"], vocabulary=VOCAB,
                        max_examples_per_dataset=8)


def test_config_names_follow_t0():
  assert p3.config_name("cos_e", "v1.11", "aligned with common sense") == (
    "cos_e_v1.11_aligned_with_common_sense")
  assert p3.config_name("super_glue", "wsc.fixed", "GPT-3 Style") == (
    "super_glue_wsc.fixed_GPT_3_Style")
  assert p3.config_name("imdb", None, "Movie Expressed Sentiment 2") == (
    "imdb_Movie_Expressed_Sentiment_2")
  assert len(p3.TRAINING_DATASETS) == 38


def test_one_task_per_template_blacklist_and_held_out_left_out(names):
  assert names == {"glue/mrpc": ["p3_glue_mrpc_equivalent", "p3_glue_mrpc_paraphrase"],
                   "imdb": ["p3_imdb_Movie_Expressed_Sentiment"], "gigaword": ["p3_gigaword_TLDR"]}
  table = data.TaskIdTable.from_mixture(p3.MIXTURE)
  assert table.n_tasks == 4 and "p3_super_glue_rte_GPT_3_style" not in table.names


def test_both_layouts_give_t5_layout_with_one_eos(names):
  lengths = {"inputs": 64, "targets": 16}
  for task in ("p3_glue_mrpc_equivalent", "p3_glue_mrpc_paraphrase"):  # parquet, TFRecord
    exs = list(data.get_examples(task, "train", lengths).as_numpy_iterator())
    for i, ex in enumerate(exs):
      assert ex["inputs"].tolist() == list(VOCAB.encode(f"{task[3:9]} in {i}")) + [1]
      assert ex["targets"].tolist() == list(VOCAB.encode(f"out {i}")) + [1]
      assert ex["task_name"] == task.encode()
  short = next(data.get_examples("p3_glue_mrpc_equivalent", "train", {"inputs": 4, "targets": 3})
               .as_numpy_iterator())
  assert short["inputs"].tolist()[-1] == 1 and len(short["inputs"]) == 4
  val = data.get_examples("p3_glue_mrpc_equivalent", "validation").as_numpy_iterator()
  assert len(list(val)) == 2


def test_cap_reads_the_first_examples_and_sets_the_rate(names):
  # 8 examples for glue/mrpc's 2 templates: 4 each; the 5-row parquet template reads 4.
  exs = list(data.get_examples("p3_glue_mrpc_equivalent", "train").as_numpy_iterator())
  assert [e["targets_pretokenized"] for e in exs] == [f"out {i}".encode() for i in range(4)]
  mixture = seqio.get_mixture_or_task(p3.MIXTURE)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  # gigaword: 2 configs present (the blacklisted one counts), cap 4, 2 rows -> rate 2.
  assert rates == {"p3_glue_mrpc_equivalent": 4.0, "p3_glue_mrpc_paraphrase": 3.0,
                   "p3_imdb_Movie_Expressed_Sentiment": 4.0, "p3_gigaword_TLDR": 2.0}
  table = data.TaskIdTable.from_mixture(p3.MIXTURE)
  batch = next(data.BatchIterator(p3.MIXTURE, table, {"inputs": 32, "targets": 8}, 8, seed=0))
  assert batch["task_ids"].shape == (8,) and batch["task_ids"].max() < 4


def test_held_out_unknown_and_missing_datasets_are_refused(root, monkeypatch):
  with pytest.raises(ValueError, match=r"\['super_glue/rte'\] are T0 held-out datasets"):
    p3.register_p3(root, datasets=["imdb", "super_glue/rte"], vocabulary=VOCAB)
  with pytest.raises(ValueError, match=r"Unknown T0 training datasets \['mnli'\]"):
    p3.register_p3(root, datasets=["mnli"], vocabulary=VOCAB)
  with pytest.raises(FileNotFoundError, match=r"\['ag_news'\].*ag_news_"):
    p3.register_p3(root, datasets=["ag_news"], vocabulary=VOCAB)
  monkeypatch.delenv(p3.DATA_DIR_ENV, raising=False)
  with pytest.raises(ValueError, match="MHR_P3_DIR"):
    p3.register_p3(vocabulary=VOCAB)


def test_bad_shards_are_named(tmp_path):
  folder = tmp_path / "imdb_x"
  _write_tfrecord(folder, "train", _rows("imdb_x", 1, True))
  (folder / "info.train.json").write_text(json.dumps({"features": {"inputs": {}}}))
  with pytest.raises(ValueError, match=r"info.train.json: features \['targets'"):
    p3._read_tfrecord(folder, "train", p3.split_files(folder, "train")[1])
  with pytest.raises(FileNotFoundError, match="no validation split"):
    p3.split_files(folder, "validation")


def test_data_config_p3_data_dir_registers_from_its_folder(root, names):
  """DataConfig.p3_data_dir reaches register_p3 (here the whole training list, which the fixture
  folder lacks, so the error names that folder)."""
  from mhr_jax import trainer

  cfg = trainer.DataConfig(mixture=p3.MIXTURE, p3_data_dir=str(root))
  with pytest.raises(FileNotFoundError, match=f"P3 directory {root} holds no config"):
    cfg.register()
