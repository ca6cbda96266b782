"""T0's multi-task training mixture from P3 (bigscience/P3), the prompted data T0 was trained on.

P3 publishes one configuration per (dataset, template), named by T0's rule (`config_name`), each
with per split the features ``inputs`` / ``targets`` (int32 T5 token ids) and
``inputs_pretokenized`` / ``targets_pretokenized`` (strings). Layout under the P3 directory
(``register_p3(data_dir)``, default ``$MHR_P3_DIR``)::

  data/<config>/<split>-<i>-of-<n>.parquet   the current release (parquet; also read:
                                             <config>/<split>/*.parquet)
  data/<config>/<split>.tfrecord-<i>-of-<n>  the original release (TFRecord shards of
                                             tf.train.Example; info.<split>.json beside them)
  tokenizer/spiece.model                     optional: the vocabulary if $MHR_SPM_PATH is unset

(the config folders may also sit directly in the P3 directory).

``p3_t0_train`` is the MHR authors' pre-training mixture (mttl
``dataloader/t0_dataset_readers.py``, ``T0MixtureReader``, with ``use_t0_templates_as_tasks`` as
``projects/mhr/configs/t0/poly_lora.json`` sets it):
every template of the 38 datasets T0 trains on (`TRAINING_DATASETS`: the rows of mttl's
``dataloader/t0_data/datasets.csv`` marked ``do_train=BASE``) except `TASK_BLACKLIST`, each
(dataset, template) its own task ``p3_<config>`` and so its own task id (313 with promptsource
0.2.3's templates). Mixing is examples-proportional: a template's rate is its number of training
examples capped at ``max_examples_per_dataset`` (500,000) divided by its dataset's number of
templates, and only the first ``cap`` examples are read, as the authors' ``train[0:cap]``. The T0
held-out datasets (`HELD_OUT_DATASETS`) are evaluation data: asking for one is an error.

Token ids are used as stored. A trailing EOS is removed and EOS appended again after truncation to
the feature length, so both releases give T5's layout whether or not their ids end with EOS.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Optional, Sequence, Union

import seqio
import tensorflow as tf

from tasks import common, vocab as vocab_lib

DATA_DIR_ENV = "MHR_P3_DIR"
MIXTURE = "p3_t0_train"
MAX_EXAMPLES_PER_DATASET = 500_000

# (dataset, subset) of T0's training mixture: mttl datasets.csv rows with do_train=BASE.
TRAINING_DATASETS = (
  ("glue", "mrpc"), ("glue", "qqp"), ("paws", "labeled_final"), ("kilt_tasks", "hotpotqa"),
  ("wiki_qa", None), ("adversarial_qa", "dbidaf"), ("adversarial_qa", "dbert"),
  ("adversarial_qa", "droberta"), ("duorc", "SelfRC"), ("duorc", "ParaphraseRC"), ("ropes", None),
  ("quoref", None), ("cos_e", "v1.11"), ("cosmos_qa", None), ("dream", None), ("qasc", None),
  ("quail", None), ("quarel", None), ("quartz", None), ("sciq", None), ("social_i_qa", None),
  ("wiki_hop", "original"), ("wiqa", None), ("amazon_polarity", None), ("app_reviews", None),
  ("imdb", None), ("rotten_tomatoes", None), ("yelp_review_full", None), ("common_gen", None),
  ("wiki_bio", None), ("cnn_dailymail", "3.0.0"), ("gigaword", None), ("multi_news", None),
  ("samsum", None), ("xsum", None), ("ag_news", None), ("dbpedia_14", None), ("trec", None),
)
# The datasets of T0's zero-shot evaluation (datasets.csv, do_eval=BASE).
HELD_OUT_DATASETS = (
  ("super_glue", "rte"), ("super_glue", "cb"), ("anli", None), ("super_glue", "copa"),
  ("hellaswag", None), ("story_cloze", "2016"), ("winogrande", "winogrande_xl"),
  ("super_glue", "wic"), ("super_glue", "wsc.fixed"),
)
# Configs the authors leave out (mttl t0_dataset_readers.py TASK_BLACKLIST: inputs often longer
# than 1024 tokens, or broken cached files); only the last names a training dataset.
TASK_BLACKLIST = (
  "hotpot_qa_distractor_Generate_Explanations", "hotpot_qa_fullwiki_Generate_Explanations",
  "hotpot_qa_distractor_Generate_Answer_and_Explanations",
  "hotpot_qa_fullwiki_Generate_Answer_and_Explanations", "hotpot_qa_fullwiki_Generate_Answer",
  "hotpot_qa_distractor_Generate_Answer", "hotpot_qa_distractor_Generate_Title_2",
  "hotpot_qa_fullwiki_Generate_Title_2", "hotpot_qa_fullwiki_Generate_Title_1",
  "hotpot_qa_distractor_Generate_Title_1", "hotpot_qa_distractor_Generate_Question",
  "hotpot_qa_fullwiki_Generate_Question", "tab_fact_tab_fact_tab_fact_3",
  "tab_fact_tab_fact_tab_fact_2", "tab_fact_tab_fact_tab_fact_1", "tab_fact_tab_fact_tab_fact_7",
  "tab_fact_tab_fact_tab_fact_4", "tab_fact_tab_fact_tab_fact_5", "tab_fact_tab_fact_tab_fact_6",
  "wiki_hop_masked_Choose_Best_Object_Candidate",
  "wiki_hop_masked_Indirect_Question_about_Birthplace_Citizenship_Place_of_Death",
  "narrativeqa_Template_05", "ecthr_cases_alleged_violation_prediction_silver_rationales",
  "gigaword_summarize_",
)
EOS_ID = 1


def config_name(dataset: str, subset: Optional[str], template: str = "") -> str:
  """T0's task (and P3's config) name of a (dataset, subset, template)."""
  name = dataset + (f"_{subset}_" if subset is not None else "_") + template
  return re.sub(r"[^\w\d\._]+", "_", name)


def dataset_key(dataset: str, subset: Optional[str]) -> str:
  """``dataset/subset`` or ``dataset``: how the ``datasets`` argument names a dataset."""
  return f"{dataset}/{subset}" if subset is not None else dataset


_TRAINING = {dataset_key(*d): config_name(*d) for d in TRAINING_DATASETS}
_HELD_OUT = {dataset_key(*d): config_name(*d) for d in HELD_OUT_DATASETS}


def _owner(config: str, prefixes: dict[str, str]) -> Optional[str]:
  """The dataset whose name prefix is the longest one ``config`` starts with."""
  hits = [k for k, p in prefixes.items() if config.startswith(p)]
  return max(hits, key=lambda k: len(prefixes[k])) if hits else None


def find_configs(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Every config folder of a P3 directory: ``{config name: folder}``."""
  base = root / "data" if (root / "data").is_dir() else root
  return {p.name: p for p in sorted(base.iterdir()) if p.is_dir() and p.name != "tokenizer"}


