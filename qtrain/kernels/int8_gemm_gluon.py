"""Experimental Gluon (Hopper) INT8 GEMM: TMA loads into a ring of shared-memory stages, asynchronous wgmma
(``warpgroup_mma(is_async=True)`` + ``warpgroup_mma_wait(num_outstanding=1)``), so the next K-tile's MMA is
issued while the previous one drains — the overlap Triton 3.6's pipeliner does not give INT8 dots.

Same contract as :func:`qtrain.kernels.int8_gemm.int8_gemm` (and its reference twin), restricted to what TMA and
the ring need: CUDA, K and N multiples of 16, K ≥ STAGES·BLOCK_K. :func:`supported` says whether a call
qualifies. GPU only (Gluon does not run in Triton's interpreter); tested by ``tests/kernels/test_gpu_kernels.py``.
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qtrain.quant.int8_gemm import check_int8_gemm_args

_GL_OUT = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
_INT8_INSTR_N = (224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8)
# (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps)
CONFIG = (128, 256, 128, 3, 8)


@gluon.jit
def _gluon_int8_gemm_kernel(a_desc, b_desc, c_desc, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                            B_ROW: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr,
                            GROUP_M: gl.constexpr, INSTR_N: gl.constexpr, WARPS_M: gl.constexpr,
                            WARPS_N: gl.constexpr):
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]

    pid = gl.program_id(0)
    grid_m = gl.cdiv(M, BLOCK_M)
    grid_n = gl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = gl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
                                                         instr_shape=[16, INSTR_N, 32])
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)

    k_tiles = gl.cdiv(K, BLOCK_K)
    tile_bytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    for i in gl.static_range(STAGES - 1):
        mbarrier.expect(ready.index(i), tile_bytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, i * BLOCK_K], ready.index(i), a_smem.index(i))
        tma.async_copy_global_to_shared(b_desc, [off_n, i * BLOCK_K], ready.index(i), b_smem.index(i))

    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=mma_layout)
    for ki in range(k_tiles):
        s = ki % STAGES
        mbarrier.wait(ready.index(s), (ki // STAGES) & 1)
        acc = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), acc, is_async=True)
        # ≤ 1 wgmma in flight: the one of tile ki-1 is done, so its stage can be refilled with tile ki+STAGES-1
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        nk = ki + STAGES - 1
        ns = nk % STAGES
        do_load = nk < k_tiles
        mbarrier.expect(ready.index(ns), tile_bytes, pred=do_load)
        tma.async_copy_global_to_shared(a_desc, [off_m, nk * BLOCK_K], ready.index(ns), a_smem.index(ns),
                                        pred=do_load)
        tma.async_copy_global_to_shared(b_desc, [off_n, nk * BLOCK_K], ready.index(ns), b_smem.index(ns),
                                        pred=do_load)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

    rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    sa = gl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
    res = acc.to(gl.float32) * gl.expand_dims(sa, 1)
    if B_ROW:
        res = res * gl.expand_dims(gl.load(b_scale_ptr + rn, mask=rn < N, other=0.0), 0)
    else:
        res = res * gl.load(b_scale_ptr)
    if HAS_BIAS:
        res = res + gl.expand_dims(gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32), 0)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
    c_smem.store(res.to(c_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(pendings=0)


def supported(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, config=None) -> bool:
    """Whether :func:`int8_gemm` can run this call (a Hopper GPU — wgmma and TMA are sm_90 instructions —, TMA
    alignment, K long enough to fill the ring)."""
    bm, bn, bk, stages, _ = config or CONFIG
    if a.device.type != "cuda" or a.dim() != 2 or b.dim() != 2:
        return False
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return False
    M, K = a.shape
    N = b.shape[0]
    return (K % 16 == 0 and N % 16 == 0 and K >= stages * bk and a.stride(1) == 1 and b.stride(1) == 1
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0 and M > 0)


@functools.lru_cache(maxsize=None)
def _layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.int8 if dtype == torch.int8 else _GL_OUT[dtype])


@functools.lru_cache(maxsize=None)
def _instr_n(block_m: int, block_n: int, warps: int) -> tuple[int, int, int]:
    warps_m = min(warps, block_m // 16)
    warps_n = warps // warps_m
    max_n = max(block_n // warps_n, 8)
    n = next(n for n in _INT8_INSTR_N if n <= max_n and (block_n // warps_n) % n == 0)
    return n, warps_m, warps_n


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              config=None) -> torch.Tensor:
    check_int8_gemm_args(a, b, a_scale, b_scale, bias, out_dtype)
    if not supported(a, b, out_dtype, config):
        raise ValueError(f"the Gluon INT8 GEMM needs CUDA, K and N multiples of 16 and K ≥ STAGES·BLOCK_K; got "
                         f"a {tuple(a.shape)} on {a.device}, b {tuple(b.shape)}")
    bias = bias.contiguous() if bias is not None else None
    return launch(a, b, a_scale.contiguous(), b_scale.contiguous(), bias, out_dtype, config)


def launch(a, b, a_scale, b_scale, bias, out_dtype, config=None, out=None) -> torch.Tensor:
    """:func:`int8_gemm` without the argument checks, for callers that made them (and checked
    :func:`supported`; ``out``, if given, is a 16-byte aligned contiguous ``[M, N]`` ``out_dtype`` tensor):
    keeps the host cost of a call near that of the Triton kernel."""
    bm, bn, bk, stages, warps = config or CONFIG
    M, K = a.shape
    N = b.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk], _layout((bm, bk), torch.int8))
    b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [bn, bk], _layout((bn, bk), torch.int8))
    c_desc = TensorDescriptor(out, [M, N], [N, 1], [bm, bn], _layout((bm, bn), out_dtype))
    instr_n, warps_m, warps_n = _instr_n(bm, bn, warps)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _gluon_int8_gemm_kernel[grid](
        a_desc, b_desc, c_desc, a_scale, b_scale, bias if bias is not None else a_scale, M, N, K,
        B_ROW=b_scale.dim() == 1, HAS_BIAS=bias is not None, STAGES=stages, GROUP_M=8,
        INSTR_N=instr_n, WARPS_M=warps_m, WARPS_N=warps_n, num_warps=warps)
    return out
