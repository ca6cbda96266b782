"""Every gin file parses with --dry_run (models, adapters and overlays alongside a run file),
whatever folders the working directory holds."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest


REPO = pathlib.Path(__file__).resolve().parents[1]
GIN = REPO / "gin_configs"

# Values for every required macro of every file (a macro no file reads is harmless).
RUN_ARGS = ["--gin.MODEL_DIR='/tmp/mhr_dry'", "--gin.MIXTURE='synthetic_pretrain'",
            "--gin.INIT_FROM=None", "--gin.T0_DATA_DIR='/data/t0'",
            "--gin.SUPER_NI_DIR='/data/sni'"]


def _combos():
  runs = [p for p in sorted((GIN / "runs").glob("*.gin")) if not p.name.startswith("_")]
  yield from ([f"experiments/{p.name}"] for p in sorted((GIN / "experiments").glob("*.gin")))
  for model in sorted((GIN / "models").glob("*.gin")):
    yield ["runs/pretrain.gin", f"models/{model.name}", "adapters/mhr.gin"]
  for adapter in sorted((GIN / "adapters").glob("*.gin")):
    for run in runs:
      yield [f"runs/{run.name}", "models/t5_1_1_tiny.gin", f"adapters/{adapter.name}",
             "overlays/cpu_tiny.gin"]


@pytest.fixture
def crowded_cwd(tmp_path):
  """A working directory whose folders are named like the gin subfolders, as after the default
  job (``runs/``) or in a user's project: empty, non-empty, and holding files named like ours
  with contents that would fail to parse. Python can import each folder as a namespace package,
  which is what broke gin's package-resource lookup."""
  cwd = tmp_path / "work"
  (cwd / "runs" / "synthetic" / "backbone").mkdir(parents=True)
  (cwd / "runs" / "synthetic" / "backbone" / "results.json").write_text("{}")
  (cwd / "runs" / "pretrain.gin").write_text("this is not gin ((\n")
  (cwd / "models").mkdir()
  (cwd / "adapters").mkdir()
  (cwd / "adapters" / "notes.txt").write_text("a user's file")
  (cwd / "overlays").mkdir()
  (cwd / "overlays" / "cpu_tiny.gin").write_text("undefined_configurable.x = 1\n")
  (cwd / "experiments").mkdir()
  return cwd


def _env():
  # ``python -m`` puts the working directory first on sys.path, where the folders above become
  # importable; the project comes from PYTHONPATH.
  return {**os.environ, "PYTHONPATH": str(REPO)}