def split_files(folder: pathlib.Path, split: str) -> tuple[str, list[pathlib.Path]]:
  """("parquet" or "tfrecord", the files) of one split of a config folder."""
  parquet = sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"{split}/*.parquet"))
  parquet += [folder / f"{split}.parquet"] if (folder / f"{split}.parquet").is_file() else []
  if parquet:
    return "parquet", parquet
  shards = sorted(folder.glob(f"{split}.tfrecord-*"))
  if shards:
    return "tfrecord", shards
  raise FileNotFoundError(f"P3 config {folder.name}: no {split} split in {folder} (expected "
                          f"{split}-*.parquet or {split}.tfrecord-*-of-*)")


def _has_split(folder: pathlib.Path, split: str) -> bool:
  try:
    split_files(folder, split)
  except FileNotFoundError:
    return False
  return True


def count_examples(folder: pathlib.Path, split: str) -> int:
  """Examples of a split: parquet metadata, P3's ``stats.<split>.json``, or a count of records."""
  fmt, files = split_files(folder, split)
  if fmt == "parquet":
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
  stats = folder / f"stats.{split}.json"
  if stats.is_file():
    return int(json.loads(stats.read_text())["examples"])
  return sum(1 for _ in tf.data.TFRecordDataset([str(f) for f in files]))


_SIGNATURE = {"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32),
              "inputs_pretokenized": tf.TensorSpec([], tf.string),
              "targets_pretokenized": tf.TensorSpec([], tf.string)}


def _read_parquet(files: Sequence[pathlib.Path]) -> tf.data.Dataset:
  import pyarrow.parquet as pq

  def rows():
    for f in files:
      table = pq.ParquetFile(f)
      missing = [c for c in _SIGNATURE if c not in table.schema_arrow.names]
      if missing:
        raise ValueError(f"{f}: no column {missing} (has {table.schema_arrow.names})")
      for batch in table.iter_batches(batch_size=1024, columns=list(_SIGNATURE)):
        cols = {c: batch.column(c).to_pylist() for c in _SIGNATURE}
        for i in range(batch.num_rows):
          yield {c: cols[c][i] for c in _SIGNATURE}

  return tf.data.Dataset.from_generator(rows, output_signature=_SIGNATURE)


def _read_tfrecord(folder: pathlib.Path, split: str,
                   files: Sequence[pathlib.Path]) -> tf.data.Dataset:
  info = folder / f"info.{split}.json"
  if info.is_file():
    declared = json.loads(info.read_text()).get("features", {})
    missing = [c for c in _SIGNATURE if c not in declared]
    if missing:
      raise ValueError(f"{info}: features {missing} missing (has {sorted(declared)})")
  ids = tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True)
  spec = {"inputs": ids, "targets": ids,
          "inputs_pretokenized": tf.io.FixedLenFeature([], tf.string),
          "targets_pretokenized": tf.io.FixedLenFeature([], tf.string)}

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    return {**ex, "inputs": tf.cast(ex["inputs"], tf.int32),
            "targets": tf.cast(ex["targets"], tf.int32)}

  return tf.data.TFRecordDataset([str(f) for f in files]).map(parse)


