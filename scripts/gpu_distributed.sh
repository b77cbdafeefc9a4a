#!/usr/bin/env bash
# One device call on two GPUs (kind nvidia-h200-x2): the distributed runs issue 8 asks for. Per recipe, the same
# global batch on one GPU, under DDP and under FSDP2 on two (loss parity), and one GPU with half the batch (what
# each of the two does: their tokens/s should add up to twice its). Writes $OUT/distributed.md/.json
# (scripts/distributed_report.py) and each run's log.jsonl, summary.json and console log.
# Usage (from the repository root): bash scripts/gpu_distributed.sh
# Environment: RECIPES (default bf16,switchback,fallback,int4), MODEL (llama-125m), STEPS (200), BATCH (the
# global batch, 16 sequences), SEQ (1024), DEVICE (cuda; cpu runs the same on two gloo processes, a smoke test).
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-out}"
RUN="${RUN:-/tmp/qtrain-gpu-distributed}"
STEPS="${STEPS:-200}"
BATCH="${BATCH:-16}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
rm -rf "$RUN"
flags=(--model "${MODEL:-llama-125m}" --steps "$STEPS" --seq-len "${SEQ:-1024}" --eval-every "$STEPS"
       --eval-batches 10 --save-every "$STEPS" --sample-tokens 0 --device "${DEVICE:-cuda}" --no-progress)
train() {   # train NAME PROCESSES [qtrain train flags...]
  local name=$1 procs=$2
  shift 2
  local launch=(python)
  [ "$procs" -gt 1 ] && launch=(torchrun --standalone --nproc-per-node "$procs")
  echo "=== $name ($procs processes) $(date +%T)"
  "${launch[@]}" -m qtrain train "${flags[@]}" "$@" --out "$RUN/$name" > "$OUT/$name.log" 2>&1 \
    || echo "$name failed: see $name.log"
}
for recipe in $(echo "${RECIPES:-bf16,switchback,fallback,int4}" | tr , ' '); do
  r="${recipe##*/}"
  r="${r%.json}"
  train "$r-1gpu" 1 --recipe "$recipe" --batch-size "$BATCH"
  train "$r-ddp" 2 --recipe "$recipe" --batch-size $((BATCH / 2))
  train "$r-fsdp" 2 --recipe "$recipe" --batch-size $((BATCH / 2)) --fsdp
  train "$r-1gpu-half" 1 --recipe "$recipe" --batch-size $((BATCH / 2))
done
python scripts/distributed_report.py "$RUN" "$OUT"
(cd "$RUN" && find . -type f \( -name log.jsonl -o -name summary.json \) -print0 | xargs -0 cp --parents -t "$OUT")
