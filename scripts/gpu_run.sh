#!/usr/bin/env bash
# One device call: GPU kernel tests and benchmarks, everything logged under $OUT (default ./out).
# Usage (on the lent GPU, from the repository root): bash scripts/gpu_run.sh [gemm quant tests linear ...]
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-out}"
mkdir -p "$OUT/results"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gemm quant tests linear)
for step in "${steps[@]}"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tests) python -m pytest -m gpu tests/kernels -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" ;;
    gemm|quant|linear) python -m qtrain.bench "$step" --out "$OUT/results" 2>&1 | tee "$OUT/bench-$step.log" ;;
    overhead) python benchmarks/overhead.py 2>&1 | tee "$OUT/overhead.log" ;;
    *) python -m qtrain.bench "${step#bench-}" --quick --out "$OUT/results" 2>&1 | tee "$OUT/$step.log" ;;
  esac
done
echo "=== done $(date +%T)"
