#!/usr/bin/env bash
# The main job, end to end, on the real SmolLM2-135M-Instruct model:
# build the fp32 checkpoint, register it, and show how to browse it in the MLflow UI.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMOPS=.venv/bin/llmops
export LLMOPS_STORE="${LLMOPS_STORE:-$PWD/.llmops}"

echo "== 1. the real test model (SmolLM2-135M-Instruct, fp32 Hugging Face checkpoint; cached after the first run)" >&2
SRC=$($LLMOPS fixtures smollm2)

echo "== 2. register the source checkpoint" >&2
$LLMOPS models register "$SRC" --name smollm2-135m --tag role=source

echo "== 3. the registry" >&2
$LLMOPS models list
$LLMOPS lineage models:/smollm2-135m/latest

cat >&2 <<MSG

Done. Browse the registry in the MLflow UI:
    .venv/bin/llmops --store "$LLMOPS_STORE" ui      # then open http://127.0.0.1:5000 (Models tab)
MSG
