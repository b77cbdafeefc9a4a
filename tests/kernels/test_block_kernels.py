"""Block-wise quantize and block-scaled INT8 GEMM kernels vs their reference twins (CPU: Triton's interpreter).

Quantizer: bit-exact data and scales on ragged shapes, a distinct scale per block, NaN/±Inf/zero blocks,
transposed inputs. GEMM: DESIGN.md's gates (fp32 within 1e-5, 16-bit within one rounding plus the fp32
accumulation's own noise over the K blocks).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import ops, quant  # noqa: E402
from qtrain.kernels import block_gemm as kbg  # noqa: E402
from qtrain.kernels import blockwise as kbw  # noqa: E402

from .helpers import FLOATS, assert_one_rounding, assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BLOCKS = [(1, 128), (128, 128), (32, 32), (4, 64), (1, 32)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("blk", BLOCKS, ids=str)
@pytest.mark.parametrize("shape", [(37, 200), (300, 72), (130, 257), (1, 1)], ids=str)
def test_blockwise_bit_exact(shape, blk, dtype):
    x = rows_with_distinct_scales(*shape, dtype, DEV)
    if shape[0] > 3:
        x[1, 5], x[2, -1], x[3] = float("nan"), float("inf"), 0.0      # NaN, Inf and an all-zero row
    for name, got, ref in zip(("q", "scale"), kbw.quantize_blockwise(x, *blk), quant.quantize_blockwise(x, *blk)):
        assert_same(got, ref, f"{name} {blk}")


def test_blockwise_transposed_input_and_errors():
    x = rows_with_distinct_scales(96, 300, torch.bfloat16, DEV)
    for got, ref in zip(kbw.quantize_blockwise(x.t(), 128, 32), quant.quantize_blockwise(x.t(), 128, 32)):
        assert_same(got, ref, "x.t() in 128×32 blocks")
    q, s = kbw.quantize_blockwise(torch.empty(0, 8, device=DEV), 1, 128)
    assert q.shape == (0, 8) and s.shape == (0, 1)
    with pytest.raises(ValueError, match="power-of-two"):
        kbw.quantize_blockwise(x, 3, 128)
    with pytest.raises(ValueError, match="c ≤ 1024"):
        kbw.quantize_blockwise(x, 1, 2048)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kbw.quantize_blockwise(x.to(torch.int32), 1, 128)


def _gemm_case(m, n, k, ra, rb, c, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=g) * torch.logspace(1, -1, k)[None, :]
    qa, sa = quant.quantize_blockwise(x, ra, c)
    qb, sb = quant.quantize_blockwise(w, rb, c)
    bb = torch.randn(n, generator=g) if bias else None
    return [t if t is None else t.to(DEV) for t in (qa, qb, sa, sb, bb)]


@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("ra,rb,c", [(1, 128, 128), (32, 32, 32), (1, 1, 64), (128, 128, 256)], ids=str)
@pytest.mark.parametrize("mnk,bias", [((37, 72, 200), True), ((130, 200, 300), False), ((5, 3, 40), True)],
                         ids=str)
def test_block_gemm_gates(mnk, bias, ra, rb, c, out_dtype):
    qa, qb, sa, sb, bb = _gemm_case(*mnk, ra, rb, c, bias)
    out = kbg.block_int8_gemm(qa, qb, sa, sb, ra, rb, c, bb, out_dtype)
    ref32 = quant.block_int8_gemm(qa, qb, sa, sb, ra, rb, c, bb, torch.float32)
    assert out.shape == ref32.shape and out.dtype == out_dtype
    if out_dtype == torch.float32:
        assert quant.relative_error(ref32, out) <= 1e-5
    else:
        ea = qa.float().abs() * sa.repeat_interleave(ra, 0)[: qa.shape[0]].repeat_interleave(c, 1)[:, : qa.shape[1]]
        eb = qb.float().abs() * sb.repeat_interleave(rb, 0)[: qb.shape[0]].repeat_interleave(c, 1)[:, : qb.shape[1]]
        magnitude = ea @ eb.t() + (bb.abs() if bb is not None else 0)
        n_blocks = -(-qa.shape[1] // c)
        assert_one_rounding(out, ref32, magnitude * max(1.0, n_blocks / 8))


def test_block_gemm_non_contiguous_nan_and_errors():
    qa, qb, sa, sb, _ = _gemm_case(64, 48, 256, 1, 128, 128, False)
    sa[7, 1] = float("nan")
    out = kbg.block_int8_gemm(qa.t().contiguous().t(), qb, sa, sb, 1, 128, 128, None, torch.float32)
    ref = quant.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, None, torch.float32)
    assert torch.isnan(out[7]).all() and not torch.isnan(out[:7]).any()
    keep = torch.arange(64, device=DEV) != 7
    assert quant.relative_error(ref[keep], out[keep]) <= 1e-5
    with pytest.raises(ValueError, match="block_k in"):
        kbg.block_int8_gemm(qa, qb, torch.ones(64, 16, device=DEV), torch.ones(1, 16, device=DEV), 1, 128, 16)
    with pytest.raises(ValueError, match="b_scale must be fp32"):
        kbg.block_int8_gemm(qa, qb, sa, sb[:, :1], 1, 128, 128)


def test_ops_dispatch_block_primitives():
    x = rows_with_distinct_scales(40, 256, torch.float32, DEV)
    w = rows_with_distinct_scales(24, 256, torch.float32, DEV, seed=1)
    res = {}
    for backend in ("triton", "reference"):
        with ops.use_backend(backend):
            qa, sa = ops.quantize_blockwise(x, 1, 128)
            qb, sb = ops.quantize_blockwise(w, 128, 128)
            res[backend] = (qa, sa, qb, sb, ops.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, None, torch.float32))
    for i in range(4):
        assert_same(res["triton"][i], res["reference"][i], "quantized operands")
    assert quant.relative_error(res["reference"][4], res["triton"][4]) <= 1e-5
