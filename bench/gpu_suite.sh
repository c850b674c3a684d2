#!/usr/bin/env bash
# Every GPU check and timing of phi-jax in one command, for one call on a fresh lent H100 / H200 (a
# session gets 15 minutes of device time, the machine's start included, and 10 minutes a command):
#
#     bash bench/gpu_suite.sh        # results in $OUT (else bench_out/): summary.md first
#
# Nothing here has run on a GPU before, so every step is its own process (a crash, a hang or an
# out-of-memory costs that step only; JAX takes 75% of the card by default and torch needs 70-90 GB
# for phi-1.5 at 8 x 2048, so the frameworks never share one), prints each row as it is measured
# (PYTHONUNBUFFERED), and runs under `timeout -k 10`. summary.md is rewritten after every step with
# each step's status, time and tables, so whatever stops the suite leaves it behind.
#
# Steps, by value: the most important numbers first, in case time runs out.
#   step            slice  limit  what
#   environment       20     25   versions, nvidia-smi, memory
#   kernel_check      70     90   our kernels vs float32 XLA: fwd, dq, dk, dv; causal, packed with one-token
#                                 documents, padded lengths, bf16/fp32, d64/d128, each kernel option. First:
#                                 if the kernels are wrong, no later number of ours means anything
#   attention_base    55     90   cuDNN, stock Pallas mha, XLA: seq 2048/4096, dense and packed (JSON rows)
#   attention_ours    80    120   ours, default and each option on, beside those rows (ratio vs cuDNN);
#                                 a process of its own after the baselines, so a crash in ours loses nothing
#   train_jax        135    200   phi-1.5 train step, 8 x 2048 bf16, scan_layers: concat (cuDNN), then
#                                 first_fit packing (segment ids: our kernel); writes torch's weights
#   train_torch       55    100   transformers + torch, same weights and batch
#   train_compare     10     15   tokens/s, MFU, ratio, every step's loss vs torch
#   sweep             45    100   block sizes / warps / stages / options per kernel: a BlockSizes to paste
#   decode            35    200   phi-1.5 decode tokens/s vs transformers (bench/decode.py)
#   report            20     20   the targets, pass/fail, into summary.md (also once after train_compare);
#                                 it always runs, even late: it takes a second
# A step must end by the sum of the slices up to and including its own (525 s in all: 9 minutes less
# the -k 10 grace and the summary), and runs at most its limit: time an earlier step leaves unused
# passes on to later ones, but no step eats into the slices of the steps after it. So the timeouts
# really used add up to at most 525 s. A step with less than 20 s (or its limit) left is skipped, and
# says so. Expected on an H200: about 400 s in all (compiles run on a thread pool inside each step).
# BENCH_COMPILE_WORKERS=1 makes the Python steps compile one function at a time (if the thread pool
# ever misbehaves on a GPU). SUITE_TIME_PERCENT scales every slice and limit (the tests run it at a
# few percent). SUITE_TINY=1 runs the same steps at tiny sizes, Pallas in interpret mode: a CPU runs
# the whole suite that way (tests/test_bench.py), so its commands are checked before a GPU sees them.
set -u
set -o pipefail

py=${PYTHON:-python3}
out_arg=${OUT:-bench_out}
mkdir -p "$out_arg"
out=$(cd "$out_arg" && pwd)
cd "$(dirname "$0")/.." || exit 2
work=$(mktemp -d "${TMPDIR:-/tmp}/phi_gpu_suite.XXXXXX")
percent=${SUITE_TIME_PERCENT:-100}
export PYTHONUNBUFFERED=1
: > "$out/log.txt"
rm -f "$out/attention.jsonl" "$out/sweep.jsonl"
rm -rf "$out/train"
mkdir -p "$out/train" "$work/train"

# torch's copy of the initial weights (5.7 GB float32): in memory if /dev/shm has room.
shm_free_kb=$(df --output=avail -k /dev/shm 2>/dev/null | tail -n 1 | tr -dc 0-9)
if [[ -n $shm_free_kb ]] && (( shm_free_kb > 12000000 )); then
    hf_dir=$(mktemp -d /dev/shm/phi_gpu_suite_hf.XXXXXX)
