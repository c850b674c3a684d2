#!/usr/bin/env bash
# Run phi-jax on every worker of a Cloud TPU VM slice at once. jax.distributed finds the other
# workers itself (TPU_WORKER_HOSTNAMES), so each worker runs the same command.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--workdir_on_vm DIR] [--dry-run] -- \
#       train --gin_file=experiments/phi15.gin --workdir=/mnt/gcs/phi15
#
# The checkout must already be at DIR on every worker (default ~/phi-jax) with phi-jax installed
# into DIR/.venv (e.g. `make test` once, or `pip install -e ".[data,train]"`). The workdir must be a
# path that every worker sees: phi-jax refuses gs:// URLs, so mount the bucket at the same place on
# each worker first (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs`), or use a shared NFS directory.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
tpu="" zone="" project="" dir="~/phi-jax" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir_on_vm) dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "tpu_pod.sh: --tpu and --zone are required" >&2; usage; }
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no phi-jax arguments after --" >&2; usage; }

remote="cd $dir && .venv/bin/phi-jax $(printf '%q ' "$@")"
command=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
[[ -n "$project" ]] && command+=(--project "$project")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
exec "${command[@]}"
