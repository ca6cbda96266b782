"""Preemption on a pod: two ``jax.distributed`` processes (4 CPU devices each, gloo collectives)
train a tiny MHR model and checkpoint together; one is killed with SIGKILL, both restart.

Slow (``pytest -m slow tests/test_preemption.py``): every run starts two Python processes that
import JAX and TensorFlow and compile the step. Runs go through ``python -m mhr_jax.train``, so
the flags, the distributed start, the checkpoints and the data shards are the user's.
"""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from mhr_jax import checkpoint_integrity as integrity
from mhr_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4,
        "num_layers": 1, "dropout_rate": 0.1}
STEPS = 8
CHECKPOINT_EVERY = 2
PEER_TIMEOUT_S = 60  # MHR_DISTRIBUTED_TIMEOUT of the runs: connecting, and a silent peer
# 2 processes x 4 devices against 1 process x 8 devices: the same program, but the cross-process
# all-reduces run through gloo and add in another order. Adam divides by the gradient's running
# RMS, so where a gradient is near zero (routing logits) rounding differences of 1e-7 grow: after
# 8 steps the largest gap measured was 6.7e-6, on routing logits of size 0.2 (absolute learning
# rate 0.1); a wrong batch or gradient moves them by ~1e-2.
ONE_PROCESS_ATOL = 2e-5

pytestmark = pytest.mark.slow


def _cli(model_dir, steps=STEPS):
  return [sys.executable, "-m", "mhr_jax.train", "--gin_file=runs/pretrain.gin",
          "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=adapters/mhr.gin",
          "--gin_file=overlays/cpu_tiny.gin", "--gin.MIXTURE='synthetic_primitives'",
          f"--gin.TRAIN_STEPS={steps}", "--gin.N_SPLITS=2", "--gin.N_SKILLS=4",
          f"--gin.TrainConfig.checkpoint_every={CHECKPOINT_EVERY}",
          "--gin.TrainConfig.keep_checkpoints=3", "--gin.LEARNING_RATE=1e-2",
          "--gin.INPUTS_LENGTH=24", "--gin.TARGETS_LENGTH=24",
          "--gin.ModelConfig.overrides=" + repr(TINY), "--gin.MeshConfig.data=4",
          "--gin.MeshConfig.model=2", "--gin.run.sharding_strategy='fsdp_tp'",
          "--gin.DataConfig.data_shards=2", f"--gin.MODEL_DIR='{model_dir}'"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices, timeout_s=PEER_TIMEOUT_S):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              **{sharding.TIMEOUT_ENV: str(timeout_s)})


