"""GEMM suite: qtrain's INT8 GEMM (fused dequant epilogue) vs cuBLAS BF16 and ``torch._int_mm``."""
from __future__ import annotations

import torch

from qtrain.bench.common import bench, bench_graph

SHAPES = [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096), (8192, 2048, 2048),
          (8192, 1024, 1024)]                                       # M × K × N


def run_suite(quick: bool = False):
    from qtrain import quant
    from qtrain.kernels import int8_gemm as kg
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

        ref = quant.int8_gemm(a, b, sa, sb, None, torch.float32)
        err = quant.relative_error(ref, int8_gemm(a, b, sa, sb, None, torch.float32))
        kg.GLUON_ENABLED = False
        err_triton = quant.relative_error(ref, int8_gemm(a, b, sa, sb, None, torch.float32))
        kg.GLUON_ENABLED = True
        if not (err <= 1e-5 and err_triton <= 1e-5):
            raise RuntimeError(f"int8_gemm wrong at {M}x{K}x{N}: relative errors {err}, {err_triton} (Triton)")
        int_mm_ok = torch.equal(torch._int_mm(a, b.t()), quant.int_mm_exact(a, b))

        ops = 2 * M * N * K
        t_bf16 = bench(lambda: a16 @ b16.t(), quick)
        t_int_mm = bench(lambda: torch._int_mm(a, b.t()), quick)
        t_ours = bench(lambda: int8_gemm(a, b, sa, sb, None, torch.bfloat16), quick)
        glu = kg._gluon()
        on_gluon = bool(glu and M * N * K >= kg.TMA_MIN_MNK and glu.supported(a, b, torch.bfloat16))
        kg.GLUON_ENABLED = False
        t_triton = bench(lambda: int8_gemm(a, b, sa, sb, None, torch.bfloat16), quick)
        best = _int8_gemm_kernel.best_config
        kg.GLUON_ENABLED = True
        if on_gluon:
            bm, bn, bk, stages, warps = glu.CONFIG
            config = f"gluon {bm}x{bn}x{bk} w{warps} s{stages}"
        else:
            config = (f"triton {best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']}x{best.kwargs['BLOCK_K']} "
                      f"w{best.num_warps} s{best.num_stages}")
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
            "triton_only_tops": ops / t_triton / 1e9, "config": config,
        })
        print(rows[-1], flush=True)
    notes = ["qtrain_tops: what `int8_gemm` dispatches to (the Gluon kernel for large TMA-aligned GEMMs, else "
             "Triton; `config` says which), row scale × tensor scale epilogue, bf16 output (SwitchBack fprop); "
             "triton_only_tops: the Triton kernel alone (Gluon disabled); "
             "qtrain_rowscale_tops: row × row scales. `torch._int_mm` returns int32 with no epilogue.",
             "graph_*: the same kernels replayed from a CUDA graph (do_bench_cudagraph), i.e. without the host's "
             "launch overhead, which eager timings of small GEMMs include.",
             "Median of triton.testing.do_bench (L2 flushed before each call), random inputs, correctness "
             "checked against the exact integer product before timing."]
    return rows, notes
