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
@pytest.mark.parametrize("shape", [(70, 200), (33, 96), (40, 256)], ids=str)     # SwiGLU's up half on block
def test_activation_kernels_match_reference(shape, blk):                          # boundaries or not
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


def _exact_vjp(kind, hq, hs, gq, gs, blk):
    """fp64 autograd of the activation on the dequantized inputs."""
    h = rdf.dequantize_blocks(hq, hs, *blk).double().requires_grad_()
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    else:
        y = torch.nn.functional.gelu(h, approximate="tanh")
    return torch.autograd.grad(y, h, rdf.dequantize_blocks(gq, gs, *blk).double())[0]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blk", [(32, 32), (1, 128), (4, 64)], ids=str)
@pytest.mark.parametrize("shape", [(70, 200), (33, 96), (40, 256)], ids=str)
def test_activation_backward_kernels_match_reference(shape, blk, out_dtype):
    """INT8 h and INT8 gradient in, dh out: fp32 — kernel and twin within 1e-5 of max |dh|, both within 1e-5 of
    fp64 autograd (saturated codes included: |h| in the thousands); bf16 — each element within half a bf16 ulp of
    the exact value, plus the same 1e-5 of max |dh|."""
    for kind, width in (("gelu", shape[1]), ("swiglu", 2 * shape[1])):
        hq, hs = _int8_blocks(shape[0], width, *blk)
        hq[3, 5] = 127
        gq, gs = _int8_blocks(shape[0], shape[1], *blk, seed=2)
        got = getattr(kdf, f"{kind}_backward")(hq, hs, gq, gs, *blk, out_dtype)
        ref = getattr(rdf, f"{kind}_backward")(hq, hs, gq, gs, *blk, out_dtype)
        exact = _exact_vjp(kind, hq, hs, gq, gs, blk)
        assert got.dtype == ref.dtype == out_dtype and got.shape == ref.shape == hq.shape
        top = exact.abs().max().item()
        for what, t in (("kernel", got), ("reference", ref)):
            if out_dtype == torch.float32:
                err = (t.double() - exact).abs().max().item()
                assert err <= 1e-5 * top, (kind, what, err / top)
            else:                                   # one rounding to bf16: half an ulp, ≤ 2⁻⁸ relative
                err = (t.double() - exact).abs()
                assert (err <= 2.0 ** -8 * exact.abs() + 1e-5 * top).all(), (kind, what)
    with pytest.raises(ValueError, match="out_dtype must be torch.float32 or torch.bfloat16"):
        kdf.gelu_backward(hq, hs, hq, hs, *blk, torch.float16)


def test_activation_backward_errors_and_dispatch():
    hq, hs = _int8_blocks(40, 128, 32, 32)
    gq, gs = _int8_blocks(40, 64, 32, 32, seed=2)
    with pytest.raises(ValueError, match=r"swiglu_backward wants \[M, 2F\]"):
        rdf.swiglu_backward(hq, hs, hq, hs, 32, 32)
    with pytest.raises(ValueError, match="h scales must be fp32"):
        kdf.swiglu_backward(hq, hs, gq, gs, 1, 32)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            got = ops.swiglu_backward(hq, hs, gq, gs, 32, 32)
            assert torch.allclose(got, rdf.swiglu_backward(hq, hs, gq, gs, 32, 32), rtol=0, atol=1e-5 * got.abs().max())

    def f(hq, hs, gq, gs):
        return ops.swiglu_backward(hq, hs, gq, gs, 32, 32), ops.swiglu_backward(hq, hs, gq, gs, 32, 32, torch.bfloat16)

    with ops.use_backend("reference"):
        compiled, eager = torch.compile(f, backend="aot_eager", fullgraph=True)(hq, hs, gq, gs), f(hq, hs, gq, gs)
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager)) and compiled[1].dtype == torch.bfloat16


