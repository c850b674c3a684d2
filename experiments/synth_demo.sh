#!/usr/bin/env bash
# `make synth-demo`: phi's data recipe end to end, offline, in minutes on 2 CPU cores.
#   1. topics: cluster the built-in corpus' web documents (Python's docs) into topics
#   2. synth: generate textbook-style rows with the demo's model (make demo), web extracts in the prompts
#   3. prepare: the result is DATA_DIR/synthetic, the `synthetic` task of the phi15 mixtures
#   4. train: a tiny phi on it
# Every step resumes: re-running it continues where it stopped (synth sends only what is not written).
# MODEL=... another checkpoint; NUM_SAMPLES, TRAIN_STEPS; OUT (default synth_demo_out).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-synth_demo_out}
DEMO_DIR=${DEMO_DIR:-demo_out}
MODEL=${MODEL:-$DEMO_DIR/run}
NUM_SAMPLES=${NUM_SAMPLES:-128}
TRAIN_STEPS=${TRAIN_STEPS:-40}
phi() { echo "\$ phi-jax $*" >&2; "$PY" -m phi_jax.cli "$@"; }

if [ ! -d "$MODEL" ]; then
  echo "no $MODEL: training the demo's model first (make demo)" >&2
  "$PY" -m phi_jax.demo --out "$DEMO_DIR"
fi
read -r WEB TOKENIZER < <("$PY" -c "from phi_jax.data import corpus; corpus.ensure_default(); \
print(corpus.raw_dir() / 'web' / 'train', corpus.tokenizer_file())")

phi data topics --seed_data "$WEB" --num_topics 8 --out "$OUT/topics.jsonl"
phi data synth --topics "$OUT/topics.jsonl" --seed_data "$WEB" --out "$OUT/data/synthetic" \
  --checkpoint "$MODEL" --tokenizer default --num_samples "$NUM_SAMPLES" --max_tokens 192 --extract_chars 400 \
  --batch_size 16 --min_words 20 --validation_every 8
phi data prepare synthetic --data_dir "$OUT/data" --tokenizer "$TOKENIZER"
phi train --gin_file experiments/tiny_cpu.gin --workdir "$OUT/run" --gin.MIXTURE="'synthetic'" \
  --gin.DATA_DIR="'$OUT/data'" --gin.TRAIN_STEPS="$TRAIN_STEPS" --gin.WARMUP_STEPS=4 --gin.BATCH_SIZE=8
echo "report: $OUT/data/synthetic/report.json and report.png; trained model: $OUT/run" >&2
