"""INT8 GEMM with per-block scales along K (reference twin of ``qtrain.kernels.block_gemm``).

``block_int8_gemm(a [M, K] int8, b [N, K] int8, a_scale [⌈M/ra⌉, ⌈K/c⌉] fp32, b_scale [⌈N/rb⌉, ⌈K/c⌉] fp32,
a_rows ra, b_rows rb, block_k c, bias [N] | None, out_dtype) -> [M, N] out_dtype``::

    out[m, n] = Σ_j  (Σ_{k in K-block j} a[m, k]·b[n, k]) · a_scale[m // ra, j] · b_scale[n // rb, j]  (+ bias[n])

— the operands of :func:`qtrain.quant.blockwise.quantize_blockwise` with blocks ``(ra, c)`` and ``(rb, c)``
(both along K in ``c``-wide groups). The reference is exact up to one rounding: each block's integer product is
exact in fp32 (``c · 127² < 2²⁴`` for ``c ≤ 1040``) and the scaled sum runs in fp64.
"""
from __future__ import annotations

import torch

from qtrain.quant.blockwise import check_block
from qtrain.quant.int8_gemm import check_epilogue_args

MAX_BLOCK_K = 1040
BLOCK_KS = (32, 64, 128, 256)     # the block widths along K the Triton kernel takes (INT8 MMA steps K ≥ 32)


def check_block_gemm_args(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"block_int8_gemm operands must be int8, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"block_int8_gemm wants a [M, K] and b [N, K], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    check_block(a_rows, block_k)
    check_block(b_rows, block_k)
    if block_k > MAX_BLOCK_K:
        raise ValueError(f"block_k {block_k} is over {MAX_BLOCK_K}: a block's integer sum would not be exact")
    (M, K), N = a.shape, b.shape[0]
    nk = -(-K // block_k)
    for name, s, rows, outer in (("a_scale", a_scale, a_rows, M), ("b_scale", b_scale, b_rows, N)):
        want = (-(-outer // rows), nk)
        if s.dtype != torch.float32 or tuple(s.shape) != want:
            raise ValueError(f"{name} must be fp32 {list(want)} (blocks of {rows}×{block_k}), got {s.dtype} "
                             f"{list(s.shape)}")
    check_epilogue_args("block_int8_gemm", (a, b, a_scale, b_scale), N, bias, out_dtype)


def block_int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    a_rows: int, b_rows: int, block_k: int, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    check_block_gemm_args(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)
    out = block_sum_fp64(a, b, a_scale, b_scale, a_rows, b_rows, block_k)
    if bias is not None:
        out += bias.double()
    return out.to(out_dtype)


def block_sum_fp64(a, b, a_scale, b_scale, a_rows, b_rows, block_k) -> torch.Tensor:
    """The scaled block sum of :func:`block_int8_gemm` in fp64, no bias, no cast (arguments checked)."""
    (M, K), N = a.shape, b.shape[0]
    sa = a_scale.double().repeat_interleave(a_rows, 0)[:M]       # [M, nk]
    sb = b_scale.double().repeat_interleave(b_rows, 0)[:N]       # [N, nk]
    nk = sa.shape[1]
    pad = nk * block_k - K
    A = torch.nn.functional.pad(a.float(), (0, pad)).view(M, nk, block_k).transpose(0, 1)    # [nk, M, c]
    B = torch.nn.functional.pad(b.float(), (0, pad)).view(N, nk, block_k).transpose(0, 1)    # [nk, N, c]
    out = torch.zeros(M, N, dtype=torch.float64, device=a.device)
    step = max(1, (1 << 24) // max(1, M * N))                    # K blocks per batched product (bounded memory)
    for j in range(0, nk, step):
        parts = torch.bmm(A[j:j + step], B[j:j + step].transpose(1, 2))                 # exact integers
        out += (parts.double() * sa.t()[j:j + step, :, None] * sb.t()[j:j + step, None, :]).sum(0)
    return out
