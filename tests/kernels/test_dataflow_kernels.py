"""INT8 data-flow kernels (norm + quantize, activation + quantize) vs their reference twins (CPU: Triton's
interpreter). Contract (qtrain.quant.dataflow): scales within fp32 rounding (relative 1e-5), codes within one
step, and all but a few codes equal (the row reductions and transcendental functions round differently)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import ops, quant  # noqa: E402
from qtrain.kernels import dataflow as kdf  # noqa: E402
from qtrain.quant import dataflow as rdf  # noqa: E402

from .helpers import rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _int8_blocks(m, k, r, c, seed=0):
    x = rows_with_distinct_scales(m, k, torch.float32, DEV, seed)
    x = x + x.abs().mean(1, keepdim=True)                                      # a mean for LayerNorm to remove
    x[0] = 0.0                                                                 # an all-zero row
    return quant.quantize_blockwise(x, r, c)


def _assert_twins(got, ref, what):
    (kq, ks), (rq, rs) = got, ref
    assert kq.dtype == torch.int8 and kq.shape == rq.shape and ks.shape == rs.shape, what
    assert ((ks - rs).abs() <= 1e-5 * rs.abs()).all(), (what, ((ks - rs).abs() / rs).max())
    diff = (kq.int() - rq.int()).abs()
    assert diff.max() <= 1 and diff.sum() <= max(2, rq.numel() // 1000), (what, diff.sum().item())


@pytest.mark.parametrize("blk", [(32, 32), (1, 128), (4, 64)], ids=str)
@pytest.mark.parametrize("shape", [(70, 200), (33, 96)], ids=str)
def test_norm_kernels_match_reference(shape, blk):
    xq, xs = _int8_blocks(*shape, *blk)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape[1], generator=g) + 1).to(DEV, torch.bfloat16)
    b = torch.randn(shape[1], generator=g).to(DEV)
    _assert_twins(kdf.rmsnorm_quantize(xq, xs, w, 1e-5, *blk), rdf.rmsnorm_quantize(xq, xs, w, 1e-5, *blk), "rms")
    for bias in (b, None):
        _assert_twins(kdf.layernorm_quantize(xq, xs, w, bias, 1e-5, *blk),
                      rdf.layernorm_quantize(xq, xs, w, bias, 1e-5, *blk), "ln")


@pytest.mark.parametrize("blk", [(32, 32), (1, 128), (4, 64)], ids=str)
@pytest.mark.parametrize("shape", [(70, 200), (33, 96)], ids=str)
def test_activation_kernels_match_reference(shape, blk):
    hq, hs = _int8_blocks(*shape, *blk)
    hq[3, 5] = 127                                   # saturated codes: |h| in the thousands, exp must not overflow
    _assert_twins(kdf.gelu_quantize(hq, hs, *blk), rdf.gelu_quantize(hq, hs, *blk), "gelu")
    _assert_twins(kdf.swiglu_quantize(hq, hs, *blk), rdf.swiglu_quantize(hq, hs, *blk), "swiglu")
    aq, a_s = rdf.swiglu_quantize(hq, hs, *blk)
    assert aq.shape == (shape[0], shape[1] // 2) and a_s.shape == (-(-shape[0] // blk[0]), -(-shape[1] // 2 // blk[1]))


def test_dataflow_errors_and_dispatch():
    xq, xs = _int8_blocks(40, 64, 32, 32)
    w = torch.ones(64, device=DEV)
    with pytest.raises(ValueError, match="scales must be fp32"):
        rdf.rmsnorm_quantize(xq, xs, w, 1e-5, 1, 32)
    with pytest.raises(TypeError, match="int8"):
        kdf.gelu_quantize(xq.float(), xs, 32, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        kdf.gelu_quantize(*quant.quantize_blockwise(xq.float(), 3, 32), 3, 32)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            _assert_twins(ops.rmsnorm_quantize(xq, xs, w, 1e-5, 32, 32), rdf.rmsnorm_quantize(xq, xs, w, 1e-5, 32, 32),
                          backend)
            _assert_twins(ops.layernorm_quantize(xq, xs, w, None, 1e-5, 32, 32),
                          rdf.layernorm_quantize(xq, xs, w, None, 1e-5, 32, 32), backend)
            _assert_twins(ops.swiglu_quantize(xq, xs, 32, 32), rdf.swiglu_quantize(xq, xs, 32, 32), backend)
            _assert_twins(ops.gelu_quantize(xq, xs, 32, 32), rdf.gelu_quantize(xq, xs, 32, 32), backend)


def test_dataflow_ops_under_compile():
    xq, xs = _int8_blocks(40, 64, 32, 32)
    w = torch.ones(64, device=DEV)

    def f(xq, xs, w):
        yq, ys = ops.rmsnorm_quantize(xq, xs, w, 1e-5, 32, 32)
        return ops.gelu_quantize(yq, ys, 32, 32)

    with ops.use_backend("reference"):
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(xq, xs, w)
        ref = f(xq, xs, w)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
