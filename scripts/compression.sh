#!/usr/bin/env bash
# One row of README's compression table: train one dynamic-prefix variant alone in its own run_dir (a copy of
# a base run's store, index, embeddings and retrieval cache, so the base run is never touched), then evaluate
# it on the config's test questions. Steps whose output exists are reused; training resumes after a crash.
#
#   bash scripts/compression.sh CONFIG BASE_RUN RUN_DIR SYSTEM STEPS [key=value ...]
#   bash scripts/compression.sh configs/default.yaml runs/default runs/c_pre dynamic_prefix@p32 240 \
#       retriever.model=runs/default/retriever knowledge_encoder.pool_rope=pre
#
# The overrides go to both qa.train and eval.run. EVAL_SYSTEMS (default: SYSTEM) lists what eval.run compares.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 5 ] || { sed -n '2,10p' "$0"; exit 2; }
CONFIG=$1 BASE=$2 RUN=$3 SYSTEM=$4 STEPS=$5
shift 5
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN"
for part in store index embeddings cache bm25; do
  if [ -d "$BASE/$part" ] && [ ! -e "$RUN/$part" ]; then cp -r "$BASE/$part" "$RUN/$part"; fi
done
if [ ! -f "$RUN/checkpoints/final/manifest.json" ]; then
  $PY -m qa.train --config "$CONFIG" run_dir="$RUN" "train.systems=[$SYSTEM]" train.max_steps="$STEPS" \
      train.eval_every=$(( STEPS / 2 )) train.save_every=$(( STEPS / 4 )) "$@" --resume
fi
$PY -m eval.run --config "$CONFIG" run_dir="$RUN" "eval.systems=[${EVAL_SYSTEMS:-$SYSTEM}]" "$@"
