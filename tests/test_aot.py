"""Ahead-of-time compile check (``mhr_jax.aot``): abstract sharded state, compiled train step,
per-device memory. Fast at a tiny size on the 8 fake CPU devices; the T0 T5-XL preset is slow."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from mhr_jax import adapters, aot, network, optimizers, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = network.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                        dropout_rate=0.0)
MHR = adapters.AdapterConfig(mode="mhr", n_skills=2, n_splits=2, lora_rank=2, layers="super_ni")
ADAFACTOR = optimizers.OptimizerConfig(name="adafactor")  # its factored moments need care


def _state(strategy, data, model):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=data, model=model))
  return aot.abstract_train_state(TINY, MHR, ADAFACTOR, mesh, sharding.logical_rules(strategy),
                                  n_tasks=6)


def _full_bytes(tree):
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_abstract_state_is_sharded_and_allocates_nothing():
  dp, fsdp_tp = _state("dp", 8, 1), _state("fsdp_tp", 4, 2)
  for tree in (fsdp_tp.trainable, fsdp_tp.frozen, fsdp_tp.opt_state):
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
               for x in jax.tree.leaves(tree))
  # T x S*K routing logits in each of 12 layers (q, k, v, o of three attention blocks).
  assert fsdp_tp.counts["routing"] == 6 * (2 * 2) * 12
  # dp replicates the backbone; fsdp_tp splits it over all 8 devices (the relative-position
  # tables and norms stay replicated).
  full = _full_bytes(dp.frozen)
  assert aot.per_device_bytes(dp.frozen) == full
  assert aot.per_device_bytes(fsdp_tp.frozen) < full / 6


def test_trainable_per_task_is_the_shared_part_and_one_routing_row():
  import dataclasses

  mesh = sharding.make_mesh(sharding.MeshConfig())
  for mode, shared in (("mhr", "adapters"), ("mhr_z", None), ("lora", "adapters")):
    cfg = dataclasses.replace(MHR, mode=mode, n_skills=1 if mode == "lora" else 2,
                              n_splits=1 if mode == "lora" else 2)
    counts = aot.abstract_train_state(TINY, cfg, ADAFACTOR, mesh, sharding.logical_rules("dp"),
                                      n_tasks=6).counts
    rows = 0 if mode == "lora" else (2 * 2) * 12  # S*K logits of one task in each of 12 layers
    assert counts["routing"] == 6 * rows
    assert counts["trainable_per_task"] == (counts[shared] if shared else 0) + rows, mode
  report = aot.format_report(aot.state_report(aot.abstract_train_state(
      TINY, MHR, ADAFACTOR, mesh, sharding.logical_rules("dp"), n_tasks=6)))
  assert "trainable_per_task " in report and "(not compiled: state only)" in report


def test_tiny_train_step_compiles_and_reports_memory_per_device():
  state = _state("fsdp_tp", 4, 2)
  compiled = aot.compile_train_step(state, 8, {"inputs": 8, "targets": 4},
                                    compiler_options=sharding.FAST_COMPILE)
  report = aot.memory_report(state, compiled)
  assert report["devices"] == 8 and report["mesh"] == {"data": 4, "model": 2}
  held = sum(report["state_bytes"].values())
  batch = 2 * (8 + 3 * 4 + 1) * 4  # 2 rows per device of int32 / float32 features
  # The program's arguments are the state (less a few unused RNG counters) and the batch.
  assert 0.99 * held <= report["argument_size_in_bytes"] <= held + batch + 8
  assert report["alias_size_in_bytes"] > 0  # the donated trainable state and optimizer state
  assert report["total_bytes"] >= report["argument_size_in_bytes"]
  assert "per device total" in aot.format_report(report)


def _aot(tmp_path, *flags, topology=None, n_tasks=300):
  """``python -m mhr_jax.aot`` on the paper's T0 preset; returns (report, printed text)."""
  out = tmp_path / f"report_{len(list(tmp_path.iterdir()))}.json"
  env = {**os.environ,
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  env.pop("XLA_FLAGS", None)  # the command sets its own device count
  if topology is None:
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "mhr_jax.aot", "--gin_file=experiments/t0_pretrain.gin",
         f"--n_tasks={n_tasks}", f"--json={out}", *flags]
  cmd += [f"--topology={topology}"] if topology else []
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)
  return json.loads(out.read_text()), proc.stdout


TWO_LAYERS = "--gin.ModelConfig.overrides={'dtype': 'bfloat16', 'num_layers': 2}"


@pytest.mark.slow
def test_t0_t5_xl_mhr_preset_on_8_cpu_devices(tmp_path):
  """The paper's T0 setting (T5-XL, MHR S=64 K=8 r=1, Adafactor, FSDP): its state per device at
  full size, and its train step compiled with 2 + 2 of its 24 + 24 layers (the full depth takes
  longer to compile than this test waits on a 2-core machine; see docs/interop.md)."""
  full, text = _aot(tmp_path, "--state_only")
  params = full["parameters"]
  assert params["backbone"] > 2.8e9 and "state per device" in text
  assert params["routing"] == 300 * (64 * 8) * (24 * 7 + 24 * 11)  # T x S*K x adapted layers
  assert params["trainable_per_task"] == params["adapters"] + 221_184  # and one task's row
  # MHR-z fine-tuning one task of that model trains its routing row only.
  mhr_z, text = _aot(tmp_path, "--state_only", "--gin_file=adapters/mhr_z.gin",
                     "--gin.N_SPLITS=64", n_tasks=1)
  assert mhr_z["parameters"]["trainable_per_task"] == mhr_z["parameters"]["trainable"] == 221_184
  assert "trainable_per_task 221,184" in text
  # FSDP over 8 devices: each holds an eighth of the float32 backbone (norms replicated).
  assert abs(full["state_bytes"]["frozen"] - 4 * params["backbone"] / 8) < 0.01 * 4 * 2.85e9 / 8
  two, text = _aot(tmp_path, "--fast_compile", TWO_LAYERS)
  assert "per device total" in text and two["devices"] == 8
  assert two["total_bytes"] > two["argument_size_in_bytes"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu]')")
def test_t0_preset_compiles_for_a_tpu_slice(tmp_path):
  """For a v5e 4x4 slice (16 chips, 16 GiB each), from this machine, with 2 + 2 layers."""
  report, text = _aot(tmp_path, TWO_LAYERS, topology="v5e:4x4")
  assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 16
  assert report["fits"] and "fits in 16.000 GiB" in text
