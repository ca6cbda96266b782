#!/usr/bin/env bash
# Runs `python -m mhr_jax.train` on every worker of a Cloud TPU VM (one host or a pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE [--setup [--accelerator TYPE] [--version RUNTIME]]
#     [--model_dir gs://BUCKET/PATH] [--dry_run] -- --gin_file=experiments/t0_pretrain.gin ...
#
# --setup   creates the slice when `gcloud ... describe` does not find it (--accelerator, e.g.
#           v4-16 or v5litepod-16, and --version, the TPU VM runtime, are then required), copies
#           this checkout to ~/mhr_jax on every worker and installs it with the `tpu` extra into
#           ~/mhr_jax/.venv. Every step can run again: an existing slice is reused, the copy is
#           overwritten, an existing venv is kept and pip only adds what is missing.
# --model_dir  passed as --gin.MODEL_DIR: a bucket (gs://...) that every worker can write.
# --dry_run    prints every command instead of running it.
# Every worker runs the same command; `--distributed=auto` makes each call
# jax.distributed.initialize(), which reads the slice's topology.
set -euo pipefail
usage() { sed -n '2,17p' "$0" >&2; exit 2; }
(( $# >= 2 )) || usage
tpu=$1; zone=$2; shift 2
setup=0; dry=0; accelerator=""; version=""; model_dir=""
while (( $# )); do
  case "$1" in
    --setup) setup=1 ;;
    --dry_run) dry=1 ;;
    --accelerator) accelerator=${2:?--accelerator needs a value}; shift ;;
    --version) version=${2:?--version needs a value}; shift ;;
    --model_dir) model_dir=${2:?--model_dir needs a value}; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (train arguments go after --)" >&2; usage ;;
  esac
  shift
done
repo=$(cd "$(dirname "$0")/.." && pwd)

# A command as one line that a shell reads back into the same words.
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() { if (( dry )); then show "$@"; else "$@"; fi; }

tpu_vm=(gcloud compute tpus tpu-vm)
if (( setup )); then
  create=("${tpu_vm[@]}" create "$tpu" --zone "$zone" --accelerator-type "${accelerator:-TYPE}"
          --version "${version:-RUNTIME}")
  if (( dry )); then
    describe=$(show "${tpu_vm[@]}" describe "$tpu" --zone "$zone")
    echo "$describe >/dev/null 2>&1 || $(show "${create[@]}")"
  elif ! "${tpu_vm[@]}" describe "$tpu" --zone "$zone" >/dev/null 2>&1; then
    [[ -n $accelerator && -n $version ]] || {
      echo "tpu_vm.sh: $tpu not found in $zone: give --accelerator and --version to create it" >&2
      exit 1; }
    "${create[@]}"
  fi
  tarball=${TMPDIR:-/tmp}/mhr_jax_$tpu.tgz
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs -C "$repo" .
  run "${tpu_vm[@]}" scp "$tarball" "$tpu:~/mhr_jax.tgz" --zone "$zone" --worker=all
  run "${tpu_vm[@]}" ssh "$tpu" --zone "$zone" --worker=all --command \
    "mkdir -p ~/mhr_jax && tar -xzf ~/mhr_jax.tgz -C ~/mhr_jax && cd ~/mhr_jax && \
(test -x .venv/bin/python || python3 -m venv .venv) && .venv/bin/pip install -q -e '.[tpu]'"
fi
train=(.venv/bin/python -m mhr_jax.train --distributed=auto)
if [[ -n $model_dir ]]; then
  train+=("--gin.MODEL_DIR='$model_dir'")
  if [[ $model_dir != gs://* ]]; then
    echo "tpu_vm.sh: note: --model_dir $model_dir is not a bucket: on a pod slice each worker" \
         "has its own disk, so give gs://BUCKET/PATH (or a folder all workers mount)" >&2
  fi
fi
run "${tpu_vm[@]}" ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/mhr_jax && $(show "${train[@]}" "$@")"