else
    hf_dir=$work/hf
fi
trap 'rm -rf "$work" "$hf_dir"' EXIT

# Sizes: the GPU's, or tiny ones (SUITE_TINY=1) for a CPU run of the same commands.
if [[ ${SUITE_TINY:-} == 1 ]]; then
    kernel_args=(--tiny --interpret) attention_args=(--tiny --interpret) sweep_args=(--tiny --interpret --head_dims 64)
    train_args=(--configs tiny --batch 2 --seq 16 --warmup 1 --iters 1)
    decode_args=(--configs tiny_cpu --dtype bfloat16 --batches 2 --prompt 8 --new_tokens 4 --iters 1)
else
    kernel_args=() attention_args=() sweep_args=() train_args=()
    decode_args=(--configs phi_1_5 --dtype bfloat16 --batches 1,16 --prompt 128 --new_tokens 64 --iters 2)
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
steps=(environment kernel_check attention_base attention_ours train_jax train_torch train_compare sweep decode report)
declare -A slice=([environment]=20 [kernel_check]=70 [attention_base]=55 [attention_ours]=80 [train_jax]=135
                  [train_torch]=55 [train_compare]=10 [sweep]=45 [decode]=35 [report]=20)
declare -A cap=([environment]=25 [kernel_check]=90 [attention_base]=90 [attention_ours]=120 [train_jax]=200
                [train_torch]=100 [train_compare]=15 [sweep]=100 [decode]=200 [report]=20)
declare -A status duration limit_used rc
min_left=$(( 20 * percent / 100 > 1 ? 20 * percent / 100 : 1 ))
slices_so_far=0  # the slices of the steps so far: the current step must end by this (scaled) time

write_summary() {
    {
        echo "# phi-jax GPU suite"
        echo
        echo "Commit $commit, started $started_at, ${SECONDS} s elapsed; budget $(( 525 * percent / 100 )) s."
        echo "Full output: log.txt; rows as JSON: attention.jsonl, sweep.jsonl, train/*.json."
        echo
        echo "| step | status | seconds | limit |"
        echo "|---|---|---|---|"
        local s
        for s in "${steps[@]}"; do
            echo "| $s | ${status[$s]:-not started} | ${duration[$s]:-} | ${limit_used[$s]:-} |"
        done
        echo
        [[ -f $work/report.section ]] && cat "$work/report.section"
        for s in "${steps[@]}"; do
            [[ $s != report && -f $work/$s.section ]] && cat "$work/$s.section"
        done
    } > "$out/summary.md.tmp"
    mv -f "$out/summary.md.tmp" "$out/summary.md"
}

# Markdown of one step's log: its table rows and '#' comment lines (as plain lines), and the tail
# of the log when the step did not succeed.
section() {  # name, log, status, command
    local name=$1 log=$2 state=$3 cmd=$4
    {
        echo "## $name: $state"
        echo
        echo "\`$cmd\`"
        echo
        if [[ $name == environment || $name == report ]]; then
            if [[ $name == environment ]]; then echo '```'; cat "$log"; echo '```'; else cat "$log"; fi
        else
            awk '
                /^\|/ { if (!intable) print ""; intable = 1; print; next }
                /^# / || /^WINNER/ || /FAIL/ { if (intable) print ""; intable = 0; sub(/^# /, ""); print $0 "  "; next }
                END { if (intable) print "" }' "$log"
            if [[ $state != ok ]]; then
                echo
                echo "Last lines of the log:"
                echo '```'
                tail -n 25 "$log"
                echo '```'
            fi
        fi
        echo
    } > "$work/$name.section"
}

