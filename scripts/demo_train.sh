#!/usr/bin/env bash
# `make demo-train`: the whole train-from-scratch pipeline on the embedded defaults and the synthetic world
# (invented facts no LM knows), then the Gradio app. `make demo` serves the shipped model on real text instead.
#   data_prep -> index -> retriever fine-tuning -> dynamic_prefix training -> prefix store -> evaluation -> app
# Every step reuses its output when it is already there (a second run goes straight to serving).
# DEMO_SERVE=0 runs the pipeline only.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/demo-train.yaml}"
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN_DIR=$($PY -c "from configs import load_config; print(load_config('$CONFIG').run_dir)")
# The bootstrap steps read with the packaged encoder; later steps with the fine-tuned one the config names.
BASE_ENCODER=(retriever.model=embedded:minilm-l6)
start=$(date +%s)
step() { printf '\n=== [%s] %s (%ds elapsed)\n' "$1" "$2" $(( $(date +%s) - start )); }

step 1/7 "synthetic world -> segment store"
$PY -m data_prep.build --config "$CONFIG" "${BASE_ENCODER[@]}"

if [ ! -f "$RUN_DIR/retriever/config.json" ]; then
  step 2/7 "segment store -> embeddings -> faiss index (packaged MiniLM)"
  $PY -m retriever.index --config "$CONFIG" "${BASE_ENCODER[@]}"
  step 3/7 "retriever fine-tuning (InfoNCE, train entities only) + re-index"
  $PY -m retriever.train --config "$CONFIG" "${BASE_ENCODER[@]}" data.split=dev
else
  step 2-3/7 "fine-tuned retriever already in $RUN_DIR/retriever: reused"
fi

if [ ! -f "$RUN_DIR/checkpoints/final/manifest.json" ]; then
  step 4/7 "dynamic_prefix training through the frozen LM"
  $PY -m qa.train --config "$CONFIG" --resume
else
  step 4/7 "checkpoint $RUN_DIR/checkpoints/final already trained: reused"
fi

step 5/7 "prefix store (every segment's prefix, computed once)"
$PY -m qa.precompute --config "$CONFIG"

step 6/7 "evaluation on random test questions"
$PY -m eval.run --config "$CONFIG"
$PY - "$RUN_DIR" <<'EOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/eval/metrics.json"))
print(f"\nEM on {m['n']} test questions (held-out entities):")
for name, row in m["systems"].items():
    em = row.get("em")
    print(f"  {name:<22} EM {em:.3f}" if em is not None else f"  {name:<22} -")
EOF
printf '\npipeline finished in %ds\n' $(( $(date +%s) - start ))

if [ "${DEMO_SERVE:-1}" != "0" ]; then
  step 7/7 "serving the demo at http://127.0.0.1:7860 (Ctrl-C to stop)"
  exec $PY app.py --config "$CONFIG"
fi
