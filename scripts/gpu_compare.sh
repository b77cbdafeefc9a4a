#!/usr/bin/env bash
# One device call: `qtrain compare` of bf16 and SwitchBack on llama-125m (byte tokens, Python's stdlib sources),
# 16k tokens per step, sized to finish in about 5-7 minutes on one H100. Results (compare.md/.png/.json, each
# recipe's log.jsonl, loss.png, sample.txt, summary.json; not the checkpoints) are copied to $OUT.
# Usage (from the repository root): bash scripts/gpu_compare.sh [extra qtrain compare flags]
# Environment: STEPS (default 500), RECIPES (default bf16,switchback), MODEL (default llama-125m), JOBS (recipes
# trained at once on the GPU, default 1; above 1 the tokens/s are not comparable).
# compare.md/.json/.png in $RUN (default /tmp/qtrain-gpu-compare) are rewritten as each run finishes: after a
# `timeout` stopped this script, copy them from there to keep the runs it finished.
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-out}"
RUN="${RUN:-/tmp/qtrain-gpu-compare}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
rm -rf "$RUN"
start=$(date +%s)
python -m qtrain compare --recipes "${RECIPES:-bf16,switchback}" --model "${MODEL:-llama-125m}" \
  --steps "${STEPS:-500}" --batch-size 16 --seq-len 1024 --eval-every 100 --eval-batches 20 \
  --save-every "${STEPS:-500}" --jobs "${JOBS:-1}" --no-progress --out "$RUN" "$@" 2>&1 | tee "$OUT/compare.log"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/compare.log"
(cd "$RUN" && find . -type f ! -path "*/step-*" -print0 | xargs -0 cp --parents -t "$OUT")
