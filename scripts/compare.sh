#!/usr/bin/env bash
# The measured comparison of README "Results": every system trained on the same batches, then evaluated
# side by side on held-out test entities.
#   data_prep -> index -> retriever fine-tuning -> qa.train (train.systems) -> eval.run (eval.systems)
# Usage: bash scripts/compare.sh [CONFIG]   (default configs/default.yaml). Steps whose output exists are
# reused, so a rerun after a crash continues (qa.train --resume continues from its last checkpoint).
# FINETUNE_RETRIEVER=0 keeps the config's retriever (no step 3).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/default.yaml}"
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN_DIR=$($PY -c "from configs import load_config; print(load_config('$CONFIG').run_dir)")
FINETUNED=(retriever.model="$RUN_DIR/retriever")
[ "${FINETUNE_RETRIEVER:-1}" = "0" ] && FINETUNED=()
start=$(date +%s)
step() { printf '\n=== [%s] %s (%ds elapsed)\n' "$1" "$2" $(( $(date +%s) - start )); }

step 1/5 "corpus -> segment store"
$PY -m data_prep.build --config "$CONFIG"
if [ "${FINETUNE_RETRIEVER:-1}" = "0" ]; then
  step 2/5 "segment store -> embeddings -> faiss index (the config's encoder, not fine-tuned)"
  $PY -m retriever.index --config "$CONFIG"
elif [ ! -f "$RUN_DIR/retriever/config.json" ]; then
  step 2/5 "segment store -> embeddings -> faiss index (the config's encoder)"
  $PY -m retriever.index --config "$CONFIG"
  step 3/5 "retriever fine-tuning on train questions (before/after on dev) + re-index"
  $PY -m retriever.train --config "$CONFIG" data.split=dev
else
  step 2-3/5 "fine-tuned retriever already in $RUN_DIR/retriever: reused"
fi
if [ ! -f "$RUN_DIR/checkpoints/final/manifest.json" ]; then
  step 4/5 "qa.train: every system of train.systems on the same batches"
  $PY -m qa.train --config "$CONFIG" "${FINETUNED[@]}" --resume
else
  step 4/5 "checkpoint $RUN_DIR/checkpoints/final already trained: reused"
fi
step 5/5 "eval.run on the test split"
$PY -m eval.run --config "$CONFIG" "${FINETUNED[@]}"
printf '\nfinished in %ds: %s/eval/report.md\n' $(( $(date +%s) - start )) "$RUN_DIR"