def _strip_eos(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Removes a trailing EOS from ``inputs`` and ``targets`` (appended again after trimming)."""
  def strip(x):
    n = tf.size(x)
    ends = tf.logical_and(n > 0, tf.equal(x[tf.maximum(n - 1, 0)], EOS_ID))
    return x[: n - tf.cast(ends, tf.int32)]

  return ds.map(lambda ex: {**ex, "inputs": strip(ex["inputs"]), "targets": strip(ex["targets"])})


def _register_task(name: str, folder: pathlib.Path, cap: int, vocabulary: seqio.Vocabulary):
  splits = [s for s in ("train", "validation", "test") if _has_split(folder, s)]

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed
    fmt, files = split_files(folder, split)
    ds = _read_parquet(files) if fmt == "parquet" else _read_tfrecord(folder, split, files)
    return ds.take(cap) if split == "train" else ds

  features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
              "targets": seqio.Feature(vocabulary, add_eos=True)}
  seqio.TaskRegistry.add(
    name, source=seqio.FunctionDataSource(dataset_fn, splits=splits),
    preprocessors=[common.add_task_name(name), _strip_eos,
                   seqio.preprocessors.append_eos_after_trim],
    output_features=features, metric_fns=[], shuffle_buffer_size=10_000)
  return lambda task: float(min(count_examples(folder, "train"), cap))


_REGISTERED: dict[tuple, dict[str, list[str]]] = {}


def register_p3(
  data_dir: Union[None, str, os.PathLike] = None,
  *,
  datasets: Optional[Sequence[str]] = None,
  max_examples_per_dataset: int = MAX_EXAMPLES_PER_DATASET,
  vocabulary: Union[None, str, os.PathLike, seqio.Vocabulary] = None,
) -> dict[str, list[str]]:
  """Registers ``p3_<config>`` tasks of the training datasets and the mixture `MIXTURE`.

  Idempotent with the same arguments; other arguments after a first call fail.

  Args:
    data_dir: the P3 directory (module docstring); default ``$MHR_P3_DIR``.
    datasets: ``dataset`` or ``dataset/subset`` names, a subset of `TRAINING_DATASETS` (default:
      all of them). A held-out dataset is refused.
    max_examples_per_dataset: a dataset's examples are capped at this, shared equally among its
      templates (T0's 500,000).
    vocabulary: a seqio vocabulary or SentencePiece path; default ``$MHR_SPM_PATH`` or
      ``<data_dir>/tokenizer/spiece.model``.

  Returns:
    ``{dataset: [task names]}``.
  """
  wanted = list(_TRAINING) if datasets is None else list(datasets)
  held_out = [d for d in wanted if d in _HELD_OUT]
  if held_out:
    raise ValueError(f"{held_out} are T0 held-out datasets (zero-shot evaluation only): the "
                     f"training mixture must not contain them")
  unknown = [d for d in wanted if d not in _TRAINING]
  if unknown:
    raise ValueError(f"Unknown T0 training datasets {unknown}; known: {sorted(_TRAINING)}")
  root = common.data_root(data_dir, DATA_DIR_ENV, "P3 directory", ".")
  by_dataset: dict[str, list[str]] = {d: [] for d in wanted}
  configs = find_configs(root)
  for config in configs:
    owner = _owner(config, _TRAINING)
    if owner in by_dataset and _owner(config, _HELD_OUT) is None:
      by_dataset[owner].append(config)
  missing = [d for d, found in by_dataset.items() if not found]
  if missing:
    prefixes = [_TRAINING[d] + "*" for d in missing]
    raise FileNotFoundError(f"P3 directory {root} holds no config of the training datasets "
                            f"{missing} (looked for folders named {prefixes})")
  key = (str(root.resolve()), tuple(wanted), max_examples_per_dataset, str(vocabulary))
  if key in _REGISTERED:
    return _REGISTERED[key]
  if _REGISTERED:
    raise ValueError(f"P3 is already registered with other arguments: {next(iter(_REGISTERED))}")
  vocabulary = vocab_lib.resolve(vocabulary, root / "tokenizer" / "spiece.model")
  names, rates = {}, []
  for d, found in by_dataset.items():
    cap = max_examples_per_dataset // len(found)  # counted before the blacklist, as the authors
    names[d] = []
    for config in found:
      if config in TASK_BLACKLIST:
        continue
      name = f"p3_{config}"
      rates.append((name, _register_task(name, configs[config], cap, vocabulary)))
      names[d].append(name)
  seqio.MixtureRegistry.add(MIXTURE, rates)
  logging.info("P3: %d tasks of %d datasets in %s", len(rates), len(names), MIXTURE)
  _REGISTERED[key] = names
  return names
