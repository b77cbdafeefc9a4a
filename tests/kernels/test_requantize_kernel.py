"""Re-blocking saved INT8 codes for the weight gradient: ``requantize_blockwise_t`` (kernel) against its twin —
bit for bit, which is also ``quantize_blockwise(dequantize(q)ᵀ)`` — for the 1×128 → tokens case of jetfire_wide,
32×32, ragged shapes, a NaN block scale; bad input refused."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import ops, quant  # noqa: E402
from qtrain.kernels.blockwise import requantize_blockwise_t  # noqa: E402
from qtrain.recipes import block  # noqa: E402

from .helpers import assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape,blk_in,blk", [((256, 384), (1, 128), (1, 128)), ((200, 300), (1, 128), (1, 128)),
                                              ((96, 64), (32, 32), (32, 32)), ((130, 100), (1, 64), (4, 32)),
                                              ((300, 512), (1, 256), (128, 256))],          # jetfire_wide's Xᵀ
                         ids=str)
def test_matches_twin(shape, blk_in, blk):
    x = rows_with_distinct_scales(*shape, torch.float32, DEV)
    q, s = quant.quantize_blockwise(x, *blk_in)
    if shape == (200, 300):
        s[1, 0] = float("nan")                                  # a poisoned block: NaN reaches its new blocks
    got = requantize_blockwise_t(q, s, *blk_in, *blk)
    want = quant.requantize_blockwise_t(q, s, *blk_in, *blk)
    assert_same(got[0], want[0], "codes")
    assert_same(got[1], want[1], "scales")
    deq = q.float() * quant.expand_scale(s, block(*blk_in), shape)
    ref = quant.quantize_blockwise(deq.t(), *blk)
    assert_same(want[0], ref[0], "twin vs dequantize-then-quantize")


def test_bad_input_and_compile():
    q = torch.zeros(64, 128, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="scale must be fp32 \\[64, 1\\]"):
        requantize_blockwise_t(q, torch.ones(64, 2, device=DEV), 1, 128, 1, 128)
    with pytest.raises(TypeError, match="int8"):
        quant.requantize_blockwise_t(q.float(), torch.ones(64, 1), 1, 128, 1, 128)
    s = torch.rand(64, 1, device=DEV) + 0.5
    q = torch.randint(-127, 128, (64, 128), dtype=torch.int8, device=DEV)
    f = torch.compile(lambda a, b: ops.requantize_blockwise_t(a, b, 1, 128, 1, 64), backend="aot_eager",
                      fullgraph=True)
    got, want = f(q, s), quant.requantize_blockwise_t(q, s, 1, 128, 1, 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("shape,tm", [((256, 384), 16), ((200, 300), 32), ((130, 100), 8)], ids=str)
def test_tiles_inside_one_scale_row_match_twin(shape, tm):
    """The GPU's tiling (tiles of fewer rows than a scale block: the scales loaded once per column) — the
    interpreter's default tiles are larger, so this sets the tile; a NaN and an Inf block scale in ragged
    shapes."""
    from qtrain.kernels.blockwise import _launch

    x = rows_with_distinct_scales(*shape, torch.float32, DEV)
    q, s = quant.quantize_blockwise(x, 1, 64)
    s[1, 0], s[-1, -1] = float("nan"), float("inf")
    got = _launch(q.t(), 1, 128, None, (s.t(), 64, 1), config=(tm, 4))
    want = quant.requantize_blockwise_t(q, s, 1, 64, 1, 128)
    assert_same(got[0], want[0], "codes")
    assert_same(got[1], want[1], "scales")