run_step() {  # name, command... ; "@BUDGET@" in the command becomes the step's own budget in seconds
    local name=$1
    shift
    slices_so_far=$(( slices_so_far + slice[$name] ))
    ends_by=$(( slices_so_far * percent / 100 ))
    local max=$(( cap[$name] * percent / 100 > 1 ? cap[$name] * percent / 100 : 1 ))
    local left=$(( ends_by - SECONDS ))
    local limit=$(( left < max ? left : max ))
    if [[ $name == report ]] && (( limit < max )); then
        limit=$max  # cheap, and what the summary is read for
    fi
    local log=$work/$name.log
    if (( limit < (max < min_left ? max : min_left) )); then
        status[$name]="skipped: ${left} s left of its slice"
        : > "$log"
        section "$name" "$log" "${status[$name]}" "$*"
        write_summary
        return
    fi
    local budget=$(( limit - (limit / 6 > 12 ? 12 : limit / 6) ))
    local cmd=() arg
    for arg in "$@"; do cmd+=("${arg//@BUDGET@/$budget}"); done
    status[$name]="running (started at ${SECONDS} s)"
    limit_used[$name]=$limit
    write_summary
    printf '\n== %s (limit %s s, at %s s): %s\n' "$name" "$limit" "$SECONDS" "${cmd[*]}" | tee -a "$out/log.txt"
    local t0=$SECONDS
    timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | tee "$log" | tee -a "$out/log.txt"
    local code=${PIPESTATUS[0]}
    rc[$name]=$code
    duration[$name]=$(( SECONDS - t0 ))
    case $code in
        0) status[$name]=ok ;;
        124) status[$name]="timed out at ${limit} s" ;;
        137) status[$name]="killed (timed out and ignored TERM, or out of host memory)" ;;
        *) status[$name]="failed: exit $code" ;;
    esac
    echo "== $name: ${status[$name]} (${duration[$name]} s)" | tee -a "$out/log.txt"
    section "$name" "$log" "${status[$name]}" "${cmd[*]}"
    write_summary
}

started_at=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
SECONDS=0
write_summary

run_step environment "$py" bench/environment.py

run_step kernel_check env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    "$py" bench/kernel_check.py "${kernel_args[@]}" --budget_s @BUDGET@

run_step attention_base env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    "$py" bench/attention.py "${attention_args[@]}" --impls cudnn,stock,xla --json_out "$out/attention.jsonl" \
    --budget_s @BUDGET@

run_step attention_ours env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    "$py" bench/attention.py "${attention_args[@]}" --impls ours,ours+exp2,ours+dkv_transposed,ours+fused_backward,ours+all3 \
    --baseline "$out/attention.jsonl" --json_out "$out/attention.jsonl" --budget_s @BUDGET@

run_step train_jax env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    "$py" bench/train_step.py --preset gpu "${train_args[@]}" --framework jax --out_dir "$work/train" --hf_dir "$hf_dir"
cp "$work"/train/*.json "$out/train/" 2>/dev/null

if [[ -f $hf_dir/config.json ]]; then
    run_step train_torch env JAX_PLATFORMS=cpu PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
        "$py" bench/train_step.py --preset gpu "${train_args[@]}" --framework torch --out_dir "$work/train" --hf_dir "$hf_dir"
else
    slices_so_far=$(( slices_so_far + slice[train_torch] ))
    status[train_torch]="skipped: train_jax wrote no weights"
    write_summary
fi
rm -rf "$hf_dir"
cp "$work"/train/*.json "$out/train/" 2>/dev/null

run_step train_compare "$py" bench/train_step.py --compare "$work/train" --json

report_cmd=("$py" bench/suite_report.py --attention "$out/attention.jsonl" --train "$work/train")
# The targets so far, in case the call ends before the last step.
timeout -k 5 20 "${report_cmd[@]}" --kernel_check_status "${rc[kernel_check]:-}" > "$work/report.log" 2>&1
section report "$work/report.log" "so far (after train_compare)" "${report_cmd[*]}"
write_summary

run_step sweep env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    "$py" bench/attention_sweep.py "${sweep_args[@]}" --json_out "$out/sweep.jsonl" --budget_s @BUDGET@

run_step decode env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    "$py" bench/decode.py "${decode_args[@]}"

run_step report "${report_cmd[@]}" --kernel_check_status "${rc[kernel_check]:-}"
write_summary

echo
cat "$out/summary.md"
failed=0
for s in "${steps[@]}"; do [[ ${status[$s]:-} == ok ]] || failed=1; done
exit $failed