def _exact_norm_vjp(kind, xq, xs, w, b, gq, gs, blk):
    """fp64 autograd of the norm on the dequantized inputs: (dx, dw[, db])."""
    x = rdf.dequantize_blocks(xq, xs, *blk).double().requires_grad_()
    wd = w.double().requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    if kind == "rms":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * wd
    else:
        y = torch.nn.functional.layer_norm(x, (x.shape[1],), wd, bd, 1e-5)
    leaves = [x, wd] + ([bd] if bd is not None else [])
    return torch.autograd.grad(y, leaves, rdf.dequantize_blocks(gq, gs, *blk).double())


@pytest.mark.parametrize("row_elems", [kdf.NORM_BWD_ROW_ELEMS, 0], ids=["whole rows", "three passes"])
@pytest.mark.parametrize("blk", [(32, 32), (1, 128), (4, 64)], ids=str)
@pytest.mark.parametrize("shape", [(70, 200), (33, 96), (40, 1000)], ids=str)
def test_norm_backward_kernels_match_reference(shape, blk, row_elems, monkeypatch):
    """INT8 x and INT8 gradient in, fp32 (dx, dw, db) out: kernel and twin each within 1e-5 of fp64 autograd
    (relative to the largest magnitude of each output) — the whole-row kernel (several row groups a program for
    1000 features) and the three-pass one that wider rows take."""
    monkeypatch.setattr(kdf, "NORM_BWD_ROW_ELEMS", row_elems)
    xq, xs = _int8_blocks(*shape, *blk)
    gq, gs = _int8_blocks(*shape, *blk, seed=2)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape[1], generator=g) + 1).to(DEV)
    b = torch.randn(shape[1], generator=g).to(DEV)
    cases = [("rms", None, kdf.rmsnorm_backward(xq, xs, w, gq, gs, 1e-5, *blk),
              rdf.rmsnorm_backward(xq, xs, w, gq, gs, 1e-5, *blk))]
    for bias in (b, None):
        cases.append(("ln", bias, kdf.layernorm_backward(xq, xs, w, bias, gq, gs, 1e-5, *blk),
                      rdf.layernorm_backward(xq, xs, w, bias, gq, gs, 1e-5, *blk)))
    for kind, bias, got, ref in cases:
        exact = _exact_norm_vjp(kind, xq, xs, w, bias, gq, gs, blk)
        if kind == "ln":
            assert (got[2] is None) == (ref[2] is None) == (bias is None)
        for i, e in enumerate(exact):
            top = e.abs().max().item()
            for what, t in (("kernel", got[i]), ("reference", ref[i])):
                assert t.dtype == torch.float32 and t.shape == e.shape, (kind, what, i)
                assert (t.double() - e).abs().max().item() <= 1e-5 * top, (kind, what, i)


def test_norm_backward_dispatch_and_compile():
    xq, xs = _int8_blocks(40, 64, 32, 32)
    gq, gs = _int8_blocks(40, 64, 32, 32, seed=2)
    w = torch.ones(64, device=DEV)
    with pytest.raises(ValueError, match="one shape"):
        rdf.rmsnorm_backward(xq, xs, w, gq[:, :32], gs[:, :1], 1e-5, 32, 32)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            dx, dw, db = ops.layernorm_backward(xq, xs, w, None, gq, gs, 1e-5, 32, 32)
            ref = rdf.layernorm_backward(xq, xs, w, None, gq, gs, 1e-5, 32, 32)
            assert db is None and torch.allclose(dx, ref[0], rtol=0, atol=1e-5 * ref[0].abs().max())

    def f(xq, xs, w, gq, gs):
        return ops.rmsnorm_backward(xq, xs, w, gq, gs, 1e-5, 32, 32), ops.layernorm_backward(
            xq, xs, w, None, gq, gs, 1e-5, 32, 32)

    with ops.use_backend("reference"):
        got, want = torch.compile(f, backend="aot_eager", fullgraph=True)(xq, xs, w, gq, gs), f(xq, xs, w, gq, gs)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert torch.equal(got[1][0], want[1][0]) and got[1][2] is None
