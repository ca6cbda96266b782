"""A run whose model directory is a bucket (``gs://``), on a stand-in for Cloud Storage.

``fake_gcs`` serves ``gs://`` from a local folder at the two places files are reached: every
``etils.epath`` operation (``epath.testing.mock_epath``) and the tensorstore key-value store that
orbax opens for a ``gs://`` checkpoint (orbax's own ``gcs_utils.get_kvstore_for_gcs``, which would
otherwise name TensorStore's ``gcs`` driver). Everything else runs orbax's Cloud Storage path:
steps written in place and committed by their marker file, no rename.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing

from mhr_jax import adapters, checkpoint_integrity, checkpoints, paths, report, sweep, trainer
from test_report import t0_sweep

TINY = {"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4,
        "num_layers": 1, "dropout_rate": 0.0}
GS = "gs://"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """``gs://BUCKET/PATH`` read and written at ``<tmp>/gcs/BUCKET/PATH``; yields that folder."""
  from orbax.checkpoint._src.path import gcs_utils

  root = tmp_path / "gcs"
  root.mkdir()

  def local(path):
    s = os.fspath(path)
    return str(root / s[len(GS):]) if s.startswith(GS) else s

  def remote(path):
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else GS + rel

  def one(orig, path, *args, **kwargs):
    return orig(local(path), *args, **kwargs)

  def two(orig, path, dst, *args, **kwargs):
    return orig(local(path), local(dst), *args, **kwargs)

  def glob(orig, pattern):
    return [remote(p) for p in orig(local(pattern))]

  def walk(orig, top, **kwargs):
    for folder, dirs, files in orig(local(top), **kwargs):
      yield remote(folder), dirs, files

  # epath serves gs:// with TensorFlow whenever it is installed; the mocked backend needs the
  # table epath consults otherwise.
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": local(path)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(gcs_utils, "rmtree",
                      lambda path, missing_ok=False: epath.Path(path).rmtree(missing_ok=missing_ok))
  monkeypatch.chdir(tmp_path)  # a gs:// path taken for a relative local one would land here
  with epath_testing.mock_epath(
      open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
    yield root
  assert not (tmp_path / "gs:").exists(), "something wrote gs:// paths as local relative ones"


def test_appended_file_keeps_earlier_lines_on_a_bucket(fake_gcs):
  path = "gs://bucket/run/metrics.jsonl"
  epath.Path(path).parent.mkdir(parents=True)
  epath.Path(path).write_text("old\n")
  out = paths.AppendedFile(path, interval=3600)
  out.write("a\n")
  assert (fake_gcs / "bucket/run/metrics.jsonl").read_text() == "old\n"  # not yet written out
  out.close()
  assert (fake_gcs / "bucket/run/metrics.jsonl").read_text() == "old\na\n"
  assert paths.run_dir("gs://bucket/run") == epath.Path("gs://bucket/run")
  assert paths.run_dir("rel") == epath.Path(os.path.abspath("rel"))


def test_pending_directory_of_a_step_written_in_place(fake_gcs):
  steps = epath.Path("gs://bucket/run/checkpoints")
  (steps / "4").mkdir(parents=True)
  assert checkpoint_integrity.pending_directory(steps, 4) == steps / "4"
  (steps / "4" / checkpoint_integrity.COMMIT_MARKER).write_text("done")
  with pytest.raises(FileNotFoundError, match="no uncommitted directory of step 4"):
    checkpoint_integrity.pending_directory(steps, 4)


def test_report_and_sweep_plan_read_runs_in_a_bucket(fake_gcs):
  t0_sweep(fake_gcs / "bucket" / "sweep")  # 12 runs and sweep.json, as the sweep lays them out
  tables = report.report(["gs://bucket/sweep"])
  mhr = tables["t0"]["methods"]["mhr"]
  # By hand (tests/test_report.py's scores): rte median(60, 70, 65), cb median(50, 80, 90).
  assert (mhr["datasets"]["rte"]["median"], mhr["datasets"]["cb"]["median"]) == (65.0, 80.0)
  assert mhr["runs"][0].startswith("gs://bucket/sweep/mhr/") and len(mhr["runs"]) == 6
  out = paths.run_dir("gs://bucket/sweep")
  (fake_gcs / "bucket/sweep/mhr/rte/seed_0/results.json").unlink()
  plan = json.loads((out / sweep.SWEEP_FILE).read_text())
  assert [r["dir"] for r in sweep.pending(out, plan)] == ["mhr/rte/seed_0"]
  with pytest.raises(report.ReportError, match="seed_0"):  # planned, not finished: named
    report.report(["gs://bucket/sweep"])


def _run(model_dir, steps):
  return trainer.run(
      kind="pretrain", model_dir=model_dir,
      model_config=trainer.ModelConfig(size="tiny", overrides=TINY),
      adapter_config=adapters.AdapterConfig(mode="poly", n_skills=2, lora_rank=2,
                                            layers="super_ni"),
      data_config=trainer.DataConfig(mixture="synthetic_pretrain", batch_size=8,
                                     feature_lengths={"inputs": 16, "targets": 16}),
      train_config=trainer.TrainConfig(steps=steps, checkpoint_every=1, log_every=1))


@pytest.mark.slow  # two short training runs: ~60 s on 2 cores
def test_a_run_on_a_bucket_writes_everything_there_and_resumes(fake_gcs):
  run = "gs://bucket/runs/poly"
  first = _run(run, 2)
  local = pathlib.Path(fake_gcs, "bucket/runs/poly")
  ckpts = local / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2"]  # written in place, no tmp dirs
  for step in ("1", "2"):
    assert (ckpts / step / checkpoint_integrity.COMMIT_MARKER).exists()
    assert not checkpoint_integrity.problems(ckpts / step)  # manifest written before the commit
  second = _run(run, 3)
  assert (first["resumed_from"], second["resumed_from"]) == (0, 2)
  for name in ("config.gin", "task_ids.json", "results.json"):
    assert (local / name).is_file(), name
  assert list((local / "tensorboard").glob("events.out.tfevents.*"))
  steps = [int(line.split('"step": ')[1].split(",")[0])
           for line in (local / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]  # the resumed run's line follows the first run's
  meta = checkpoints.read_metadata(run)
  assert meta["step"] == 3 and meta["path"] == run
  saved = checkpoints.read_params(run)
  assert saved and all(np.isfinite(v).all() for v in saved.values())
