#!/usr/bin/env bash
# One device call: GPU kernel tests and benchmarks; results under $OUT/results, every log appended to
# $OUT/run.log (few files: the device tool returns only a handful per call).
# Usage (on the lent GPU, from the repository root): bash scripts/gpu_run.sh [gemm quant tests linear e2e ...]
# (each step a name below; bench-SUITE runs `qtrain bench SUITE --quick`, e.g. bench-e2e; pytest=A,B runs the
# test files A and B)
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT="${OUT:-out}"
mkdir -p "$OUT/results"
nvidia-smi > "$OUT/run.log" 2>&1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gemm quant tests linear)
for step in "${steps[@]}"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tests) python -m pytest -m gpu tests/kernels -q -p no:cacheprovider 2>&1 | tee -a "$OUT/run.log" ;;
    tests-*) python -m pytest -m gpu tests/kernels -q -p no:cacheprovider -k "${step#tests-}" 2>&1 | tee -a "$OUT/run.log" ;;
    # pytest=PATH[,PATH...]: every test of those files on the GPU (their CPU tests then run on CUDA tensors)
    pytest=*) python -m pytest $(echo "${step#pytest=}" | tr , ' ') -q -p no:cacheprovider -rfs 2>&1 | tee -a "$OUT/run.log" ;;
    gemm|quant|linear|block) python -m qtrain.bench "$step" --out "$OUT/results" 2>&1 | tee -a "$OUT/run.log" ;;
    # e2e: the whole end-to-end suite (sized for ~6 min on an H200; not yet measured); rows not started within E2E_TIME_LIMIT s are recorded
    # as skipped so that the results are written inside one 10-minute device call; E2E_ARGS: more flags (e.g.
    # "--shapes 7b --modes compile --recipes int4"). e2e-filter-all: every linear
    # layer but lm_head converted (the default filter keeps the 1B shape's layers in BF16).
    e2e) python -m qtrain.bench e2e --time-limit "${E2E_TIME_LIMIT:-480}" ${E2E_ARGS:-} --out "$OUT/results" 2>&1 \
           | tee -a "$OUT/run.log" ;;
    # e2e-gluon=FLAG: e2e with the boolean module flag block_gemm_gluon.FLAG (e.g. MAGIC) set True; in $OUT/results/FLAG
    e2e-gluon=*) flag="${step#e2e-gluon=}"; python -c "import runpy, sys; import qtrain.kernels.block_gemm_gluon as g
assert hasattr(g, '$flag'), 'no flag $flag'; setattr(g, '$flag', True)
sys.argv = ['qtrain.bench'] + sys.argv[1:]; runpy.run_module('qtrain.bench', run_name='__main__')" \
                   e2e --time-limit "${E2E_TIME_LIMIT:-480}" ${E2E_ARGS:-} --out "$OUT/results/$flag" 2>&1 | tee -a "$OUT/run.log" ;;
    e2e-filter-all) python -m qtrain.bench e2e --filter all --time-limit "${E2E_TIME_LIMIT:-480}" --out "$OUT/results" 2>&1 | tee -a "$OUT/run.log" ;;
    overhead) python benchmarks/overhead.py 2>&1 | tee -a "$OUT/run.log" ;;
    gluon) python benchmarks/gluon_gemm.py 2>&1 | tee -a "$OUT/run.log" ;;
    rowwise-sweep) python benchmarks/rowwise_sweep.py 2>&1 | tee -a "$OUT/run.log" ;;
    blockwise-sweep) python benchmarks/blockwise_sweep.py 2>&1 | tee -a "$OUT/run.log" ;;
    # blockwise-sweep-256: jetfire_wide's quantize calls (128x256 weights, 256-token SR) and the re-blocking only
    blockwise-sweep-256) python benchmarks/blockwise_sweep.py only=256 2>&1 | tee -a "$OUT/run.log" ;;
    dual-sweep) python benchmarks/blockwise_sweep.py dual 2>&1 | tee -a "$OUT/run.log" ;;
    fallback-sweep) python benchmarks/blockwise_sweep.py fallback 2>&1 | tee -a "$OUT/run.log" ;;
    # block-gluon: fprop and wgrad layouts, every variant; block-gluon-quick: one shape each
    block-gluon) python benchmarks/block_gemm_gluon.py --skip fallback --out "$OUT/results/block-gluon.json" 2>&1 \
                   | tee -a "$OUT/run.log" ;;
    block-gluon-quick) python benchmarks/block_gemm_gluon.py --quick --skip fallback \
                         --out "$OUT/results/block-gluon.json" 2>&1 | tee -a "$OUT/run.log" ;;
    # block-gluon-fallback: the fallback kernel against the plain one per layout and scale-block width (quick)
    block-gluon-fallback) python benchmarks/block_gemm_gluon.py --quick --skip fprop,wgrad \
                            --out "$OUT/results/block-gluon-fallback.json" 2>&1 | tee -a "$OUT/run.log" ;;
    fallback-out-dtype) python benchmarks/fallback_out_dtype.py 2>&1 | tee -a "$OUT/run.log" ;;
    host-profile) python benchmarks/host_profile.py 2>&1 | tee -a "$OUT/run.log" ;;
    gluon-overhead) python benchmarks/gluon_overhead.py 2>&1 | tee -a "$OUT/run.log" ;;
    op-dispatch) python benchmarks/op_dispatch.py 2>&1 | tee -a "$OUT/run.log" ;;
    dataflow-ops) python benchmarks/dataflow_ops.py 2>&1 | tee -a "$OUT/run.log" ;;
    dataflow-sweep) python benchmarks/dataflow_ops.py sweep 2>&1 | tee -a "$OUT/run.log" ;;
    optimizer) python benchmarks/optimizer.py 2>&1 | tee -a "$OUT/run.log" ;;
    # profile-SHAPE:RECIPE,RECIPE: benchmarks/profile_step.py (eager kernel and aten-op times of one step);
    # profilec-SHAPE:RECIPE,...: the same under torch.compile; profileg-SHAPE:RECIPE,...: with CUDA graphs
    profileg-*) spec="${step#profileg-}"; python benchmarks/profile_step.py --cudagraphs "${spec%%:*}" \
                  $(echo "${spec#*:}" | tr , ' ') 2>&1 | tee -a "$OUT/run.log" ;;
    profilec-*) spec="${step#profilec-}"; python benchmarks/profile_step.py --compile "${spec%%:*}" \
                  $(echo "${spec#*:}" | tr , ' ') 2>&1 | tee -a "$OUT/run.log" ;;
    profile-*) spec="${step#profile-}"; python benchmarks/profile_step.py "${spec%%:*}" $(echo "${spec#*:}" | tr , ' ') \
                 2>&1 | tee -a "$OUT/run.log" ;;
    *) python -m qtrain.bench "${step#bench-}" --quick --out "$OUT/results" 2>&1 | tee -a "$OUT/run.log" ;;
  esac
done
echo "=== done $(date +%T)"