def _dry_run(files, extra=()):
  args = [sys.executable, "-m", "mhr_jax.train", "--dry_run"]
  args += [f"--gin_file={f}" for f in files]
  args += RUN_ARGS
  return subprocess.run(args + list(extra), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_all_gin_files_parse_in_one_process(crowded_cwd):
  """Each combination parses, from a working directory crowded with folders named like the gin
  subfolders; one subprocess per combination would take minutes, so the check runs them in one
  process through the same parse function the entry point uses."""
  code = (
      "import gin, sys\n"
      "from mhr_jax import train\n"
      "combos = " + repr([list(c) for c in _combos()]) + "\n"
      "args = " + repr(RUN_ARGS) + "\n"
      "for files in combos:\n"
      "  gin.clear_config()\n"
      "  extra = [a[len('--gin.'):] for a in args]\n"
      "  train.parse_gin(files, extra, [])\n"
      "  train.main_entry(dry_run=True)\n"
      "  gin.clear_config()\n"
      "print('parsed', len(combos))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=crowded_cwd, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  n = len(list(_combos()))
  assert f"parsed {n}" in out.stdout
  n_files = len(list(GIN.rglob("*.gin")))
  assert n_files >= 20


def test_dry_run_entry_point_prints_operative_config():
  out = _dry_run(["experiments/synthetic.gin"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "synthetic_benchmark" in out.stdout


def test_dry_run_of_a_run_prints_its_parameter_counts_without_training():
  """A single run's --dry_run adds the parameter counts and state per device (eval_shape)."""
  out = _dry_run(["runs/pretrain.gin", "models/t5_1_1_tiny.gin", "adapters/mhr_z.gin",
                  "overlays/cpu_tiny.gin"])
  assert out.returncode == 0, out.stderr[-3000:]
  counts = re.search(r"trainable_per_task ([\d,]+)", out.stdout)
  routing = re.search(r"parameters: routing ([\d,]+)", out.stdout)
  assert counts and routing, out.stdout[-2000:]
  # MHR-z trains routing only: one task's row is the routing table over the mixture's tasks.
  import seqio

  import tasks.mixtures  # noqa: F401  (registers the synthetic mixture)

  n_tasks = len(seqio.get_mixture_or_task("synthetic_pretrain").tasks)
  per_task = int(counts.group(1).replace(",", ""))
  assert per_task * n_tasks == int(routing.group(1).replace(",", ""))


def test_tiny_training_from_a_crowded_working_directory(crowded_cwd):
  """The README's "Using it" command shape, after the default job left ``runs/`` behind."""
  model_dir = crowded_cwd / "runs" / "tiny"
  args = [sys.executable, "-m", "mhr_jax.train", "--gin_file=runs/pretrain.gin",
          "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=adapters/mhr.gin",
          f"--gin_file={REPO / 'gin_configs' / 'overlays' / 'cpu_tiny.gin'}",
          f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE='synthetic_pretrain'",
          "--gin.TRAIN_STEPS=2", "--gin.INPUTS_LENGTH=16", "--gin.TARGETS_LENGTH=16"]
  out = subprocess.run(args, cwd=crowded_cwd, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((model_dir / "results.json").read_text())
  assert results["steps"] == 2 and results["mode"] == "mhr"


def test_gin_file_lookup_order(crowded_cwd, monkeypatch):
  """Project configs win over same-named files of the working directory; the working directory
  is still searched for the user's own files; explicit ./ paths are taken as given."""
  from mhr_jax import train

  monkeypatch.chdir(crowded_cwd)
  assert train.resolve_gin_file("runs/pretrain.gin") == str(GIN / "runs" / "pretrain.gin")
  (crowded_cwd / "mine.gin").write_text("x = 1\n")
  assert train.resolve_gin_file("mine.gin") == str(crowded_cwd / "mine.gin")
  assert train.resolve_gin_file("./runs/pretrain.gin") == str(crowded_cwd / "runs" / "pretrain.gin")
  with pytest.raises(FileNotFoundError, match="models/nothere.gin"):
    train.resolve_gin_file("models/nothere.gin")


def test_removed_anneal_binding_is_refused(tmp_path):
  """The routing anneal was removed (no paper run uses it, docs/paper_settings.md); a gin file
  that still sets it fails at parse time with gin's unknown-parameter error, not silently."""
  import gin
  from mhr_jax import errors, train

  old = tmp_path / "old.gin"
  old.write_text("AdapterConfig.anneal_steps = 100\n")
  gin.clear_config()
  try:
    with pytest.raises(errors.ConfigError, match="anneal_steps"):
      train.parse_gin([str(old)], [], [])
  finally:
    gin.clear_config()


def _parse(files, bindings=()):
  """The operative (N_SPLITS, LORA_RANK, AdapterConfig.mode) of a parse in this process."""
  import gin
  from mhr_jax import train

  gin.clear_config()
  try:
    train.parse_gin(files, [a[len("--gin."):] for a in RUN_ARGS] + list(bindings), [])
    return tuple(gin.query_parameter(q) for q in (
        "N_SPLITS/gin.macro.value", "LORA_RANK/gin.macro.value", "AdapterConfig.mode"))
  finally:
    gin.clear_config()


def test_generic_adapter_file_resetting_a_preset_knob_is_refused():
  """``adapters/<mode>.gin`` after a preset would reset its knobs to the file's own defaults
  (T0: S 64 -> 8; Super-NI: rank 16 -> 1); the parse fails naming both files, the knob, both
  values and the overlay to use. The overlays, a binding after the files, or a knob the adapter
  file leaves as the preset set it, pass."""
  from mhr_jax import errors

  with pytest.raises(errors.ConfigError, match=(
      r"adapters/mhr_z\.gin sets N_SPLITS = 8 after experiments/t0_pretrain\.gin set it to 64"
      r".*--gin_file=overlays/method_mhr_z\.gin instead of adapters/mhr_z\.gin")):
    _parse(["experiments/t0_pretrain.gin", "adapters/mhr_z.gin"])
  with pytest.raises(errors.ConfigError, match=(
      r"adapters/poly\.gin sets LORA_RANK = 1 after experiments/super_ni_pretrain\.gin set it "
      r"to 16.*overlays/method_poly\.gin")):
    _parse(["experiments/super_ni_pretrain.gin", "adapters/poly.gin"])
  assert _parse(["experiments/t0_pretrain.gin", "overlays/method_mhr_z.gin"]) == (64, 1, "mhr_z")
  assert _parse(["experiments/t0_pretrain.gin", "adapters/mhr_z.gin"],
                ["N_SPLITS = 8"]) == (8, 1, "mhr_z")
  assert _parse(["experiments/t0_pretrain.gin", "adapters/lora.gin"])[2] == "lora"
