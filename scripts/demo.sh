#!/usr/bin/env bash
# `make demo`: the shipped model on real Wikipedia text, then the Gradio app. No training.
#   data/squad-du-train -> segment store -> embeddings + faiss index + BM25 -> app (models/smollm2-135m-squad)
# Every step reuses its output when it is already there (a second run goes straight to serving).
# DEMO_SERVE=0 stops before serving; `make demo-train` is the train-from-scratch pipeline on the synthetic world.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/demo.yaml}"
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { printf '\n=== [%s] %s (%ds elapsed)\n' "$1" "$2" $(( $(date +%s) - start )); }

step 1/3 "Wikipedia paragraphs -> segment store"
$PY -m data_prep.build --config "$CONFIG"
step 2/3 "segment store -> embeddings -> faiss index (packaged MiniLM; BM25 is built on first use)"
$PY -m retriever.index --config "$CONFIG"
printf '\nready in %ds\n' $(( $(date +%s) - start ))
if [ "${DEMO_SERVE:-1}" != "0" ]; then
  step 3/3 "serving the demo at http://127.0.0.1:7860 (Ctrl-C to stop)"
  exec $PY app.py --config "$CONFIG"
fi
