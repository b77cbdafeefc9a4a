"""Triton kernels vs their PyTorch reference twins (CPU: Triton's interpreter; GPU: compiled).

Quantizers must match bit for bit (data and scales); the INT8 GEMM must meet DESIGN.md's gates.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import quant  # noqa: E402
from qtrain.kernels import int8_gemm as kgemm  # noqa: E402
from qtrain.kernels import rowwise as krow  # noqa: E402
from qtrain.kernels import tensorwise as ktens  # noqa: E402

from .helpers import FLOATS, assert_one_rounding, assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(37, 200), (300, 72), (5, 3), (256, 256), (1, 1)]


def _poisoned(x: torch.Tensor) -> torch.Tensor:
    """Zero row 0; NaN in row 1, +Inf in row 2, -Inf in row 3 (where those rows exist)."""
    x = x.clone()
    specials = [0.0, float("nan"), float("inf"), -float("inf")]
    for r, v in enumerate(specials[: x.shape[0]]):
        if r == 0:
            x[0] = 0
        else:
            x[r, r % x.shape[1]] = v
    return x


# ------------------------------------------------------------------------------------------------- row-wise
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rowwise_bit_exact(shape, dtype):
    x = _poisoned(rows_with_distinct_scales(*shape, dtype, DEV))
    q, s = krow.quantize_rowwise(x)
    q_ref, s_ref = quant.quantize_rowwise(x)
    assert_same(q, q_ref, "q")
    assert_same(s, s_ref, "scale")
    assert q.is_contiguous()


def test_rowwise_non_contiguous():
    x = rows_with_distinct_scales(96, 300, torch.bfloat16, DEV).t()       # [300, 96], strides (1, 300)
    for got, ref in zip(krow.quantize_rowwise(x), quant.quantize_rowwise(x)):
        assert_same(got, ref, "transposed input")


@pytest.mark.parametrize("config", [krow.LaunchConfig(2, 512, True, 4),      # one masked tile
                                    krow.LaunchConfig(4, 64, False, 4)],    # two passes over 64-wide chunks
                         ids=["one-tile", "two-pass"])
def test_rowwise_tilings(config):
    x = _poisoned(rows_with_distinct_scales(20, 300, torch.float16, DEV))
    x[4, 290] = float("nan")                                                # specials near the row end
    x[5, 299] = -float("inf")
    x[6, 270] = 1e4
    for got, ref in zip(krow.quantize_rowwise(x, config), quant.quantize_rowwise(x)):
        assert_same(got, ref, str(config))


def test_rowwise_launch_config():
    assert krow.launch_config(16384, 4096)[1:3] == (4096, True)
    assert krow.launch_config(16384, 5504)[1:3] == (2048, False)
    assert krow.launch_config(16384, 11008)[1:3] == (4096, False)
    assert krow.launch_config(16384, 28672)[1:3] == (8192, False)
    for M, K in ((16384, 768), (7, 3000), (3, 9000)):
        c = krow.launch_config(M, K)
        assert c.block_m & (c.block_m - 1) == 0 and c.block_k & (c.block_k - 1) == 0, c
    with pytest.raises(ValueError, match="does not cover"):
        krow.quantize_rowwise(torch.ones(2, 300, device=DEV), krow.LaunchConfig(1, 256, True, 4))


def test_rowwise_empty_and_errors():
    q, s = krow.quantize_rowwise(torch.empty(4, 0, device=DEV))
    assert q.shape == (4, 0) and torch.equal(s, torch.ones(4, device=DEV))
    assert krow.quantize_rowwise(torch.empty(0, 8, device=DEV))[1].shape == (0,)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        krow.quantize_rowwise(torch.ones(2, 2, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="2-D"):
        krow.quantize_rowwise(torch.ones(2, 2, 2, device=DEV))


# ---------------------------------------------------------------------------------------------- tensor-wise
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensorwise_bit_exact(shape, dtype):
    w = rows_with_distinct_scales(*shape, dtype, DEV, seed=1)
    got, ref = ktens.quantize_tensorwise(w), quant.quantize_tensorwise(w)
    for name, g, r in zip(("q", "qt", "scale"), got, ref):
        assert_same(g, r, name)
    assert got[1].is_contiguous() and torch.equal(got[1], got[0].t())


@pytest.mark.parametrize("special", [0.0, float("nan"), float("inf"), -float("inf")])
def test_tensorwise_special_values(special):
    w = rows_with_distinct_scales(37, 200, torch.bfloat16, DEV, seed=2)
    if special == 0.0:
        w.zero_()
    else:
        w[11, 17] = special
    for name, g, r in zip(("q", "qt", "scale"), ktens.quantize_tensorwise(w), quant.quantize_tensorwise(w)):
        assert_same(g, r, name)


def test_tensorwise_non_contiguous_and_errors():
    w = rows_with_distinct_scales(200, 37, torch.float32, DEV).t()
    for name, g, r in zip(("q", "qt", "scale"), ktens.quantize_tensorwise(w), quant.quantize_tensorwise(w)):
        assert_same(g, r, name)
    q, qt, s = ktens.quantize_tensorwise(torch.empty(0, 5, device=DEV))
    assert q.shape == (0, 5) and qt.shape == (5, 0) and s.item() == 1.0
    with pytest.raises(TypeError):
        ktens.quantize_tensorwise(torch.ones(3, 3, dtype=torch.int8, device=DEV))


# ------------------------------------------------------------------------------------------------ INT8 GEMM
def _gemm_inputs(m, n, k, b_row, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sa = torch.logspace(-4, -2, m) * (1 + torch.rand(m, generator=g))            # a distinct scale per row
    sb = (torch.rand(n, generator=g) + 0.5) * 1e-2 if b_row else torch.tensor(3e-3)
    bb = torch.randn(n, generator=g) if bias else None
    mv = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return mv(a), mv(b), mv(sa), mv(sb), mv(bb)


GEMM_SHAPES = [(37, 200, 72), (300, 72, 200), (5, 7, 3), (256, 256, 256), (64, 48, 1000)]


@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("b_row,bias", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
def test_int8_gemm_gates(mnk, b_row, bias, out_dtype):
    a, b, sa, sb, bb = _gemm_inputs(*mnk, b_row, bias)
    out = kgemm.int8_gemm(a, b, sa, sb, bb, out_dtype)
    ref32 = quant.int8_gemm(a, b, sa, sb, bb, torch.float32)
    assert out.shape == ref32.shape and out.dtype == out_dtype
    if out_dtype == torch.float32:
        assert quant.relative_error(ref32, out) <= 1e-5
    else:
        assert_one_rounding(out, ref32)


def test_int8_gemm_non_contiguous_nan_and_bias_dtype():
    a, b, sa, sb, bb = _gemm_inputs(100, 60, 130, True, True)
    a_nc = a.t().contiguous().t()                                                 # [M, K] with strides (1, M)
    sa[7] = float("nan")
    bias16 = bb.to(torch.bfloat16)
    out = kgemm.int8_gemm(a_nc, b, sa, sb, bias16, torch.float32)
    ref = quant.int8_gemm(a, b, sa, sb, bias16, torch.float32)
    assert torch.isnan(out[7]).all() and not torch.isnan(out[:7]).any()
    keep = torch.arange(100, device=DEV) != 7
    assert quant.relative_error(ref[keep], out[keep]) <= 1e-5


def test_int8_gemm_errors():
    a, b, sa, sb, _ = _gemm_inputs(8, 8, 8, False, False)
    with pytest.raises(TypeError, match="int8"):
        kgemm.int8_gemm(a.float(), b, sa, sb, None, torch.float32)
    with pytest.raises(ValueError, match="a_scale"):
        kgemm.int8_gemm(a, b, sa[:3], sb, None, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        kgemm.int8_gemm(a, b, sa, sb, None, torch.int32)


@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("b_row,bias", [(False, False), (True, True), (True, False), (False, True)])
def test_int8_gemm_k0_applies_the_scales(b_row, bias, out_dtype):
    """K = 0: out = 0·a_scale·b_scale (+ bias), like the reference: a NaN or ±Inf scale gives NaN, not the bias."""
    from qtrain import ops

    a, b = torch.empty(4, 0, dtype=torch.int8, device=DEV), torch.empty(3, 0, dtype=torch.int8, device=DEV)
    sa = torch.tensor([2.0, float("nan"), float("inf"), 0.5], device=DEV)
    sb = torch.tensor([1.0, -float("inf"), 3.0], device=DEV) if b_row else torch.tensor(0.25, device=DEV)
    bb = torch.tensor([1.5, -2.0, 0.1], device=DEV) if bias else None
    ref = quant.int8_gemm(a, b, sa, sb, bb, out_dtype)
    nan = torch.zeros(4, 3, dtype=torch.bool)
    nan[1:3] = True                                                              # NaN / Inf row scales
    if b_row:
        nan[:, 1] = True                                                         # an Inf column scale
    assert torch.equal(torch.isnan(ref).cpu(), nan)
    expect = (bb.float() if bias else torch.zeros(3, device=DEV)).expand(4, 3).to(out_dtype)
    assert torch.equal(ref[~nan.to(DEV)], expect[~nan.to(DEV)])
    assert_same(kgemm.int8_gemm(a, b, sa, sb, bb, out_dtype), ref, "kernel, K = 0")
    for backend in ("triton", "reference"):
        with ops.use_backend(backend):
            assert_same(ops.int8_gemm(a, b, sa, sb, bb, out_dtype), ref, f"ops ({backend}), K = 0")


def test_int8_gluon_gemm_declines_gpus_other_than_hopper(monkeypatch):
    """wgmma/TMA are sm_90 instructions: on an A100 (8.0) or a Blackwell (10.0) the Triton kernel runs instead."""
    glu = pytest.importorskip("qtrain.kernels.int8_gemm_gluon")

    class FakeCuda:                  # a TMA-aligned CUDA operand, as far as supported() looks
        def __init__(self, m, k):
            self.shape, self.device = (m, k), torch.device("cuda", 0)

        def dim(self):
            return 2

        def stride(self, i):
            return (self.shape[1], 1)[i]

        def data_ptr(self):
            return 1 << 20

    a, b = FakeCuda(8192, 4096), FakeCuda(4096, 4096)
    for cap, expected in (((8, 0), False), ((10, 0), False), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert glu.supported(a, b, torch.bfloat16) is expected, cap
