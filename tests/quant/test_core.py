"""Reference quantizer properties (METHODS.md § Notation)."""
import math

import pytest
import torch

from qtrain import quant
from qtrain.quant.core import absmax, quantize
from qtrain.recipes import COLUMN, ROW, TENSOR, block

GRANS = [TENSOR, ROW, COLUMN, block(4, 8), block(32, 32), block(1, 128)]


@pytest.mark.parametrize("g", GRANS, ids=str)
@pytest.mark.parametrize("fmt,qmax", [("int8", 127), ("int4", 7)])
def test_range_and_scale_shape(g, fmt, qmax):
    x = torch.randn(37, 200) * torch.logspace(-3, 3, 37)[:, None]
    q, s = quantize(x, g, fmt)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert int(q.abs().max()) == qmax  # the absmax element of every group maps to ±qmax
    assert q.abs().max() <= qmax
    expected = {"tensor": (), "row": (37,), "column": (200,)}.get(g.kind)
    if g.kind == "block":
        expected = (math.ceil(37 / g.block[0]), math.ceil(200 / g.block[1]))
    assert tuple(s.shape) == expected
    err = (quant.dequantize(q, s, g) - x).abs()
    assert (err <= quant.expand_scale(s, g, x.shape) / 2 * (1 + 1e-6)).all()  # RTN: within half a step


def test_rtn_hand_computed():
    x = torch.tensor([[1.27, -0.635, 0.005, 0.015, 0.0]])
    q, s = quantize(x, ROW)
    assert s.item() == pytest.approx(0.01)
    # 0.635/0.01 = 63.5 → 64 (half to even), 0.5 → 0, 1.5 → 2
    assert q.tolist() == [[127, -64, 0, 2, 0]]
    assert torch.equal(quantize(torch.tensor([[2.5, 127.0]]), TENSOR)[0], torch.tensor([[2, 127]], dtype=torch.int8))


def test_distinct_block_scales():
    x = torch.arange(1, 65, dtype=torch.float32).reshape(8, 8)
    _, s = quantize(x, block(4, 4))
    assert s.flatten().unique().numel() == 4
    assert s[1, 1].item() == pytest.approx(64 / 127)


def test_zero_block_gets_unit_scale():
    x = torch.zeros(4, 8)
    x[2:, 4:] = 3.0
    q, s = quantize(x, block(2, 4))
    assert s[0, 0].item() == 1.0 and s[0, 1].item() == 1.0 and s[1, 0].item() == 1.0
    assert (q[:2] == 0).all()
    assert quant.dequantize(q, s, block(2, 4)).equal(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_propagates(bad):
    x = torch.randn(4, 16)
    x[1, 3] = bad
    q, s = quantize(x, ROW)
    assert not math.isfinite(s[1].item()) and torch.isfinite(s[[0, 2, 3]]).all()
    deq = quant.dequantize(q, s, ROW)
    assert not torch.isfinite(deq[1]).all() and torch.isfinite(deq[[0, 2, 3]]).all()
    assert torch.isnan(absmax(x, TENSOR)) or torch.isinf(absmax(x, TENSOR))


def test_stochastic_rounding_unbiased_and_within_one_step():
    x = torch.randn(16, 64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([quant.fake_quantize(x, ROW, "int8", "stochastic", g) for _ in range(2000)])
    _, s = quantize(x, ROW)
    step = s[:, None].expand_as(x)
    assert ((draws - x).abs() <= step * (1 + 1e-6)).all()
    # mean error per element shrinks like step/sqrt(n): bound at 5 standard errors (Bernoulli var ≤ 1/4)
    assert ((draws.mean(0) - x).abs() <= 5 * step * 0.5 / math.sqrt(2000)).all()
    # RTN is biased on the same data: the SR mean is much closer than RTN on average
    rtn_bias = (quant.fake_quantize(x, ROW) - x).abs().mean()
    assert (draws.mean(0) - x).abs().mean() < rtn_bias / 4


def test_stochastic_rounding_is_reproducible_and_needs_generator():
    x = torch.randn(8, 32)
    a = quant.fake_quantize(x, TENSOR, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = quant.fake_quantize(x, TENSOR, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        quant.fake_quantize(x, TENSOR, rounding="stochastic")


def test_int4_packing_round_trip():
    q = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    p = quant.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 4)
    assert torch.equal(quant.unpack_int4(p, 7), q)


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize(torch.ones(2, 2, dtype=torch.int32), ROW)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 2, 2), ROW)
    with pytest.raises(ValueError, match="int8, int4"):
        quantize(torch.ones(2, 2), ROW, fmt="int2")


def test_sqnr():
    x = torch.randn(100)
    assert quant.sqnr(x, x) == math.inf
    assert quant.sqnr(x, x * 1.01) == pytest.approx(40.0, abs=1e-3)