def _start(model_dir, log_dir, tag, process_ids=(0, 1), steps=STEPS, port=None,
           timeout_s=PEER_TIMEOUT_S):
  """Starts processes of a 2-process run; returns {process id: (Popen, log path)}."""
  port = port or _free_port()
  out = {}
  for i in process_ids:
    log = log_dir / f"{tag}.{i}.log"
    with open(log, "w") as f:
      out[i] = (subprocess.Popen(
          _cli(model_dir, steps) + [f"--coordinator_address=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
          cwd=REPO, env=_env(4, timeout_s), stdout=f, stderr=subprocess.STDOUT), log)
  return out


def _wait(procs, timeout):
  """Waits for every process; returns {id: (returncode, log text, seconds waited)}."""
  t0 = time.time()
  out = {}
  for i, (p, log) in procs.items():
    try:
      p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
      for q, _ in procs.values():
        q.kill()
      raise AssertionError(f"process {i} still running after {timeout} s:\n"
                           + log.read_text()[-3000:])
    out[i] = (p.returncode, log.read_text(), time.time() - t0)
  return out


def _finished(results):
  for i, (rc, text, _) in results.items():
    assert rc == 0, f"process {i} failed (rc {rc}):\n{text[-4000:]}"


def _logged_step(model_dir):
  """The last training step process 0 has logged (metrics.jsonl), or 0."""
  path = model_dir / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
  return max(steps, default=0)


def _in_flight_save(model_dir):
  ckpts = model_dir / "checkpoints"
  return [n for n in os.listdir(ckpts) if integrity.TMP_INFIX in n] if ckpts.is_dir() else []


def _kill_when(procs, victim, condition, limit=900):
  """SIGKILLs process ``victim`` as soon as ``condition()`` holds; returns what it returned."""
  t0 = time.time()
  while time.time() - t0 < limit:
    found = condition()
    if found:
      procs[victim][0].send_signal(signal.SIGKILL)
      return found
    if any(p.poll() is not None for p, _ in procs.values()):
      raise AssertionError("a process ended before the kill:\n"
                           + "\n".join(log.read_text()[-3000:] for _, log in procs.values()))
    time.sleep(0.002)
  raise AssertionError(f"condition not met within {limit} s")


def _survivor_exits(procs, victim):
  """The other process must end by itself, in bounded time, in one of the two ways a lost peer
  shows: a failed collective (our message naming the coordinator) or jax's coordination service
  ending it (a silent peer, or a dead coordinator)."""
  survivor = 1 - victim
  res = _wait({survivor: procs[survivor]}, timeout=PEER_TIMEOUT_S + 120)
  rc, text, waited = res[survivor]
  procs[victim][0].wait()
  ours = rc == sharding.PEERS_UNREACHABLE_EXIT and "lost contact with the other processes" in text
  jax_s = rc != 0 and "JAX distributed service detected fatal errors" in text
  assert ours or jax_s, f"the survivor ended otherwise (rc {rc}):\n{text[-3000:]}"
  return waited, "lost contact (our message)" if ours else "ended by jax's coordination service"


def _read_state(model_dir):
  """(step, {item/path: array}) of the newest checkpoint's parameters and optimizer state."""
  ckpts = model_dir / "checkpoints"
  step, damaged = integrity.newest_intact(ckpts)
  assert not damaged, [d.describe() for d in damaged]
  out = {}
  for item in ("trainable", "opt_state"):
    handler = ocp.PyTreeCheckpointHandler()
    path = epath.Path(ckpts / str(step) / item)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            handler.metadata(path).tree)
    tree = handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    for key, x in jax.tree_util.tree_leaves_with_path(tree):
      out[item + jax.tree_util.keystr(key)] = np.asarray(x)
  return step, out


