"""The command line's console on a CPU machine: no TensorFlow start-up lines, no ``E...`` lines,
each absl warning once (``mhr_jax.console``). These run ``python -m mhr_jax.train`` in a
subprocess: the start-up lines are printed once per process, at TensorFlow's import."""

import logging
import os
import re
import subprocess
import sys

import pytest

from mhr_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--gin_file=runs/pretrain.gin", "--gin_file=models/t5_1_1_tiny.gin",
       "--gin_file=adapters/mhr.gin", "--gin_file=overlays/cpu_tiny.gin",
       "--gin.MIXTURE='synthetic_pretrain'"]
CPP_LOG = re.compile(r"^[IWEF]\d{4} ")  # a C++ log line (absl / TensorFlow / XLA)
UNCACHED = "Using an uncached FunctionDataset for training is not recommended"


def _stderr(*args, timeout=600):
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS", "JAX_PLATFORMS")}  # as a user runs it
  proc = subprocess.run([sys.executable, "-m", "mhr_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr
  return proc.stderr.splitlines()


def _assert_quiet(lines):
  loud = [line for line in lines if CPP_LOG.match(line) or "absl::InitializeLog" in line
          or re.search(r"oneDNN|cuda|cuInit|error", line, re.IGNORECASE)]
  assert not loud, "\n".join(loud)


def test_command_line_starts_without_tensorflow_lines(tmp_path):
  """A dry run imports TensorFlow (the task registry) and nothing else prints."""
  lines = _stderr(*RUN, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--dry_run", timeout=300)
  _assert_quiet(lines)
  assert lines == [], lines


@pytest.mark.slow  # the default CPU job (4 steps of the tiny MHR run): ~65 s on 2 cores
def test_default_job_prints_nothing_that_looks_like_an_error(tmp_path):
  lines = _stderr(*RUN, f"--gin.MODEL_DIR='{tmp_path / 'run'}'")
  _assert_quiet(lines)
  assert sum(UNCACHED in line for line in lines) <= 1, lines
  assert any("4/4" in line for line in lines), lines  # the progress line is still there


def test_repeated_absl_warnings_collapse_to_one(caplog):
  console.collapse_repeated_warnings("mhr_jax.test_console")
  console.collapse_repeated_warnings("mhr_jax.test_console")  # adding it twice changes nothing
  log = logging.getLogger("mhr_jax.test_console")
  with caplog.at_level(logging.INFO, logger="mhr_jax.test_console"):
    for task in ("a", "b", "c"):
      log.warning("uncached dataset")
      log.warning("task %s has no validation split", task)
      log.error("bad")
  got = [(r.levelname, r.getMessage()) for r in caplog.records]
  assert got.count(("WARNING", "uncached dataset")) == 1
  assert [m for lvl, m in got if m.startswith("task")] == [
      f"task {t} has no validation split" for t in "abc"]  # different messages all pass
  assert got.count(("ERROR", "bad")) == 3  # errors are never collapsed
