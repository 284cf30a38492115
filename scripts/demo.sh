#!/usr/bin/env bash
# The main job, end to end, on the real SmolLM2-135M-Instruct model: build the fp32 checkpoint,
# register it, convert it to gguf-q4 (verified against the source and registered with lineage),
# benchmark both on this machine (perplexity, KL-divergence, speed, memory, and HellaSwag accuracy
# by lm-eval's definition with the paired difference), promote the gguf-q4 through gates, print
# the comparison, and say how to open the MLflow UI.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMOPS=.venv/bin/llmops
export LLMOPS_STORE="${LLMOPS_STORE:-$PWD/.llmops}"
SRC_NAME=smollm2-135m
Q4_NAME=smollm2-135m-gguf-q4
OUT="${LLMOPS_DEMO_OUT:-$PWD/build/demo}"
TASK_LIMIT="${LLMOPS_DEMO_TASK_LIMIT:-40}"
mkdir -p "$OUT"

echo "== 1. the real test model (SmolLM2-135M-Instruct, fp32 Hugging Face checkpoint; cached after the first run)" >&2
SRC=$($LLMOPS fixtures smollm2)

echo "== 2. register the source checkpoint (once per store)" >&2
if ! $LLMOPS models show "models:/$SRC_NAME/1" >/dev/null 2>&1; then
    $LLMOPS models register "$SRC" --name "$SRC_NAME" --tag role=source
fi
# a store from before MLflow LoggedModels: give its versions theirs (does nothing otherwise)
$LLMOPS models backfill >/dev/null

echo "== 3. convert it to gguf-q4 (Q4_K_M), verify against the source, register with lineage" >&2
$LLMOPS convert "models:/$SRC_NAME/1" --to gguf-q4 -o "$OUT/SmolLM2-135M-Q4_K_M.gguf" --register "$Q4_NAME"

echo "== 4. benchmark both on this machine: memory, latency, perplexity and KL-divergence against the fp32 source," >&2
echo "      and HellaSwag accuracy (lm-eval's task, first $TASK_LIMIT questions) with the paired difference against it" >&2
echo "      (the source's own figures are those of its baseline role, computed once)" >&2
$LLMOPS bench "models:/$Q4_NAME/latest" "models:/$SRC_NAME/1" --baseline "models:/$SRC_NAME/1" \
    --metrics memory,latency,accuracy,tasks --tasks hellaswag --limit "$TASK_LIMIT"

echo "== 5. promote the gguf-q4 to @production, gated on its KL-divergence and its HellaSwag difference against the source" >&2
Q4_VERSION=$($LLMOPS --json models show "models:/$Q4_NAME/latest" | "${LLMOPS%/llmops}/python" -c 'import json, sys; print(json.load(sys.stdin)["version"])')
$LLMOPS promote "$Q4_NAME" "$Q4_VERSION" --gate "kld < 1" --gate "hellaswag.acc_norm_delta >= -10"

echo "== 6. one table across formats, and the size/accuracy/speed plot (also logged to MLflow)" >&2
$LLMOPS bench compare "models:/$SRC_NAME/1" "models:/$Q4_NAME/latest" --plot "$OUT/tradeoff.png"
$LLMOPS lineage "models:/$Q4_NAME/latest"

cat >&2 <<MSG

Done. Browse the models, their metrics, lineage pictures and the trade-off plot in the MLflow UI:
    .venv/bin/llmops --store "$LLMOPS_STORE" ui      # then open http://127.0.0.1:5000
  Models: each version, its @production alias and tags; its description links its LoggedModel
  Experiments > llmops > Models: the LoggedModels, with their metrics and the dataset each was measured on
  a version's run > Artifacts: lineage/lineage.png (what it was made from) and plots/tradeoff.png
MSG