def _resumed_from(text):
  found = re.findall(r"resuming from step (\d+)", text)
  return int(found[-1]) if found else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 2-process run and the 1-process 8-device run of the same job."""
  root = tmp_path_factory.mktemp("reference")
  t0 = time.time()
  _finished(_wait(_start(root / "two", root, "two"), timeout=1200))
  t_two = time.time() - t0
  t0 = time.time()
  with open(root / "one.log", "w") as f:
    one = subprocess.run(_cli(root / "one"), cwd=REPO, env=_env(8), stdout=f,
                         stderr=subprocess.STDOUT, timeout=1200)
  assert one.returncode == 0, (root / "one.log").read_text()[-4000:]
  print(f"reference runs: 2 processes {t_two:.0f} s, 1 process {time.time() - t0:.0f} s")
  return _read_state(root / "two"), _read_state(root / "one")


def _assert_same(got, want, atol=0.0):
  assert got.keys() == want.keys()
  worst = 0.0
  for k in want:
    if atol:
      np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=k)
      worst = max(worst, float(np.max(np.abs(got[k] - want[k]), initial=0.0)))
    else:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  return worst


def test_killed_processes_resume_bit_identical(tmp_path, reference):
  """Kill one process at a random step, restart both; kill the other while a save is in flight,
  restart both; the run ends where the uninterrupted one does, to the bit."""
  (ref_step, ref_two), (_, ref_one) = reference
  assert ref_step == STEPS
  worst = _assert_same(ref_one, ref_two, atol=ONE_PROCESS_ATOL)
  print(f"1 process x 8 devices against 2 x 4: largest difference {worst:.2e}")
  seed = int(os.environ.get("MHR_TEST_KILL_SEED", time.time_ns() % 10**6))
  rng = random.Random(seed)
  kill_step, victim = rng.randint(3, STEPS - 3), rng.randint(0, 1)
  why = f"(MHR_TEST_KILL_SEED={seed}: kill process {victim} at step {kill_step})"
  run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"

  # 1. Kill at a random step.
  procs = _start(run_dir, tmp_path, "first")
  _kill_when(procs, victim,
             lambda: _logged_step(run_dir) >= kill_step and integrity.committed_steps(ckpts))
  waited, how = _survivor_exits(procs, victim)
  intact, damaged = integrity.newest_intact(ckpts)
  assert not damaged and intact is not None and 0 < intact < STEPS, (intact, damaged, why)

  # 2. Restart both; kill the other process as soon as a save of this run is in flight.
  procs = _start(run_dir, tmp_path, "second")
  log0 = procs[0][1]
  state = {"resumed": None}

  def save_in_flight():
    if state["resumed"] is None:
      state["resumed"] = _resumed_from(log0.read_text())  # orbax cleans old leftovers before
      return None
    return _in_flight_save(run_dir)

  caught = _kill_when(procs, 1 - victim, save_in_flight)
  assert state["resumed"] == intact, why
  _survivor_exits(procs, 1 - victim)
  second_intact, damaged = integrity.newest_intact(ckpts)
  assert not damaged and intact <= second_intact < STEPS, (second_intact, damaged, why)
  pending = int(caught[0].split(".")[0])
  assert pending > intact, (caught, why)

  # 3. A damaged step newer than the last one (a copy of it with a truncated file): both processes
  # must find it, process 0 move it aside, and both resume from the intact one.
  fake = ckpts / str(second_intact + 1)
  shutil.copytree(ckpts / str(second_intact), fake)
  biggest = max((p for p in (fake / "opt_state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:5])

  # 4. Restart both and finish.
  results = _wait(_start(run_dir, tmp_path, "third"), timeout=1200)
  _finished(results)
  assert _resumed_from(results[0][1]) == second_intact > 0, why
  assert f"step {second_intact + 1} ({fake})" in results[0][1] and "has 5 bytes" in results[0][1]
  assert (run_dir / "checkpoints_damaged" / str(second_intact + 1)).is_dir()
  assert json.loads((run_dir / "results.json").read_text())["resumed_from"] == second_intact
  step, got = _read_state(run_dir)
  assert step == STEPS
  _assert_same(got, ref_two)
  for s in integrity.committed_steps(ckpts):
    assert integrity.problems(ckpts / str(s)) == [], s
  print(f"{why}: resumed from {intact}, then killed during the save of step {pending} and "
        f"resumed from {second_intact}; the survivor of the first kill exited after "
        f"{waited:.0f} s, {how}")


def test_a_process_alone_exits_naming_the_coordinator(tmp_path):
  """After a kill, starting only one process ends with the timeout message; no checkpoint is
  damaged on the way."""
  run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
  procs = _start(run_dir, tmp_path, "killed")
  _kill_when(procs, 1, lambda: _logged_step(run_dir) >= 3 and integrity.committed_steps(ckpts))
  waited, how = _survivor_exits(procs, 1)
  print(f"the survivor exited {waited:.0f} s after the kill: {how}")
  intact, damaged = integrity.newest_intact(ckpts)
  assert intact is not None and intact >= 2 and not damaged
  before = {p: p.stat().st_size for p in ckpts.rglob("*") if p.is_file()}

  port = _free_port()
  alone = _start(run_dir, tmp_path, "alone", process_ids=(0,), port=port, timeout_s=20)
  rc, text, waited = _wait(alone, timeout=300)[0]
  assert rc == sharding.PEERS_UNREACHABLE_EXIT, text[-3000:]
  assert (f"did not all reach the coordinator localhost:{port} within 20 s" in text
          and "Start all 2 processes" in text), text[-3000:]
  assert {p: p.stat().st_size for p in ckpts.rglob("*") if p.is_file()} == before
  for s in integrity.committed_steps(ckpts):
    assert integrity.problems(ckpts / str(s)) == [], s
  print(f"the lone process exited after {waited:.0f} s (timeout 20 s, with Python start-up)")
