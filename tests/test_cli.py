"""The command line reports expected failures as one message on stderr and exit status 1, the
traceback only behind ``--traceback``.

``train.main`` runs in this process: a subprocess per case would pay a JAX start-up each. The
failures that need a finished run (a mode mismatch on resume, a damaged checkpoint) are in
``test_trainer.py``.
"""

import gin
import pytest

from mhr_jax import checkpoints, compilation_cache, errors, hf_import, train

RUN = ["--gin_file=runs/pretrain.gin", "--gin_file=models/t5_1_1_tiny.gin",
       "--gin_file=adapters/mhr.gin", "--gin_file=overlays/cpu_tiny.gin",
       "--gin.MIXTURE='synthetic_pretrain'"]


@pytest.fixture(autouse=True)
def clean_gin(monkeypatch):
  # In process, the command line's persistent compilation cache would stay on (in the user's
  # cache folder) for the rest of the test session.
  monkeypatch.setenv(compilation_cache.ENV, "off")
  gin.clear_config()
  yield
  gin.clear_config()


def _main(capsys, *args):
  """(exit status, stderr) of ``python -m mhr_jax.train *args``."""
  capsys.readouterr()
  status = train.main(list(args))
  return status, capsys.readouterr().err


def _assert_reported(status, err, *fragments):
  assert status == 1, err
  assert err.startswith("error: "), err
  assert "Traceback" not in err and "In call to configurable" not in err, err
  assert len(err.splitlines()) <= 5, err  # the message (gin adds where), the --traceback hint
  for fragment in fragments:
    assert fragment in err, err


def test_one_error_class_per_failure():
  assert hf_import.CheckpointMismatchError is checkpoints.CheckpointMismatchError
  assert checkpoints.CheckpointMismatchError is errors.CheckpointMismatchError
  for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError,
              errors.CheckpointMismatchError, errors.FileSystemError, errors.MissingFileError,
              errors.NonFiniteLossError):
    assert issubclass(cls, errors.MhrError), cls
  # Each also is the built-in it refines, so existing handlers keep catching it.
  assert issubclass(errors.MissingFileError, FileNotFoundError)
  assert issubclass(errors.ConfigError, ValueError)


def test_configuration_errors_are_one_message(capsys, tmp_path):
  # A preset's dry run without its required MODEL_DIR.
  _assert_reported(*_main(capsys, "--dry_run", *RUN), "required gin macro MODEL_DIR",
                   "--gin.MODEL_DIR=")
  # An unknown parameter.
  _assert_reported(*_main(capsys, *RUN, f"--gin.MODEL_DIR='{tmp_path}'",
                          "--gin.TrainConfig.stepz=3"), "TrainConfig", "stepz")
  # A gin file that does not exist.
  _assert_reported(*_main(capsys, "--gin_file=runs/nothere.gin"),
                   "gin file not found: runs/nothere.gin")
  # A configuration error raised inside a gin-configured call (gin's context lines dropped).
  _assert_reported(*_main(capsys, "--dry_run", *RUN, f"--gin.MODEL_DIR='{tmp_path}'",
                          "--gin.AdapterConfig.mode='mhx'"), "unknown adapter mode 'mhx'")


def test_traceback_flag_raises_the_failure_itself():
  with pytest.raises(errors.ConfigError, match="MODEL_DIR"):
    train.main(["--traceback", "--dry_run", *RUN])


def test_unwritable_model_dir_is_one_message(capsys, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")  # a folder cannot be made under a file, even by root
  _assert_reported(*_main(capsys, *RUN, f"--gin.MODEL_DIR='{blocker / 'run'}'"),
                   "cannot write to the model directory", str(blocker / "run"))


def test_unknown_flag_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as exit_:
    train.main(["--gin_file=x.gin", "--bogus"])
  assert exit_.value.code == 2
  assert "--bogus" in capsys.readouterr().err
