"""Gluon (Hopper) block-scaled INT8 GEMM, with an optional second (fallback) A operand.

Same contract as :func:`qtrain.quant.block_gemm.block_int8_gemm` for the cases the recipes use — ``a_rows`` 1
(1×c activation/gradient blocks), ``b_rows`` ∈ {1, 128} (128×c weight blocks, or 1×c along tokens for
wgrad), ``block_k`` c ∈ {128, 256} — and :func:`fallback_block_gemm` (METHODS.md § Fallback)::

    out[m, n] = Σ_j (a_j·b_j)[m, n]·a_scale[m, j]·b_scale[n // rb, j]
              + Σ_j flags[m // 128, j]·(a2_j·b_j)[m, n]·a2_scale[m, j]·b_scale[n // rb, j]   (+ bias[n])

Structure (DeepGEMM's, in Gluon): a persistent grid (one program per SM, grouped tile order) of 128×128 output
tiles; per program three partitions (``gl.warp_specialize``):

* a 1-warp **producer** that TMA-loads, for each 128-wide K block, the A tile (two 64-row halves), the B tile
  and — only where the tile's flag is set — the A2 tile into a ring of ``STAGES`` shared-memory stages
  (``ready``/``empty`` mbarriers; the expected byte count follows the flag);
* two **consumer warpgroups**, each owning 64 rows of the tile: per scale block (``KP`` = c / 128 ring steps)
  ``KP`` chained async ``warpgroup_mma`` into an int32 partial (exact: |partial| ≤ 256·127² < 2²²), then the
  promotion ``acc += f32(partial)·a_scale·b_scale`` into the fp32 accumulator — 256-wide scale blocks halve the
  promotions per MMA; a flagged block adds the A2 product reusing the B tiles in shared memory.

The overlap Triton's pipeliner cannot give INT8 dots (GPU.md) comes from the two warpgroups taking turns
(``ORDER`` 1): warpgroup 1 issues a scale block's wgmmas only once warpgroup 0's have finished (a ``turn``
mbarrier ring), so one warpgroup promotes while the other's wgmma runs; left alone (``ORDER`` 0) they drift into
lockstep and both promote while the tensor cores idle — measured better on the wgrad layout, where the promotion
is longest (two per-element scales); on 128-row weight blocks lockstep measured faster (:data:`ORDER`). Strict
alternation (a second barrier) and the exact magic-number conversion ``bits(p + 0x4B400000) − 1.5·2²³``
(``MAGIC``) instead of ``cvt`` measured slower on the H200 (benchmarks/results/2026-12-01-h200-block-gluon.md).
Keeping two int32 partials per warpgroup (the next K block's wgmma in flight during the promotion) does not
compile well: ptxas serializes every wgmma when a finished accumulator is read while another is in flight in this
code (its notes C7514/C7512), so it was dropped.
Epilogue per warpgroup: bias, output cast, shared memory, TMA store — for fp32 output of the fallback kernel in
two column halves through a half-size tile (``SPLIT``, :data:`SPLIT_FP32`), which leaves shared memory for a
fourth ring stage.

Scales are read with plain loads: ``a_scale`` as given ([M, nk], two values per thread per scale block),
``b_scale`` per 128-column block (one scalar) when ``b_rows`` is 128, or — for ``b_rows`` 1 — transposed on the
host to [nk, N] so each scale block's column scales are contiguous.

GPU only (Gluon does not run in Triton's interpreter); the module imports on CPU and :func:`supported` is False
there. Tested by ``tests/kernels/test_block_gemm_gluon.py``; measured by ``benchmarks/block_gemm_gluon.py``.
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

from qtrain.quant.block_gemm import check_block_gemm_args
from qtrain.quant.fallback import check_fallback_gemm_args

_GL_OUT = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
BLOCK_KS = (128, 256)             # scale blocks along K: one or two 128-deep ring steps per promotion
HALF_M = 64                       # rows per consumer warpgroup
SMEM_BYTES = 225 * 1024           # H100/H200: 227 KB per block, less room for barriers
MAX_STAGES = 6
GROUP_M = 8
MAGIC = False         # int32 → fp32 by cvt (I2F); True: the exact magic-number add (more instructions, slower)
# per b_rows: 1 — warpgroup 1 starts a scale block's wgmmas once warpgroup 0's are done; 0 — unordered. Measured on
# the H200 over three runs: unordered won 6 of 8 comparisons on 128-row weight blocks, ordered every one on the
# wgrad layout (benchmarks/results/2026-12-01-h200-profile-7b-compile-k256-fallback.md)
ORDER = {128: 0, 1: 1}
CONSUMER_REGS = gl.constexpr(240)     # setmaxnreg of the second consumer warpgroup (the first gets the rest)
PRODUCER_REGS = gl.constexpr(24)
MAXNREG = 168                          # 12 warps (3 warpgroups) × 32 × 168 ≤ 64K registers
# fp32 output of the fallback kernel stored in two column halves through a 32 KB tile, not one 64 KB tile: the ring
# then fits 4 stages, not 3. H200, 7B step GEMMs, 5 % flagged: 1.08-1.15x the plain kernel's time (whole tile:
# 1.07-1.64x; stored from registers, no tile: 1.13-1.26x); compiled 7B step with 256-wide blocks 0.95 -> 1.02x BF16
# (benchmarks/results/2026-12-01-h200-fallback-epilogue.md). The plain kernel gains nothing from it (0.98-1.03x).
SPLIT_FP32 = True
SB_CVT = True         # 1-row column scales: one load a thread + a layout conversion (True; wgrad +8-12 %
                      # on the H200) or 32 loads a thread


@gluon.jit
def _tile_coords(tile, num_m, num_n, GROUP: gl.constexpr):
    group_size = GROUP * num_n
    first_m = (tile // group_size) * GROUP
    rows_in_group = gl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (tile % group_size) % rows_in_group
    pid_n = (tile % group_size) // rows_in_group
    return pid_m, pid_n


@gluon.jit
def _to_f32(p, MAGIC: gl.constexpr):
    """Exact int32 → fp32 for |p| < 2²²."""
    if MAGIC:
        return (p + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0
    else:
        return p.to(gl.float32)


@gluon.jit
def _producer(a_desc, b_desc, a2_desc, a_smem, b_smem, a2_smem, ready, empty, flags_ptr, stride_fm, M, N, K,
              FALLBACK: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, KP: gl.constexpr):
    BM: gl.constexpr = 2 * a_desc.block_type.shape[0]
    HM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    BK: gl.constexpr = b_desc.block_type.shape[1]
    AB_BYTES: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
    A2_BYTES: gl.constexpr = 2 * a_desc.block_type.nbytes
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    nk = gl.cdiv(K, BK * KP) * KP          # ring steps: whole scale blocks (TMA zero-fills K beyond the end)
    it = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP)
        off_m = pid_m * BM
        off_n = pid_n * BN
        for j in range(nk):
            s = it % STAGES
            if FALLBACK:                    # the flag of scale block j // KP, loaded before the wait hides its latency
                fv = gl.load(flags_ptr + pid_m * stride_fm + j // KP)
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            k = j * BK
            if FALLBACK:
                f = fv != 0
                mbarrier.expect(bar, AB_BYTES + A2_BYTES, pred=f)
                mbarrier.expect(bar, AB_BYTES, pred=fv == 0)
                tma.async_copy_global_to_shared(a2_desc, [off_m, k], bar, a2_smem.index(2 * s), pred=f)
                tma.async_copy_global_to_shared(a2_desc, [off_m + HM, k], bar, a2_smem.index(2 * s + 1), pred=f)
            else:
                mbarrier.expect(bar, AB_BYTES)
            tma.async_copy_global_to_shared(a_desc, [off_m, k], bar, a_smem.index(2 * s))
            tma.async_copy_global_to_shared(a_desc, [off_m + HM, k], bar, a_smem.index(2 * s + 1))
            tma.async_copy_global_to_shared(b_desc, [off_n, k], bar, b_smem.index(s))
            it += 1


@gluon.jit
def _scales(sa_ptr, sb_ptr, sa_offs, rmask, sb_base, j, stride_saj, stride_sbj, BN: gl.constexpr,
            col_l: gl.constexpr, RB: gl.constexpr, SB_CVT: gl.constexpr):
    """Scale block ``j``'s row scales (this warpgroup's 64 rows) and column scale(s). For a 128-row weight block
    the row scales come back already multiplied by the block's scale. ``SB_CVT``: the 1-row column scales are
    loaded one per thread and moved into the accumulator's column layout through shared memory (instead of 32
    loads a thread)."""
    sa = gl.load(sa_ptr + (sa_offs + j * stride_saj), mask=rmask, other=0.0)
    if RB == 1:
        if SB_CVT:
            vec_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
            sb = gl.convert_layout(gl.load(sb_ptr + (sb_base + j * stride_sbj + gl.arange(0, BN, layout=vec_l))),
                                   col_l)
        else:
            sb = gl.load(sb_ptr + (sb_base + j * stride_sbj + gl.arange(0, BN, layout=col_l)))
    else:
        sb = gl.load(sb_ptr + (sb_base + j * stride_sbj))
        sa = sa * sb
    return sa, sb


@gluon.jit
def _promote(acc, p, sa, sb, RB: gl.constexpr, MAGIC: gl.constexpr):
    """``acc + p·sa·sb`` (``sa`` already times ``sb`` for a 128-row weight block)."""
    if RB == 1:
        return acc + _to_f32(p, MAGIC) * (gl.expand_dims(sa, 1) * gl.expand_dims(sb, 0))
    else:
        return acc + _to_f32(p, MAGIC) * gl.expand_dims(sa, 1)


@gluon.jit
def _issue(a_smem, b_smem, ready, it, regs, WG: gl.constexpr, STAGES: gl.constexpr, KP: gl.constexpr):
    """Wait for ring steps ``it … it + KP − 1`` (one scale block) and start their wgmmas, chained into a fresh
    int32 partial (asynchronous; the first with ``use_acc=False`` over the dead partial ``regs``)."""
    for sub in gl.static_range(KP):
        s = (it + sub) % STAGES
        mbarrier.wait(ready.index(s), ((it + sub) // STAGES) & 1)
        regs = warpgroup_mma(a_smem.index(2 * s + WG), b_smem.index(s).permute((1, 0)), regs, use_acc=sub > 0,
                             is_async=True)
    return regs


@gluon.jit
def _release(acc, p, it, j, sb, fv, a2_smem, b_smem, empty, sa2_ptr, sa2_offs, rmask, stride_sa2j,
             WG: gl.constexpr, RB: gl.constexpr, FALLBACK: gl.constexpr, MAGIC: gl.constexpr, STAGES: gl.constexpr,
             KP: gl.constexpr):
    """After scale block ``j`` (ring steps ``it … it + KP − 1``, partial ``p``) was promoted: its fallback term if
    the tile is flagged (``fv``, loaded before the block's wgmmas were issued; ``KP`` chained wgmmas of the A2
    tiles on the B tiles still in shared memory, into ``p``'s registers), then the stages go back to the producer.
    Returns the accumulator and the partial's registers."""
    if FALLBACK:
        if fv != 0:
            sa2 = gl.load(sa2_ptr + (sa2_offs + j * stride_sa2j), mask=rmask, other=0.0)
            if RB != 1:
                sa2 = sa2 * sb
            for sub in gl.static_range(KP):
                s = (it + sub) % STAGES
                p = warpgroup_mma(a2_smem.index(2 * s + WG), b_smem.index(s).permute((1, 0)), p, use_acc=sub > 0,
                                  is_async=True)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
            acc = _promote(acc, p, sa2, sb, RB, MAGIC)
    # every warp of this warpgroup is past its wgmma wait before the stages are handed back
    gl.thread_barrier()
    for sub in gl.static_range(KP):
        mbarrier.arrive(empty.index((it + sub) % STAGES), count=1)
    return acc, p


@gluon.jit
def _tile_store(c_desc, c_smem, value, off_m, off_n):
    tma.store_wait(pendings=0)          # the previous store has read c_smem
    gl.thread_barrier()
    c_smem.store(value)
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)


