"""Launch scripts: the commands ``--dry_run`` prints for a 2-worker TPU slice and a 2-host GPU
job, and the TPU set-up run twice against a stand-in ``gcloud`` (the slice is created once)."""

import os
import pathlib
import shlex
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = str(REPO / "launch" / "tpu_vm.sh")
GPU = str(REPO / "launch" / "gpu_multihost.sh")
TRAIN_ARGS = ["--gin_file=experiments/t0_pretrain.gin", "--gin.MIXTURE='my mixture'"]


def _run(cmd, env=None, check=True):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})})
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(stdout):
  return [shlex.split(line) for line in stdout.strip().splitlines()]


def test_tpu_dry_run_prints_every_command_of_a_two_worker_slice():
  proc = _run([TPU, "mhr-v4", "us-central2-b", "--setup", "--accelerator", "v4-16", "--version",
               "tpu-ubuntu2204-base", "--model_dir", "gs://bucket/runs/t0", "--dry_run", "--",
               *TRAIN_ARGS])
  create, tar, scp, install, train = _commands(proc.stdout)
  # Create only when describe does not find the slice (v4-16: 8 chips on 2 workers).
  assert create[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "mhr-v4", "--zone"]
  assert "||" in create and create[create.index("||") + 1:][:6] == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "mhr-v4"]
  assert create[-4:] == ["--accelerator-type", "v4-16", "--version", "tpu-ubuntu2204-base"]
  assert tar[:2] == ["tar", "-czf"] and "--exclude=.git" in tar and tar[-3:] == ["-C", str(REPO),
                                                                               "."]
  assert scp[4] == "scp" and scp[6] == "mhr-v4:~/mhr_jax.tgz" and "--worker=all" in scp
  assert install[4] == "ssh" and "--worker=all" in install
  script = install[-1]
  assert "test -x .venv/bin/python || python3 -m venv .venv" in script  # an existing venv stays
  assert "pip install -q -e '.[tpu]'" in script
  assert train[4] == "ssh" and "--worker=all" in train
  remote = shlex.split(train[-1])
  assert remote[:3] == ["cd", "~/mhr_jax", "&&"]
  assert remote[3:] == [".venv/bin/python", "-m", "mhr_jax.train", "--distributed=auto",
                        "--gin.MODEL_DIR='gs://bucket/runs/t0'", *TRAIN_ARGS]
  assert "note" not in proc.stderr  # a bucket is what a slice needs
  local = _run([TPU, "mhr-v4", "us-central2-b", "--model_dir", "/runs/t0", "--dry_run", "--",
                *TRAIN_ARGS])
  assert "is not a bucket" in local.stderr


def test_tpu_setup_reuses_an_existing_slice(tmp_path):
  """Two set-ups against a stand-in gcloud that remembers created slices: one create."""
  log, state = tmp_path / "gcloud.log", tmp_path / "slices"
  stub = tmp_path / "bin" / "gcloud"
  stub.parent.mkdir()
  stub.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ $4 == describe ]]; then grep -qx "$5" {state} 2>/dev/null; exit; fi
if [[ $4 == create ]]; then echo "$5" >> {state}; fi
""")
  stub.chmod(0o755)
  env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  args = [TPU, "mhr-v4", "zone-a", "--setup", "--accelerator", "v4-16", "--version", "rt", "--",
          *TRAIN_ARGS]
  _run(args, env)
  _run(args, env)
  calls = [line.split()[3] for line in log.read_text().splitlines()]
  assert calls == ["describe", "create", "scp", "ssh", "ssh", "describe", "scp", "ssh", "ssh"]
  assert (tmp_path / "mhr_jax_mhr-v4.tgz").exists()
  missing = _run([TPU, "other", "zone-a", "--setup"], env, check=False)
  assert missing.returncode == 1 and "give --accelerator and --version" in missing.stderr


def _gpu(env, *extra):
  clean = {k: "" for k in ("COORDINATOR", "NUM_HOSTS", "HOST_ID", "SLURM_JOB_NODELIST",
                           "SLURM_NODELIST", "SLURM_NNODES", "SLURM_NODEID")}
  return _run([GPU, "--dry_run", *extra, *TRAIN_ARGS], {**clean, **env})


def _train_args(line):
  words = shlex.split(line)
  assert words[:2] == ["cd", str(REPO)] and words[2] == "&&"
  return words[3:]


def test_gpu_dry_run_for_two_hosts_from_explicit_variables():
  for host in (0, 1):
    proc = _gpu({"COORDINATOR": "10.0.0.1:1234", "NUM_HOSTS": "2", "HOST_ID": str(host)})
    assert _train_args(proc.stdout)[1:] == [
        "-m", "mhr_jax.train", "--coordinator_address=10.0.0.1:1234", "--num_processes=2",
        f"--process_id={host}", *TRAIN_ARGS]


def test_gpu_dry_run_for_two_hosts_from_slurm(tmp_path):
  for host in (0, 1):
    proc = _gpu({"SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2",
                 "SLURM_NODEID": str(host)})
    assert _train_args(proc.stdout)[3:6] == [
        "--coordinator_address=gpu-a:12345", "--num_processes=2", f"--process_id={host}"]
  # A bracketed node list is expanded by scontrol (here a stand-in printing the two hosts).
  scontrol = tmp_path / "scontrol"
  scontrol.write_text("#!/usr/bin/env bash\nprintf 'gpu-01\\ngpu-02\\n'\n")
  scontrol.chmod(0o755)
  proc = _gpu({"SLURM_JOB_NODELIST": "gpu-[01-02]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
               "COORDINATOR_PORT": "9999", "PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert "--coordinator_address=gpu-01:9999" in _train_args(proc.stdout)


def test_gpu_without_a_job_description_says_what_to_set():
  proc = _run([GPU, "--dry_run", *TRAIN_ARGS],
              {"COORDINATOR": "", "NUM_HOSTS": "", "HOST_ID": "", "SLURM_JOB_NODELIST": "",
               "SLURM_NODELIST": ""}, check=False)
  assert proc.returncode == 2 and "set COORDINATOR, NUM_HOSTS and HOST_ID" in proc.stderr
