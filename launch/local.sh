#!/usr/bin/env bash
# Start N cooperating phi-jax processes on this machine through jax.distributed, as a pod or a
# cluster would: process 0 coordinates on 127.0.0.1. With -d, each process fakes that many CPU
# devices and CPU collectives run over gloo. SIGTERM (or Ctrl-C) is passed on to every process once,
# so phi-jax saves and exits 0. If any process fails, the others are stopped and this script exits
# with its status.
#
#   launch/local.sh -n 2 -d 4 -- train --gin_file=experiments/tiny_cpu.gin --workdir=/tmp/run
#   launch/local.sh -n 2 -d 4 --command -- python my_script.py      (any command, not phi-jax)
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || { echo "local.sh: needs bash 5.1 or newer, found $BASH_VERSION" >&2; exit 2; }

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
processes=2 devices="" port="" command=(phi-jax) dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) processes="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --command) command=(); shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "local.sh: unknown option $1 (arguments for the processes go after --)" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "local.sh: nothing to run; put the arguments after --" >&2; usage; }
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n must be a positive integer, got '$processes'" >&2; exit 2; }
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

environment=(PHI_JAX_COORDINATOR="127.0.0.1:$port" PHI_JAX_NUM_PROCESSES="$processes")
if [[ -n "$devices" ]]; then
  environment+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices")
fi

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    echo "env ${environment[*]} PHI_JAX_PROCESS_ID=$i ${command[*]} $*"
  done
  exit 0
fi

pids=()
# SIGTERM or Ctrl-C reaches each process once: a second SIGTERM makes phi-jax exit at once, unsaved.
forward() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap forward INT TERM
for ((i = 0; i < processes; i++)); do
  env "${environment[@]}" PHI_JAX_PROCESS_ID="$i" "${command[@]}" "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

# Wait for every process, whatever stops them, and exit with the first failure's status (0 when a
# forwarded SIGTERM made them all save and exit 0).
status=0 running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  wait -n -p finished "${running[@]}" && code=0 || code=$?
  [[ -n "${finished:-}" ]] || continue  # a trapped signal interrupted the wait
  for i in "${!running[@]}"; do
    if [[ ${running[i]} == "$finished" ]]; then unset 'running[i]'; fi
  done
  if [[ $code != 0 && $status == 0 ]]; then
    status=$code
    echo "local.sh: a process failed (exit $status); stopping the others" >&2
    forward
  fi
done
wait || true  # for the output prefixers to flush
exit "$status"
