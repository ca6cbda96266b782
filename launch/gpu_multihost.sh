#!/usr/bin/env bash
# Runs `python -m mhr_jax.train` as one process of a multi-host GPU job (run it on every host).
#
#   COORDINATOR=host0:12345 NUM_HOSTS=4 HOST_ID=0 launch/gpu_multihost.sh [--dry_run] --gin_file=...
#   srun --nodes=4 --ntasks-per-node=1 launch/gpu_multihost.sh [--dry_run] --gin_file=...
#
# The job comes from COORDINATOR (host:port of process 0), NUM_HOSTS and HOST_ID when they are
# set, else from SLURM's environment: the first host of SLURM_JOB_NODELIST (expanded with
# `scontrol show hostnames`) on port COORDINATOR_PORT (12345), SLURM_NNODES hosts, and this
# host's SLURM_NODEID. Each process drives the GPUs of its host, reads its own shard of the data
# and joins the others through jax.distributed. --dry_run prints the command instead of running
# it. On one host with several GPUs, run plain `python -m mhr_jax.train`.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry_run" ]]; then dry=1; shift; fi
[[ "${1:-}" == "--" ]] && shift

first_host() {
  local list=$1 hosts
  if command -v scontrol >/dev/null 2>&1; then
    hosts=$(scontrol show hostnames "$list")
    echo "${hosts%%$'\n'*}"
  elif [[ $list != *"["* ]]; then
    echo "${list%%,*}"
  else
    echo "gpu_multihost.sh: cannot expand SLURM_JOB_NODELIST=$list without scontrol;" \
         "set COORDINATOR" >&2
    return 1
  fi
}

if [[ -n ${COORDINATOR:-} || -n ${NUM_HOSTS:-} || -n ${HOST_ID:-} ]]; then
  : "${COORDINATOR:?host:port of process 0}" "${NUM_HOSTS:?number of hosts}"
  : "${HOST_ID:?this host index}"
  coordinator=$COORDINATOR; num_hosts=$NUM_HOSTS; host_id=$HOST_ID
elif [[ -n ${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} ]]; then
  coordinator="$(first_host "${SLURM_JOB_NODELIST:-$SLURM_NODELIST}"):${COORDINATOR_PORT:-12345}"
  num_hosts=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}
  host_id=${SLURM_NODEID:?SLURM_NODEID is not set (run one task per node)}
else
  echo "gpu_multihost.sh: set COORDINATOR, NUM_HOSTS and HOST_ID, or run it under SLURM" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
cmd=("${PYTHON:-.venv/bin/python}" -m mhr_jax.train --coordinator_address="$coordinator"
     --num_processes="$num_hosts" --process_id="$host_id" "$@")
if (( dry )); then
  out=()
  for a in "${cmd[@]}"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "cd $(pwd) && ${out[*]}"
else
  exec "${cmd[@]}"
fi
