"""Fallback quantize and mixed GEMM kernels vs their reference twins (CPU: Triton's interpreter).

Quantizer: bit-exact codes, scales, flags and tile absmax (residual codes compared on flagged tiles, where the
contract defines them) on ragged shapes, transposed input, unset/fixed τ, NaN/Inf. GEMM: DESIGN.md's gates.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain.kernels import fallback as kfb  # noqa: E402
from qtrain.quant import fallback as rfb  # noqa: E402
from qtrain.quant import quantize_blockwise  # noqa: E402
from qtrain.quant.testing import outlier_data  # noqa: E402

from .helpers import FLOATS, assert_one_rounding, assert_same  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _check_quantizer(x, tau, c=128, config=None):
    got = kfb.quantize_fallback(x, tau, c, config=config)
    ref = rfb.quantize_fallback(x, tau, c)
    for name, g, r in zip(("q", "scale", "q2", "scale2", "flags", "tile_absmax"), got, ref):
        if name == "q2":
            m = rfb.expand_tiles(ref[4], x.shape[0]).repeat_interleave(c, 1)[:, :x.shape[1]]
            g, r = g[m], r[m]
        assert_same(g, r, name)
    return got


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(300, 260), (129, 128), (5, 33)], ids=str)
@pytest.mark.parametrize("tau", [-1.0, 20.0, 1e9])
def test_quantize_fallback_bit_exact(shape, dtype, tau):
    x = outlier_data(*shape, magnitude=100.0, pattern="scattered", seed=4, dtype=dtype, device=DEV)
    _check_quantizer(x, torch.tensor(tau, device=DEV))


def test_quantize_fallback_transposed_nan_inf_and_block_64():
    x = outlier_data(260, 200, magnitude=100.0, seed=5, device=DEV)
    _check_quantizer(x.t(), torch.tensor(20.0, device=DEV))
    x[3, 7], x[200, 150] = float("nan"), float("inf")
    _check_quantizer(x, torch.tensor(20.0, device=DEV))
    _check_quantizer(x, torch.tensor(20.0, device=DEV), c=64)
    q, s, q2, s2, flags, tmax = kfb.quantize_fallback(torch.empty(0, 8, device=DEV), torch.tensor(1.0, device=DEV))
    assert q.shape == (0, 8) and flags.shape == (0, 1)


@pytest.mark.parametrize("config", [(32, 4), (8, 2), (128, 4)], ids=str)
def test_quantize_fallback_row_chunks(config):
    """The GPU tiling (a tile in chunks of ``TM`` rows; the interpreter's default is one chunk): NaN/Inf in a
    later chunk, a ragged last tile, a transposed view, fixed and unset τ."""
    x = outlier_data(300, 260, magnitude=100.0, pattern="scattered", seed=6, device=DEV)
    x[70, 3], x[299, 259] = float("nan"), float("inf")
    for tau in (-1.0, 20.0, 1e9):
        _check_quantizer(x, torch.tensor(tau, device=DEV), config=config)
    _check_quantizer(x.t(), torch.tensor(20.0, device=DEV), c=64, config=config)
    with pytest.raises(ValueError, match="chunk rows 48"):
        kfb.quantize_fallback(x, torch.tensor(1.0, device=DEV), config=(48, 4))


@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("tau", [-1.0, 30.0, 1e9])
@pytest.mark.parametrize("b_rows", [128, 1])
def test_fallback_gemm_gates(tau, out_dtype, b_rows):
    x = outlier_data(300, 384, magnitude=60.0, seed=6, device=DEV)
    w = torch.randn(136, 384, device=DEV)
    bias = torch.randn(136, device=DEV)
    a = rfb.quantize_fallback(x, torch.tensor(tau, device=DEV))
    qw, sw = quantize_blockwise(w, b_rows, 128)
    out = kfb.fallback_block_gemm(*a[:5], qw, sw, b_rows, 128, bias, out_dtype)
    ref32 = rfb.fallback_block_gemm(*a[:5], qw, sw, b_rows, 128, bias, torch.float32)
    if out_dtype == torch.float32:
        assert ((out - ref32).norm() / ref32.norm()).item() <= 1e-5
    else:
        # the fp32 accumulation's own noise scales with the partial products, not the (cancelling) sum
        q, sc, q2, sc2, flags = a[:5]
        partials = rfb.fallback_block_gemm(q.abs(), sc, q2.abs(), sc2.abs(), flags, qw.abs(), sw, b_rows, 128,
                                           None, torch.float32)
        assert_one_rounding(out, ref32, partials + bias.abs())


def test_fallback_gemm_never_reads_unflagged_residual():
    x = outlier_data(256, 256, magnitude=60.0, seed=7, device=DEV, pattern="token", n_outlier_channels=1)
    q, s, q2, s2, flags, _ = kfb.quantize_fallback(x, torch.tensor(30.0, device=DEV))
    assert 0 < flags.sum() < flags.numel()
    qw, sw = quantize_blockwise(torch.randn(64, 256, device=DEV), 128, 128)
    mask = rfb.expand_tiles(flags, 256).repeat_interleave(128, 1)
    garbage = torch.where(mask, q2, torch.full_like(q2, -128))
    a = kfb.fallback_block_gemm(q, s, q2, s2, flags, qw, sw, 128, 128, None, torch.float32)
    b = kfb.fallback_block_gemm(q, s, garbage, s2, flags, qw, sw, 128, 128, None, torch.float32)
    assert torch.equal(a, b)


def test_ops_dispatch_fallback():
    from qtrain import ops
    x = outlier_data(130, 256, magnitude=60.0, device=DEV)
    tau = torch.tensor(30.0, device=DEV)
    qw, sw = quantize_blockwise(torch.randn(64, 256, device=DEV), 128, 128)
    outs = []
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            a = ops.quantize_fallback(x, tau)
            outs.append(ops.fallback_block_gemm(*a[:5], qw, sw, 128, 128, None, torch.float32))
    assert ((outs[0] - outs[1]).norm() / outs[0].norm()).item() <= 1e-5


@pytest.mark.parametrize("block_k", [128, 256])
def test_fallback_gemm_hands_block_k_to_gluon(block_k, monkeypatch):
    """Where the Gluon kernel takes the call, it gets the call's ``block_k`` (256-wide scale blocks once went in as
    128: out-of-bounds scale reads on the GPU). Dispatch only: Gluon's admission and launch are stand-ins."""
    from qtrain.kernels import block_gemm as kbg
    glu = pytest.importorskip("qtrain.kernels.block_gemm_gluon")
    seen = {}
    monkeypatch.setattr(kbg, "use_gluon", lambda *args: True)
    monkeypatch.setattr(glu, "supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(glu, "launch", lambda *args, **kwargs: seen.update(kwargs) or "gluon")
    x = outlier_data(130, 512, magnitude=60.0, device=DEV)
    q, s, q2, s2, flags, _ = rfb.quantize_fallback(x, torch.tensor(30.0, device=DEV), block_k)
    qw, sw = quantize_blockwise(torch.randn(64, 512, device=DEV), 128, block_k)
    assert kfb.fallback_block_gemm(q, s, q2, s2, flags, qw, sw, 128, block_k) == "gluon"
    assert seen["block_k"] == block_k


def test_gluon_launch_refuses_scales_of_another_block_k():
    glu = pytest.importorskip("qtrain.kernels.block_gemm_gluon")
    a, b = torch.zeros(128, 512, dtype=torch.int8), torch.zeros(128, 512, dtype=torch.int8)
    with pytest.raises(ValueError, match="block_k 128 needs 4 scale columns for K = 512, got 2"):
        glu.launch(a, b, torch.ones(128, 2), torch.ones(1, 2), 128, None, torch.bfloat16, block_k=128)


SR_IMPLS = {"reference": rfb.quantize_fallback_sr, "kernel": kfb.quantize_fallback_sr}


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("impl", SR_IMPLS)
def test_quantize_fallback_sr_unbiased_with_the_residual_of_its_own_codes(impl, transposed):
    """SR first term (DESIGN.md's SR gate): scales, flags and tile absmax bit for bit the RTN quantizer's, every
    code within one step of x / scale, the mean over draws back at x / scale; on flagged tiles the residual term
    is, bit for bit, the RTN residual of the codes drawn (so x is reconstructed to ~15 bits there)."""
    x = outlier_data(260, 200, magnitude=100.0, pattern="scattered", seed=8, device=DEV)
    if transposed:
        x = x.t().contiguous().t()
    tau = torch.tensor(20.0, device=DEV)
    c = 128
    rtn = rfb.quantize_fallback(x, tau, c)
    rows = rfb.expand_tiles(rtn[4], x.shape[0]).repeat_interleave(c, 1)[:, :x.shape[1]]
    assert rows.any() and not rows.all()
    step = rtn[1].repeat_interleave(c, 1)[:, :x.shape[1]]
    v = x.float() / step
    n, acc = 16, torch.zeros_like(v, dtype=torch.float64)
    for i in range(n):
        q, s, q2, s2, flags, tmax = SR_IMPLS[impl](x, tau, c, torch.tensor([500 + i], device=DEV))
        for name, g, r in (("scale", s, rtn[1]), ("flags", flags, rtn[4]), ("tile_absmax", tmax, rtn[5])):
            assert_same(g, r, name)
        assert ((q.float() - v).abs() < 1).all(), "a code is more than one step from x / scale"
        want_q2, want_s2 = quantize_blockwise(x.float() - q.float() * step, 1, c)
        assert_same(q2[rows], want_q2[rows], "residual codes")
        tile_rows = rfb.expand_tiles(flags, x.shape[0])
        assert_same(s2, torch.where(tile_rows, want_s2, torch.zeros_like(want_s2)), "residual scales")
        acc += q.double()
    mean = acc / n
    assert ((mean - v).abs() <= 6 * 0.5 / n ** 0.5 + 1e-6).all()
    assert abs((mean - v).mean().item()) < 0.02
    a, b, other = (SR_IMPLS[impl](x, tau, c, torch.tensor([seed], device=DEV))[0] for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, other)


@pytest.mark.parametrize("config", [(32, 4)], ids=str)
def test_quantize_fallback_sr_row_chunks_redraw_the_same_uniforms(config):
    """The GPU tiling (chunks of ``TM`` rows, two passes on a flagged tile): the second pass's residual is that of
    the codes the first pass stored; unset τ flags every tile."""
    x = outlier_data(300, 260, magnitude=100.0, pattern="scattered", seed=9, device=DEV)
    for tau in (-1.0, 20.0):
        q, s, q2, s2, flags, tmax = kfb.quantize_fallback_sr(x, torch.tensor(tau, device=DEV), 128,
                                                             torch.tensor([11], device=DEV), config=config)
        rows = rfb.expand_tiles(flags, x.shape[0]).repeat_interleave(128, 1)[:, :x.shape[1]]
        want_q2, _ = quantize_blockwise(x.float() - q.float() * s.repeat_interleave(128, 1)[:, :x.shape[1]], 1, 128)
        assert rows.any() and torch.equal(q2[rows], want_q2[rows])
    with pytest.raises(ValueError, match="seed"):
        kfb.quantize_fallback_sr(x, torch.tensor(1.0, device=DEV), 128, torch.tensor([0.5]))
