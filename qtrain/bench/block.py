"""Block suite: the block-scaled INT8 GEMM and block-wise quantize, against cuBLAS BF16 and the per-tensor-scaled
INT8 kernel in the same run (the base of the block-scaled recipes; not yet used by a preset)."""
from __future__ import annotations

import torch

from qtrain.bench.common import bench

SHAPES = [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096)]      # M × K × N
BLOCKINGS = [("1x128 · 128x128", 1, 128, 128), ("32x32 · 32x32", 32, 32, 32)]    # (a rows, b rows, block_k)


def run_suite(quick: bool = False):
    from qtrain import quant
    from qtrain.kernels.block_gemm import _block_gemm_kernel, block_int8_gemm
    from qtrain.kernels.blockwise import quantize_blockwise
    from qtrain.kernels.int8_gemm import int8_gemm

    rows = []
    for M, K, N in SHAPES[:1] if quick else SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        ops = 2 * M * N * K
        t_bf16 = bench(lambda: x @ w.t(), quick)
        sa_row, sb_t = torch.rand(M, device="cuda") + 0.5, torch.tensor(1e-3, device="cuda")
        t_tensor = bench(lambda: int8_gemm(a, b, sa_row, sb_t, None, torch.bfloat16), quick)
        for label, ra, rb, c in BLOCKINGS:
            qa, sa = quantize_blockwise(x, ra, c)
            qb, sb = quantize_blockwise(w, rb, c)
            ref = quant.block_int8_gemm(qa, qb, sa, sb, ra, rb, c, None, torch.float32)
            err = quant.relative_error(ref, block_int8_gemm(qa, qb, sa, sb, ra, rb, c, None, torch.float32))
            if not err <= 1e-5:
                raise RuntimeError(f"block_int8_gemm wrong at {M}x{K}x{N} {label}: relative error {err}")
            t_block = bench(lambda: block_int8_gemm(qa, qb, sa, sb, ra, rb, c, None, torch.bfloat16), quick)
            best = _block_gemm_kernel.best_config
            t_qx = bench(lambda: quantize_blockwise(x, ra, c), quick)
            rows.append({
                "M": M, "K": K, "N": N, "blocks": label, "bf16_tflops": ops / t_bf16 / 1e9,
                "block_tops": ops / t_block / 1e9, "block_vs_bf16": t_bf16 / t_block,
                "tensor_scaled_tops": ops / t_tensor / 1e9, "block_vs_tensor_scaled": t_tensor / t_block,
                "quantize_x_us": t_qx * 1e3, "quantize_x_TB_s": (3 * M * K) / t_qx / 1e9,
                "rel_err_fp32_out": err,
                "config": f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']} w{best.num_warps} s{best.num_stages}",
            })
            print(rows[-1], flush=True)
    notes = ["block_tops: `kernels.block_gemm` (Triton, a promotion per K block), bf16 output; tensor_scaled_tops: "
             "the per-tensor/row-scaled `int8_gemm` on the same operands (SwitchBack's GEMM) in the same run.",
             "quantize_x: `kernels.blockwise` on the [M, K] bf16 activation, bandwidth by minimum bytes (read bf16, "
             "write int8; scales not counted).",
             "Median of triton.testing.do_bench (L2 flushed), correctness checked against the reference first."]
    return rows, notes
