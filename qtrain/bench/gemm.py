"""GEMM suite: qtrain's INT8 GEMM (fused dequant epilogue) vs cuBLAS BF16 and ``torch._int_mm``."""
from __future__ import annotations

import torch

from qtrain.bench.common import bench, bench_graph

SHAPES = [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096), (8192, 2048, 2048),
          (8192, 1024, 1024)]                                       # M × K × N


def run_suite(quick: bool = False):
    from qtrain import quant
    from qtrain.kernels.int8_gemm import _int8_gemm_kernel, int8_gemm

    rows = []
    for M, K, N in SHAPES[:2] if quick else SHAPES:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        sa = torch.rand(M, device="cuda") * 1e-2 + 1e-3
        sb = torch.tensor(2e-3, device="cuda")
        sb_row = torch.rand(N, device="cuda") * 1e-2 + 1e-3
        a16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)

        out = int8_gemm(a, b, sa, sb, None, torch.float32)
        err = quant.relative_error(quant.int8_gemm(a, b, sa, sb, None, torch.float32), out)
        if not err <= 1e-5:
            raise RuntimeError(f"int8_gemm wrong at {M}x{K}x{N}: relative error {err}")
        int_mm_ok = torch.equal(torch._int_mm(a, b.t()), quant.int_mm_exact(a, b))

        ops = 2 * M * N * K
        t_bf16 = bench(lambda: a16 @ b16.t(), quick)
        t_int_mm = bench(lambda: torch._int_mm(a, b.t()), quick)
        t_ours = bench(lambda: int8_gemm(a, b, sa, sb, None, torch.bfloat16), quick)
        best = _int8_gemm_kernel.best_config
        t_ours_g = bench_graph(lambda: int8_gemm(a, b, sa, sb, None, torch.bfloat16))
        t_bf16_g = bench_graph(lambda: a16 @ b16.t())
        t_ours_row = bench(lambda: int8_gemm(a, b, sa, sb_row, None, torch.bfloat16), quick)
        rows.append({
            "M": M, "K": K, "N": N,
            "bf16_tflops": ops / t_bf16 / 1e9, "int_mm_tops": ops / t_int_mm / 1e9,
            "qtrain_tops": ops / t_ours / 1e9, "qtrain_rowscale_tops": ops / t_ours_row / 1e9,
            "qtrain_vs_bf16": t_bf16 / t_ours, "int_mm_vs_bf16": t_bf16 / t_int_mm,
            "qtrain_vs_int_mm": t_int_mm / t_ours,
            "graph_qtrain_tops": ops / t_ours_g / 1e9, "graph_bf16_tflops": ops / t_bf16_g / 1e9,
            "graph_qtrain_vs_bf16": t_bf16_g / t_ours_g, "rel_err_fp32_out": err, "int_mm_exact": int_mm_ok,
            "config": f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']}x{best.kwargs['BLOCK_K']} "
                      f"w{best.num_warps} s{best.num_stages}",
        })
        print(rows[-1], flush=True)
        del a, b, a16, b16
    notes = ["qtrain_tops: row scale × tensor scale epilogue, bf16 output (SwitchBack fprop); "
             "qtrain_rowscale_tops: row × row scales. `torch._int_mm` returns int32 with no epilogue.",
             "graph_*: the same kernels replayed from a CUDA graph (do_bench_cudagraph), i.e. without the host's "
             "launch overhead, which eager timings of small GEMMs include.",
             "Median of triton.testing.do_bench (L2 flushed before each call), random inputs, correctness "
             "checked against the exact integer product before timing."]
    return rows, notes
