"""Scaled INT8 GEMM kernel (twin of :mod:`qtrain.quant.int8_gemm`).

``int8_gemm(a [M, K] int8, b [N, K] int8, a_scale [M] fp32, b_scale [] or [N] fp32, bias [N] | None,
out_dtype) -> [M, N] out_dtype``::

    out = float32(Σ_k a[m, k]·b[n, k]) · a_scale[m] · b_scale[n] (+ float32(bias[n]))

Large GEMMs whose operands suit TMA run the Gluon twin (:mod:`qtrain.kernels.int8_gemm_gluon`: asynchronous
wgmma, ~1.2× faster on Hopper); everything else runs the Triton kernel here:
int32 accumulation on the tensor cores (``tl.dot``), the dequantizing epilogue fused, grouped tile order
(GROUP_M row tiles share each column tile while it sits in L2). On the GPU, when K and N rows are 16-byte
aligned, operands are loaded and the output stored through TMA descriptors; otherwise through masked
pointers (also for small GEMMs, where the descriptors' host cost would show). Operands not contiguous along K
are copied to contiguous first (a deliberate, counted cost).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import TL_OUT, check_device, grouped_tile, interpreting, round_to_bf16
from qtrain.quant.int8_gemm import check_int8_gemm_args

TMA_ENABLED = True   # benchmarks switch it off to compare the masked-pointer path
# Host-side TMA descriptors cost ~140 µs of CPU per call (measured, H100 machine): worth it only when the GEMM
# runs long enough to hide that (2·M·N·K ≥ 2.7e11 ops: ~0.27 ms at 1000 TOP/s); smaller GEMMs use pointers.
TMA_MIN_MNK = 1 << 37
# Large TMA-aligned GEMMs go to the Gluon kernel (async wgmma; 1.2× this Triton kernel on the H100), if it imports.
GLUON_ENABLED = True


def _gluon():
    """The Gluon twin's module, or None where Gluon is unavailable (older Triton, the interpreter)."""
    if not GLUON_ENABLED or interpreting():
        return None
    try:
        from qtrain.kernels import int8_gemm_gluon
    except ImportError:
        return None
    return int8_gemm_gluon


def _set_block_shapes(nargs):
    """Config pre-hook: TMA descriptors take their block shape from the config being run."""
    if not nargs["USE_TMA"]:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a"].block_shape = [bm, bk]
    nargs["b"].block_shape = [bn, bk]
    nargs["out"].block_shape = [bm, bn]


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages, pre_hook=_set_block_shapes)


def _configs() -> list[triton.Config]:
    if interpreting():
        return [_cfg(128, 128, 128, 4, 1)]
    return [_cfg(256, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(128, 128, 128, 8, 4),
            _cfg(64, 128, 128, 4, 4)]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (keeps small GEMMs from idling most of the chip)."""
    M, N = named_args["M"], named_args["N"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(M))
            and c.kwargs["BLOCK_N"] <= max(128, triton.next_power_of_2(N))]
    return kept or configs[-1:]


# Tuned per power-of-two bucket of M (not per M): generation and ragged batches would otherwise re-tune at
# every new token count.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "USE_TMA", "B_ROW", "HAS_BIAS", "OUT_DTYPE"],
                 prune_configs_by={"early_config_prune": _prune} if not interpreting() else None)
@triton.jit
def _int8_gemm_kernel(a, b, out, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_bn, stride_om,
                      USE_TMA: tl.constexpr, B_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if USE_TMA:
        for k0 in range(0, K, BLOCK_K):
            at = a.load([off_m, k0])
            bt = b.load([off_n, k0])
            acc = tl.dot(at, bt.T, acc, out_dtype=tl.int32)
    else:
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
        b_ptrs = b + rn[:, None].to(tl.int64) * stride_bn + rk[None, :]
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + rk)[None, :] < K
            at = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask, other=0)
            bt = tl.load(b_ptrs, mask=(rn[:, None] < N) & kmask, other=0)
            acc = tl.dot(at, bt.T, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    sa = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
    if B_ROW:
        sb = tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        sb = tl.load(b_scale_ptr)
    res = acc.to(tl.float32) * sa[:, None] * sb
    if HAS_BIAS:
        res = res + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if OUT_DTYPE == tl.bfloat16:
        res = round_to_bf16(res)
    res = res.to(OUT_DTYPE)
    if USE_TMA:
        out.store([off_m, off_n], res)
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], res, mask=mask)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA wants 16-byte aligned bases and row strides (and, here, a real GPU)."""
    if interpreting() or not TMA_ENABLED:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    check_int8_gemm_args(a, b, a_scale, b_scale, bias, out_dtype)
    check_device(a)
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:   # an empty sum, still scaled like the reference: a NaN/Inf scale gives NaN, not the bias
        res = torch.zeros((M, N), device=a.device) * a_scale[:, None] * b_scale
        return out.copy_(res + bias.float() if bias is not None else res)
    if a.stride(1) != 1:
        a = a.contiguous()
    if b.stride(1) != 1:
        b = b.contiguous()
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    use_tma = M * N * K >= TMA_MIN_MNK and _tma_ok(a, b, out)
    glu = _gluon() if use_tma else None
    if glu is not None and glu.supported(a, b, out_dtype):
        return glu.launch(a, b, a_scale, b_scale, bias, out_dtype, out=out)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        dummy = [16, 16]
        a_arg = TensorDescriptor.from_tensor(a, dummy)
        b_arg = TensorDescriptor.from_tensor(b, dummy)
        out_arg = TensorDescriptor.from_tensor(out, dummy)
    else:
        a_arg, b_arg, out_arg = a, b, out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _int8_gemm_kernel[grid](
        a_arg, b_arg, out_arg, a_scale, b_scale, bias if bias is not None else a_scale, M, N, K,
        triton.next_power_of_2(M), a.stride(0), b.stride(0), out.stride(0),
        USE_TMA=use_tma, B_ROW=b_scale.dim() == 1, HAS_BIAS=bias is not None, OUT_DTYPE=TL_OUT[out_dtype])
    return out
