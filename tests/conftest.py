"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Training runs inside the tests (in-process or as subprocesses) share a compilation cache of
# this session, removed at its end, instead of writing to the user's ~/.cache/mhr_jax/jax.
if "MHR_COMPILATION_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="mhr_jax_tests_jax_cache_")
  os.environ["MHR_COMPILATION_CACHE"] = _cache
  atexit.register(shutil.rmtree, _cache, True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """The shared third-party data folder; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared data folder not found at {SHARED_DATA}")
  return SHARED_DATA


PREDICTION_TASK = "test_predictions_v1"


@pytest.fixture(scope="session")
def prediction_task():
  """A small seqio task (8 test examples) whose metric returns the predictions it was given, so
  that tests can compare an evaluation's output with decoding done by hand."""
  import seqio
  import tensorflow as tf

  from tasks import common, synthetic

  if PREDICTION_TASK not in seqio.TaskRegistry.names():
    letters = "abcdefghij"
    inputs = ["".join(letters[(3 * i + 7 * j) % 10] for j in range(4 + i % 4)) for i in range(8)]

    def dataset_fn(split, shuffle_files, seed=None):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": inputs[::-1]})

    def predictions(targets, predictions):
      return {"predictions": [common.as_text(p) for p in predictions], "n": len(targets)}

    common.add_text_task(
        PREDICTION_TASK, seqio.FunctionDataSource(dataset_fn, splits=["test"]),
        synthetic.OUTPUT_FEATURES["targets"].vocabulary, metric_fns=[predictions],
        shuffle_buffer_size=8)
  return PREDICTION_TASK
