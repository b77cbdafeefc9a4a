"""INT8 GEMM with per-block scales along K (twin of :mod:`qtrain.quant.block_gemm`).

``block_int8_gemm(a [M, K] int8, b [N, K] int8, a_scale [⌈M/ra⌉, ⌈K/c⌉], b_scale [⌈N/rb⌉, ⌈K/c⌉] fp32,
a_rows ra, b_rows rb, block_k c, bias, out_dtype) -> [M, N]``: the K loop steps one scale block (``c``) at a
time; each step's int32 tile product is converted to fp32 and scaled by its rows' and columns' block scales
before it joins the fp32 accumulator (the promotion the per-tensor kernel does once, here once per K block).
Masked pointers, grouped tile order, bias and output cast fused. ``c`` ∈ {32, 64, 128, 256} (the INT8 MMA
needs K ≥ 32 per step); operands not contiguous along K are copied first.

This is the Triton base of the block-scaled recipes; on Hopper its synchronous ``tl.dot`` plus a promotion per
K block caps it well below the per-tensor kernel (GPU.md: 280–870 TOP/s), which a Gluon twin is to lift.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import TL_OUT, check_device, grouped_tile, interpreting, round_to_bf16
from qtrain.quant.block_gemm import BLOCK_KS, check_block_gemm_args


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4))]


def _prune(configs, named_args, **kwargs):
    M, N = named_args["M"], named_args["N"]
    # with a fallback term a tile's flag is one per 128 rows: BLOCK_M must not straddle two
    max_m = 128 if kwargs.get("HAS_FB") else max(64, triton.next_power_of_2(M))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m
            and c.kwargs["BLOCK_N"] <= max(128, triton.next_power_of_2(N))]
    return kept or [c for c in configs if c.kwargs["BLOCK_M"] <= 128][-1:]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "RA", "RB", "BLOCK_K", "HAS_BIAS", "OUT_DTYPE",
                                          "HAS_FB"],
                 prune_configs_by={"early_config_prune": _prune} if not interpreting() else None)
@triton.jit
def _block_gemm_kernel(a, b, out, sa_ptr, sb_ptr, bias_ptr, a2, sa2_ptr, flag_ptr, M, N, K, M_BUCKET, stride_am,
                       stride_bn, stride_om, stride_sa, stride_sb, stride_f, RA: tl.constexpr, RB: tl.constexpr,
                       BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       HAS_FB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """``HAS_FB``: a second lhs ``a2`` (same layout as ``a``, scales ``sa2``) joins each K block whose
    128-row tile is flagged (``flag_ptr`` uint8 ``[⌈M/128⌉, nk]``); unflagged tiles of ``a2`` are never read."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_offs = rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    a_ptrs = a + a_offs
    b_ptrs = b + rn[:, None].to(tl.int64) * stride_bn + rk[None, :]
    sa_ptrs = sa_ptr + (rm // RA) * stride_sa
    sb_ptrs = sb_ptr + (rn // RB) * stride_sb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = (j * BLOCK_K + rk)[None, :] < K
        at = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask, other=0)
        bt = tl.load(b_ptrs, mask=(rn[:, None] < N) & kmask, other=0)
        part = tl.dot(at, bt.T, out_dtype=tl.int32).to(tl.float32)
        sa = tl.load(sa_ptrs + j, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptrs + j, mask=rn < N, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
        if HAS_FB:
            if tl.load(flag_ptr + ((pid_m * BLOCK_M) // 128) * stride_f + j) != 0:
                a2t = tl.load(a2 + a_offs + j * BLOCK_K, mask=(rm[:, None] < M) & kmask, other=0)
                part2 = tl.dot(a2t, bt.T, out_dtype=tl.int32).to(tl.float32)
                sa2 = tl.load(sa2_ptr + (rm // RA) * stride_sa + j, mask=rm < M, other=0.0)
                acc += part2 * sa2[:, None] * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if OUT_DTYPE == tl.bfloat16:
        acc = round_to_bf16(acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(OUT_DTYPE), mask=mask)


GLUON_MIN_OPS = 2 ** 37     # 2·M·N·K from which Hopper calls go to the Gluon kernel (8192×2048×2048: Gluon
                            # 890–911 TOP/s, Triton 548–551 in two H200 runs; a third run had Gluon at 406)


def use_gluon(a: torch.Tensor, b: torch.Tensor, a_rows: int, b_rows: int, block_k: int,
              out_dtype: torch.dtype) -> bool:
    """Whether a call goes to the warp-specialized Gluon kernel (``kernels.block_gemm_gluon``): on a Hopper GPU
    (capability 9.0), large enough, and a case it supports (1×c · 128×c or 1×c · 1×c blocks, c 128 or 256, TMA-aligned
    operands); everything else stays on this Triton kernel."""
    if interpreting() or a.device.type != "cuda" or 2 * a.shape[0] * a.shape[1] * b.shape[0] < GLUON_MIN_OPS:
        return False
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return False
    from qtrain.kernels import block_gemm_gluon

    return block_gemm_gluon.supported(a, b, a_rows, b_rows, block_k, out_dtype)


def block_int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    a_rows: int, b_rows: int, block_k: int, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    check_block_gemm_args(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)
    if use_gluon(a, b, a_rows, b_rows, block_k, out_dtype):
        from qtrain.kernels import block_gemm_gluon

        return block_gemm_gluon.launch(a, b, a_scale.contiguous(), b_scale.contiguous(), b_rows,
                                       bias.contiguous() if bias is not None else None, out_dtype, block_k=block_k)
    return launch(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)


def launch(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype, fallback=None) -> torch.Tensor:
    """The Triton block GEMM on checked arguments; ``fallback = (a2, a2_scale, flags)`` adds the residual term
    of :func:`qtrain.kernels.fallback.fallback_block_gemm` (``a_rows`` 1)."""
    check_device(a)
    if block_k not in BLOCK_KS:
        raise ValueError(f"the block GEMM kernel takes block_k in {BLOCK_KS}, got {block_k}; use the reference "
                         "(qtrain.ops backend 'reference') for others")
    (M, K), N = a.shape, b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_((bias.float() if bias is not None else torch.zeros(N, device=a.device)).expand(M, N))
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if fallback is not None:
        a2, a2_scale, flags = fallback
        a, a2 = a.contiguous(), a2.contiguous()                          # one layout for both lhs terms
        a2_scale = a2_scale.contiguous()
        flags = (flags.view(torch.uint8) if flags.dtype == torch.bool else flags).contiguous()
    else:
        a2, a2_scale, flags = a, a_scale, a_scale

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _block_gemm_kernel[grid](a, b, out, a_scale, b_scale, bias if bias is not None else a_scale, a2, a2_scale,
                             flags, M, N, K, triton.next_power_of_2(M), a.stride(0), b.stride(0), out.stride(0),
                             a_scale.stride(0), b_scale.stride(0), flags.stride(0) if fallback else 0,
                             RA=a_rows, RB=b_rows, BLOCK_K=block_k, HAS_BIAS=bias is not None,
                             OUT_DTYPE=TL_OUT[out_dtype], HAS_FB=fallback is not None)
    return out
