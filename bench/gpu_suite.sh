#!/usr/bin/env bash
# Every GPU check and timing in one command, for one call on a lent H100/H200 (a session gets 15
# minutes of device time, the machine's start included, and 10 minutes per command):
#
#     bash bench/gpu_suite.sh          # from the repository root; results in $OUT, else bench_out/
#
# Each bench runs under its own time limit, so a hang or an out-of-memory costs that bench, not
# the rest; the last lines of each are echoed and the whole output kept in <name>.txt. The first
# Pallas run is also the kernels' first check on hardware: bench/attention.py compares every output
# and gradient with XLA before it times anything.
set -u
out=${OUT:-bench_out}
mkdir -p "$out"
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)" \
    2>&1 | tee "$out/environment.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$out/environment.txt" 2>&1

run() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" > "$out/$name.txt" 2>&1
    echo "exit status $?" >> "$out/$name.txt"
    tail -n 25 "$out/$name.txt"
}

run attention 170 python bench/attention.py
run train_step 200 python bench/train_step.py --preset gpu
run decode 170 python bench/decode.py --configs phi_1_5 --dtype bfloat16 --prompt 128 --new_tokens 256 --iters 3