@gluon.jit
def _consumer(c_desc, a_smem, b_smem, a2_smem, c_smem, ready, empty, sa_ptr, sb_ptr, sa2_ptr, flags_ptr,
              bias_ptr, M, N, K, stride_sam, stride_saj, stride_sbn, stride_sbj, stride_sa2m, stride_sa2j, stride_fm,
              WG: gl.constexpr, RB: gl.constexpr, FALLBACK: gl.constexpr, HAS_BIAS: gl.constexpr,
              MAGIC: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, ORDER: gl.constexpr,
              KP: gl.constexpr, SB_CVT: gl.constexpr, SPLIT: gl.constexpr, turn):
    HM: gl.constexpr = c_desc.block_type.shape[0]
    BN: gl.constexpr = b_smem.type.shape[1]
    BM: gl.constexpr = 2 * HM
    BK: gl.constexpr = b_smem.type.shape[2]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    col_l: gl.constexpr = gl.SliceLayout(0, mma)

    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    nkb = gl.cdiv(K, BK * KP)                   # scale blocks, KP ring steps each
    p = gl.zeros([HM, BN], gl.int32, mma)        # the partial's registers, reused by every wgmma
    it = 0
    g = 0                                        # scale blocks done: the turn barriers' ring
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP)
        off_m = pid_m * BM + WG * HM
        off_n = pid_n * BN
        rows = off_m + gl.arange(0, HM, layout=row_l)
        rmask = rows < M
        # 32-bit offsets, not 64-bit pointers, held through the K loop
        sa_offs = rows * stride_sam
        sa2_offs = rows * stride_sa2m
        flag_row = pid_m * stride_fm
        if RB == 1:       # [nkb, N padded to BN]: contiguous per scale block, no mask (keeps pointers out of registers)
            sb_base = off_n
        else:
            sb_base = (off_n // RB) * stride_sbn
        acc = gl.zeros([HM, BN], gl.float32, mma)
        for j in range(nkb):
            sa, sb = _scales(sa_ptr, sb_ptr, sa_offs, rmask, sb_base, j, stride_saj, stride_sbj, BN, col_l, RB,
                             SB_CVT)
            if FALLBACK:      # the block's flag, read here so that the wgmma wait below hides the load's latency
                fv = gl.load(flags_ptr + (flag_row + j))
            else:
                fv = 0
            if ORDER == 1:
                if WG == 1:   # start this scale block's wgmmas once warpgroup 0's have finished (see ORDER)
                    mbarrier.wait(turn.index(g % STAGES), (g // STAGES) & 1)
            p = _issue(a_smem, b_smem, ready, it, p, WG, STAGES, KP)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
            if ORDER == 1:
                if WG == 0:
                    mbarrier.arrive(turn.index(g % STAGES), count=1)
            acc = _promote(acc, p, sa, sb, RB, MAGIC)
            acc, p = _release(acc, p, it, j, sb, fv, a2_smem, b_smem, empty, sa2_ptr, sa2_offs, rmask, stride_sa2j,
                              WG, RB, FALLBACK, MAGIC, STAGES, KP)
            it += KP
            g += 1

        cols = off_n + gl.arange(0, BN, layout=col_l)  # made here: 32 registers a thread not held through the K loop
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32), 0)
        if SPLIT == 2:         # two column halves through a half-size tile (deeper ring, see stages_for)
            lo, hi = gl.split(gl.permute(gl.reshape(acc.to(c_desc.dtype), [HM, 2, BN // 2]), [0, 2, 1]))
            _tile_store(c_desc, c_smem, lo, off_m, off_n)
            _tile_store(c_desc, c_smem, hi, off_m, off_n + BN // 2)
        else:
            _tile_store(c_desc, c_smem, acc.to(c_desc.dtype), off_m, off_n)
    tma.store_wait(pendings=0)


# no integer specialization (divisibility by 16, == 1): one compiled kernel per constexpr set, whatever the shape
_INT_ARGS = ["M", "N", "K", "stride_sam", "stride_saj", "stride_sbn", "stride_sbj", "stride_sa2m", "stride_sa2j",
             "stride_fm"]


@gluon.jit(do_not_specialize=_INT_ARGS)
def _block_gemm_ws_kernel(a_desc, b_desc, a2_desc, c_desc, sa_ptr, sb_ptr, sa2_ptr, flags_ptr, bias_ptr,
                          M, N, K, stride_sam, stride_saj, stride_sbn, stride_sbj, stride_sa2m, stride_sa2j, stride_fm,
                          RB: gl.constexpr, FALLBACK: gl.constexpr, HAS_BIAS: gl.constexpr,
                          MAGIC: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, ORDER: gl.constexpr,
                          KP: gl.constexpr, SB_CVT: gl.constexpr, SPLIT: gl.constexpr):
    HM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    BK: gl.constexpr = b_desc.block_type.shape[1]
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, HM, BK], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    if FALLBACK:
        a2_smem = gl.allocate_shared_memory(a2_desc.dtype, [2 * STAGES, HM, BK], a2_desc.layout)
    else:
        a2_smem = a_smem
    c0_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    c1_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)         # one arrival per consumer warpgroup
        mbarrier.init(turn.index(i), count=1)          # warpgroup 0's wgmmas of a scale block are done

    gl.warp_specialize([
        (_consumer, (c_desc, a_smem, b_smem, a2_smem, c0_smem, ready, empty, sa_ptr, sb_ptr, sa2_ptr,
                     flags_ptr, bias_ptr, M, N, K, stride_sam, stride_saj, stride_sbn, stride_sbj, stride_sa2m,
                     stride_sa2j, stride_fm, 0, RB, FALLBACK, HAS_BIAS, MAGIC, STAGES, GROUP, ORDER, KP,
                     SB_CVT, SPLIT, turn)),
        (_consumer, (c_desc, a_smem, b_smem, a2_smem, c1_smem, ready, empty, sa_ptr, sb_ptr, sa2_ptr,
                     flags_ptr, bias_ptr, M, N, K, stride_sam, stride_saj, stride_sbn, stride_sbj, stride_sa2m,
                     stride_sa2j, stride_fm, 1, RB, FALLBACK, HAS_BIAS, MAGIC, STAGES, GROUP, ORDER, KP,
                     SB_CVT, SPLIT, turn)),
        (_producer, (a_desc, b_desc, a2_desc, a_smem, b_smem, a2_smem, ready, empty, flags_ptr, stride_fm, M, N, K,
                     FALLBACK, STAGES, GROUP, KP)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------------- host side

def _is_hopper(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) == (9, 0)


def _aligned(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def supported(a: torch.Tensor, b: torch.Tensor, a_rows: int, b_rows: int, block_k: int,
              out_dtype: torch.dtype = torch.bfloat16, a2: torch.Tensor | None = None) -> bool:
    """Whether the Gluon kernel can run this call: a Hopper GPU (capability 9.0), ``a_rows`` 1, ``b_rows`` 1 or
    128, ``block_k`` in :data:`BLOCK_KS`, int8 operands contiguous along K with
    16-byte aligned rows (K % 16 == 0), an output whose rows are 16-byte aligned, and M, N, K > 0. False on CPU
    tensors."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.device.type != "cuda":
        return False
    if a.dim() != 2 or b.dim() != 2 or a.dtype != torch.int8 or b.dtype != torch.int8:
        return False
    if a_rows != 1 or b_rows not in (1, 128) or block_k not in BLOCK_KS or out_dtype not in _GL_OUT:
        return False
    (M, K), N = a.shape, b.shape[0]
    if M == 0 or N == 0 or K == 0 or b.shape[1] != K or (N * torch.empty((), dtype=out_dtype).element_size()) % 16:
        return False
    if not (_aligned(a) and _aligned(b) and _is_hopper(a)):
        return False
    return a2 is None or (a2.shape == a.shape and a2.dtype == torch.int8 and _aligned(a2))


@functools.lru_cache(maxsize=None)
def _layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.int8 if dtype == torch.int8 else _GL_OUT[dtype])


@functools.lru_cache(maxsize=None)
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def stages_for(out_dtype: torch.dtype, fallback: bool, split: int = 1) -> int:
    """Ring depth that fits shared memory next to the epilogue's tile (``1/split`` of the output tile when stored
    in ``split`` column pieces)."""
    stage = (2 if fallback else 1) * BLOCK_M * BLOCK_K + BLOCK_N * BLOCK_K
    epilogue = BLOCK_M * BLOCK_N * torch.empty((), dtype=out_dtype).element_size() // split
    return max(2, min(MAX_STAGES, (SMEM_BYTES - epilogue) // stage))


def split_store(out_dtype: torch.dtype, fallback: bool) -> int:
    """In how many column pieces the epilogue stores a tile (see :data:`SPLIT_FP32`)."""
    return 2 if SPLIT_FP32 and out_dtype == torch.float32 and fallback else 1


def _desc(t: torch.Tensor, block: tuple[int, int]) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(block), _layout(block, t.dtype))


def launch(a, b, a_scale, b_scale, b_rows, bias, out_dtype, a2=None, a2_scale=None, flags=None, *, block_k=BLOCK_K,
           magic=None, stages=None, grid_size=None, order=None, sb_cvt=None, group=None, split=None) -> torch.Tensor:
    """The kernel without argument checks (callers checked the contract and :func:`supported`), but for the one
    that costs nothing and turns a wrong ``block_k`` into an error instead of out-of-bounds scale reads.
    ``split``: store each tile in that many column pieces (default :func:`split_store`)."""
    (M, K), N = a.shape, b.shape[0]
    if a_scale.shape[-1] != -(-K // block_k) or (a2_scale is not None and a2_scale.shape[-1] != a_scale.shape[-1]):
        raise ValueError(f"block_k {block_k} needs {-(-K // block_k)} scale columns for K = {K}, got "
                         f"{a_scale.shape[-1]}" + ("" if a2_scale is None else f" and {a2_scale.shape[-1]}"))
    fallback = a2 is not None
    magic = MAGIC if magic is None else magic
    if magic and block_k != BLOCK_K:
        raise ValueError(f"the magic-number promotion is exact for 128-deep partials only, got block_k {block_k}")
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    a_desc = _desc(a, (HALF_M, BLOCK_K))
    b_desc = _desc(b, (BLOCK_N, BLOCK_K))
    a2_desc = _desc(a2, (HALF_M, BLOCK_K)) if fallback else a_desc
    split = split_store(out_dtype, fallback) if split is None else split
    c_desc = _desc(out, (HALF_M, BLOCK_N // split))
    if b_rows == 1:                       # [nkb, N padded to BLOCK_N]: one scale block's column scales contiguous
        n_pad = triton.cdiv(N, BLOCK_N) * BLOCK_N
        sb = b_scale.new_empty((b_scale.shape[1], n_pad))
        sb[:, :N].copy_(b_scale.t())
        if n_pad > N:
            sb[:, N:].zero_()
        sb_strides = (1, sb.stride(0))
    else:
        sb = b_scale
        sb_strides = (sb.stride(0), sb.stride(1))
    if fallback:
        fl = flags.view(torch.uint8) if flags.dtype == torch.bool else flags
        sa2, sa2_strides, fm = a2_scale, (a2_scale.stride(0), a2_scale.stride(1)), fl.stride(0)
    else:
        fl, sa2, sa2_strides, fm = a_scale, a_scale, (0, 0), 0
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    grid = (min(tiles, grid_size or _num_sms(a.device.index if a.device.index is not None else 0)),)
    kp = block_k // BLOCK_K
    n_stages = stages or stages_for(out_dtype, fallback, split)
    _block_gemm_ws_kernel[grid](
        a_desc, b_desc, a2_desc, c_desc, a_scale, sb, sa2, fl, bias if bias is not None else a_scale, M, N, K,
        a_scale.stride(0), a_scale.stride(1), *sb_strides, *sa2_strides, fm,
        RB=b_rows, FALLBACK=fallback, HAS_BIAS=bias is not None, MAGIC=magic,
        STAGES=max(n_stages, kp), GROUP=group or GROUP_M, KP=kp,
        ORDER=int(ORDER[b_rows] if order is None else order),
        SB_CVT=SB_CVT if sb_cvt is None else sb_cvt, SPLIT=split, num_warps=4, maxnreg=MAXNREG)
    return out


def _trivial(a, b, bias, out_dtype):
    """M, N or K zero: an empty output, or the bias broadcast (an empty sum is 0)."""
    (M, K), N = a.shape, b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M and N:
        out.copy_((bias.float() if bias is not None else torch.zeros(N, device=a.device)).expand(M, N))
    return out


def _unsupported(what, a, b, a_rows, b_rows, block_k, out_dtype):
    return ValueError(
        f"the Gluon block GEMM ({what}) needs a Hopper GPU (capability 9.0), a_rows 1, b_rows 1 or 128, block_k 128, "
        f"int8 operands contiguous along K with K % 16 == 0 and 16-byte aligned output rows; got a "
        f"{tuple(a.shape)} on {a.device}, b {tuple(b.shape)}, a_rows {a_rows}, b_rows {b_rows}, block_k {block_k}, "
        f"out {out_dtype} (use qtrain.kernels.block_gemm or the reference for other cases)")


def block_int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    a_rows: int, b_rows: int, block_k: int, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16, *, magic: bool | None = None,
                    stages: int | None = None) -> torch.Tensor:
    """:func:`qtrain.quant.block_gemm.block_int8_gemm` on the Gluon kernel (raises ValueError where
    :func:`supported` is False, other than empty shapes, which are answered on the host)."""
    check_block_gemm_args(a, b, a_scale, b_scale, a_rows, b_rows, block_k, bias, out_dtype)
    if 0 in (a.shape[0], a.shape[1], b.shape[0]):
        return _trivial(a, b, bias, out_dtype)
    if not supported(a, b, a_rows, b_rows, block_k, out_dtype):
        raise _unsupported("block_int8_gemm", a, b, a_rows, b_rows, block_k, out_dtype)
    return launch(a, b, a_scale.contiguous(), b_scale.contiguous(), b_rows,
                  bias.contiguous() if bias is not None else None, out_dtype, block_k=block_k, magic=magic,
                  stages=stages)


def fallback_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, a2: torch.Tensor, a2_scale: torch.Tensor,
                        flags: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_rows: int, block_k: int = 128,
                        bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                        magic: bool | None = None, stages: int | None = None) -> torch.Tensor:
    """Block-scaled GEMM with the fallback term: ``a2`` (residual quantization) is read only in tiles whose
    ``flags[m // 128, j]`` is set (its bytes elsewhere are unspecified); unflagged tiles cost one MMA."""
    check_fallback_gemm_args(a, a_scale, a2, a2_scale, flags, b, b_scale, b_rows, block_k, bias, out_dtype)
    if 0 in (a.shape[0], a.shape[1], b.shape[0]):
        return _trivial(a, b, bias, out_dtype)
    if not supported(a, b, 1, b_rows, block_k, out_dtype, a2=a2):
        raise _unsupported("fallback_block_gemm", a, b, 1, b_rows, block_k, out_dtype)
    return launch(a, b, a_scale.contiguous(), b_scale.contiguous(), b_rows,
                  bias.contiguous() if bias is not None else None, out_dtype, a2, a2_scale.contiguous(),
                  flags.contiguous(), block_k=block_k, magic=magic, stages=stages)
