"""Linear suite: SwitchBack ``QuantLinear`` forward + backward vs ``nn.Linear`` in BF16, with a per-kernel
breakdown, over LLaMA-7B layer shapes and a size sweep that finds where quantizing stops paying."""
from __future__ import annotations

import torch

from qtrain.bench.common import bench

MAIN = [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096)]      # tokens × in × out
SWEEP = [(16384, d, d) for d in (512, 768, 1024, 1536, 2048, 3072)] + [(4096, d, d) for d in (1024, 2048, 4096)]


def _fwd_bwd(layer, x, dy, requant: bool):
    """``requant``: quantize the weight every call (it changes every optimizer step); else reuse it, as
    gradient-accumulation micro-steps inside ``qtrain.reuse_quantized_weights`` do."""
    if hasattr(layer, "reuse_weight"):
        layer.reuse_weight = not requant

    def step():
        layer.weight.grad = None
        x.grad = None
        layer(x).backward(dy)
    return step


def _breakdown(x, w, dy, quick):
    """Milliseconds of each kernel SwitchBack runs for one forward + backward."""
    from qtrain.kernels.int8_gemm import int8_gemm
    from qtrain.kernels.rowwise import quantize_rowwise
    from qtrain.kernels.tensorwise import quantize_tensorwise

    xq, xs = quantize_rowwise(x)
    wq, wqt, ws = quantize_tensorwise(w)
    dyq, dys = quantize_rowwise(dy)
    return {
        "t_quant_x_ms": bench(lambda: quantize_rowwise(x), quick),
        "t_quant_w_ms": bench(lambda: quantize_tensorwise(w), quick),
        "t_fprop_int8_ms": bench(lambda: int8_gemm(xq, wq, xs, ws, None, torch.bfloat16), quick),
        "t_quant_dy_ms": bench(lambda: quantize_rowwise(dy), quick),
        "t_dgrad_int8_ms": bench(lambda: int8_gemm(dyq, wqt, dys, ws, None, torch.bfloat16), quick),
        "t_wgrad_bf16_ms": bench(lambda: dy.t() @ x, quick),
    }


def run_suite(quick: bool = False):
    import qtrain
    from qtrain.quant import sqnr

    rows = []
    shapes = MAIN[:1] + SWEEP[:3] if quick else MAIN + SWEEP
    for M, K, N in shapes:
        torch.manual_seed(0)
        ref = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        ql = qtrain.QuantLinear(K, N, bias=False, recipe="switchback", device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ql.weight.copy_(ref.weight)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

        with torch.no_grad():
            y_ref = x.float() @ ref.weight.float().t()
            q = sqnr(y_ref, ql(x).float())
        if not q > 30:
            raise RuntimeError(f"QuantLinear {K}->{N} forward SQNR {q:.1f} dB is too low")

        t_bf16 = bench(_fwd_bwd(ref, x, dy, False), quick)
        t_q = bench(_fwd_bwd(ql, x, dy, True), quick)
        t_q_cached = bench(_fwd_bwd(ql, x, dy, False), quick)
        with torch.no_grad():
            t_bf16_fwd = bench(lambda: ref(x), quick)
            t_q_fwd = bench(lambda: ql(x), quick)
        row = {"tokens": M, "in": K, "out": N, "bf16_ms": t_bf16, "switchback_ms": t_q,
               "speedup": t_bf16 / t_q, "speedup_w_cached": t_bf16 / t_q_cached,
               "fwd_speedup": t_bf16_fwd / t_q_fwd, "fwd_sqnr_db": q}
        parts = _breakdown(x.detach(), ql.weight.detach(), dy, quick)
        row.update(parts)
        row["sum_of_kernels_ms"] = sum(parts.values())
        row["speedup_kernels_only"] = t_bf16 / row["sum_of_kernels_ms"]
        rows.append(row)
        print(row, flush=True)
    sweep = sorted((r for r in rows if r["tokens"] == 16384 and r["in"] == r["out"]), key=lambda r: r["in"])
    paying = [r["in"] for r in sweep if r["speedup"] >= 1.0]
    paying_k = [r["in"] for r in sweep if r["speedup_kernels_only"] >= 1.0]
    notes = ["Forward + backward of one layer, bf16 weights and inputs, no bias; SwitchBack times include every "
             "quantize (X, W and Wᵀ, dY), both INT8 GEMMs and the BF16 weight-gradient GEMM, through the "
             "autograd Function (eager). `speedup_w_cached` reuses the quantized weight (gradient accumulation).",
             "Breakdown: each kernel timed alone with the same inputs (their sum omits Python/dispatch overhead).",
             f"Square layers at 16384 tokens where SwitchBack pays (speedup ≥ 1): {paying or 'none'}; by the sum "
             f"of kernel times alone (no host overhead, e.g. under CUDA graphs): {paying_k or 'none'}."]
    return rows, notes
