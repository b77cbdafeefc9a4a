#!/usr/bin/env bash
# One device call that fits a slow `qtrain compare` and the short benchmarks into one lease: the compare
# (scripts/gpu_compare.sh, its recipes side by side with JOBS) runs in the background while the foreground runs
# GPU tests and benchmarks. The benchmark timings are therefore taken while launch-bound training processes share
# the GPU: read them as indications, not as clean numbers (their notes in $OUT/run.log say so).
# Usage: COMPARE_LIMIT=seconds STEPS=... RECIPES=... JOBS=... bash scripts/gpu_compare_with_benches.sh STEP...
# (each STEP as in scripts/gpu_run.sh, e.g. tests-optim bench-quant). Results: $OUT/compare.tgz, $OUT/run.log,
# $OUT/results/.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-out}"
RUN="${RUN:-/tmp/qtrain-gpu-compare}"
mkdir -p "$OUT/cmp" "$OUT/results"
start=$(date +%s)
(OUT="$OUT/cmp" RUN="$RUN" timeout "${COMPARE_LIMIT:-420}" bash scripts/gpu_compare.sh > /dev/null 2>&1
 echo "compare exit $? after $(( $(date +%s) - start )) s" >> "$OUT/cmp/compare.log") &
compare=$!
OUT="$OUT" bash scripts/gpu_run.sh "$@" > "$OUT/fg.log" 2>&1
echo "foreground done after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
wait "$compare"
(cd "$RUN" 2>/dev/null && find . -type f ! -path "*/step-*" -print0 | xargs -0 -r cp --parents -t "$OUT/cmp")
tar czf "$OUT/compare.tgz" -C "$OUT" cmp && rm -rf "$OUT/cmp"
tail -5 "$OUT/run.log"
