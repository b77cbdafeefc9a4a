"""Gluon block-scaled INT8 GEMM (qtrain/kernels/block_gemm_gluon.py) vs the reference twins.

GPU (`pytest -m gpu`, Hopper): DESIGN.md's gates — fp32 output within 1e-5 relative, 16-bit within one rounding
plus the fp32 accumulation's own noise — on ragged M/N/K, bias, NaN scales, both weight blockings (128×128 and
1×128), the persistent tile loop (a grid smaller than the tile count, a short ring), and the fallback term at
0 %, 5 % and 100 % flagged tiles (unflagged residual bytes and scales poisoned: they must never be read).
CPU: the module imports and declines every call.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import quant  # noqa: E402
from qtrain.kernels import block_gemm as kbg  # noqa: E402
from qtrain.kernels import fallback as kfb  # noqa: E402
from qtrain.quant import fallback as qfb  # noqa: E402

from .helpers import FLOATS, assert_one_rounding  # noqa: E402

glu = pytest.importorskip("qtrain.kernels.block_gemm_gluon")

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon block GEMM needs a Hopper GPU (capability 9.0)")


def test_declines_cpu_and_unsupported_blockings():
    a = torch.zeros(64, 256, dtype=torch.int8)
    b = torch.zeros(32, 256, dtype=torch.int8)
    assert not glu.supported(a, b, 1, 128, 128)
    with pytest.raises(ValueError, match="Hopper"):
        glu.block_int8_gemm(a, b, torch.ones(64, 2), torch.ones(1, 2), 1, 128, 128)
    with pytest.raises(ValueError, match="a_scale must be fp32"):
        glu.block_int8_gemm(a, b, torch.ones(64, 3), torch.ones(1, 2), 1, 128, 128)
    # empty shapes are answered on the host: the bias broadcast, or nothing
    bias = torch.randn(32)
    out = glu.block_int8_gemm(a[:, :0], b[:, :0], torch.ones(64, 0), torch.ones(1, 0), 1, 128, 128, bias,
                              torch.float32)
    assert torch.equal(out, bias.expand(64, 32))


def _operands(m, n, k, rb, bias, seed=0, device="cuda", bk=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=g) * torch.logspace(1, -1, k)[None, :]
    qa, sa = quant.quantize_blockwise(x, 1, bk)
    qb, sb = quant.quantize_blockwise(w, rb, bk)
    bb = torch.randn(n, generator=g) if bias else None
    return x, [t if t is None else t.to(device) for t in (qa, qb, sa, sb, bb)]


def _expand(q, s, rows, bk=128):
    M, K = q.shape
    return q.float().abs() * s.repeat_interleave(rows, 0)[:M].repeat_interleave(bk, 1)[:, :K]


def _check(out, ref32, out_dtype, magnitude, nk):
    assert out.shape == ref32.shape and out.dtype == out_dtype
    if out_dtype == torch.float32:
        keep = ~torch.isnan(ref32).any(1)
        assert torch.equal(torch.isnan(out), torch.isnan(ref32))
        assert quant.relative_error(ref32[keep], out[keep]) <= 1e-5
    else:
        assert_one_rounding(out, ref32, magnitude * max(1.0, nk / 8))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("rb", [128, 1])
@pytest.mark.parametrize("bk", [128, 256])
@pytest.mark.parametrize("mkn,bias", [((37, 208, 72), True), ((300, 640, 200), False), ((1000, 1008, 1040), True),
                                      ((130, 128, 264), True), ((4096, 2048, 384), False), ((260, 400, 136), True)],
                         ids=str)
def test_block_gemm_gates(mkn, bias, bk, rb, out_dtype):
    """K ragged against both the 128-deep ring steps and the 256-wide scale blocks (400: a last scale block with
    one real step and one TMA-zero-filled)."""
    M, K, N = mkn
    _, (qa, qb, sa, sb, bb) = _operands(M, N, K, rb, bias, bk=bk)
    out = glu.block_int8_gemm(qa, qb, sa, sb, 1, rb, bk, bb, out_dtype)
    ref32 = quant.block_int8_gemm(qa, qb, sa, sb, 1, rb, bk, bb, torch.float32)
    magnitude = _expand(qa, sa, 1, bk) @ _expand(qb, sb, rb, bk).t() + (bb.abs() if bb is not None else 0)
    _check(out, ref32, out_dtype, magnitude, -(-K // 128))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("rb", [128, 1])
def test_block_gemm_7b_shape_and_persistent_loop(rb):
    """16384×4096×4096 (31 tiles per program), then a 3-program grid and a 2-stage ring on a ragged shape."""
    M, K, N = 16384, 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randint(-127, 128, (M, K), generator=g, device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)
    sa = torch.rand(M, K // 128, generator=g, device="cuda") * 1e-3 + 1e-4
    sb = torch.rand(-(-N // rb), K // 128, generator=g, device="cuda") * 1e-3 + 1e-4
    bias = torch.randn(N, generator=g, device="cuda")
    ref = quant.block_int8_gemm(a, b, sa, sb, 1, rb, 128, bias, torch.float32)
    assert quant.relative_error(ref, glu.block_int8_gemm(a, b, sa, sb, 1, rb, 128, bias, torch.float32)) <= 1e-5
    assert quant.relative_error(ref, glu.block_int8_gemm(a, b, sa, sb, 1, rb, 128, bias).float()) <= 4e-3
    m, k, n = 1000, 1152, 648
    a, b, sa, sb = a[:m, :k], b[:n, :k].contiguous(), sa[:m, :k // 128].contiguous(), sb[:, :k // 128]
    sb = sb[:-(-n // rb)].contiguous()
    ref = quant.block_int8_gemm(a, b, sa, sb, 1, rb, 128, None, torch.float32)
    for grid_size, stages, order, magic, sb_cvt in ((3, 2, 1, True, True), (5, 3, 0, True, False),
                                                    (1, 4, 1, True, True), (7, None, 0, False, True),
                                                    (4, None, 1, False, False), (2, 2, 0, True, False),
                                                    (6, 2, 1, True, True)):
        out = glu.launch(a, b, sa, sb, rb, None, torch.float32, stages=stages, grid_size=grid_size, order=order,
                         magic=magic, sb_cvt=sb_cvt)
        assert quant.relative_error(ref, out) <= 1e-5, (grid_size, stages, order, magic, sb_cvt)
    sa2, sb2 = sa[:, ::2].contiguous() * 2, sb[:, ::2].contiguous() * 3            # 256-wide scale blocks
    ref = quant.block_int8_gemm(a, b, sa2, sb2, 1, rb, 256, None, torch.float32)
    for grid_size, stages, order, sb_cvt in ((3, 2, 1, True), (5, 3, 0, False), (1, 5, 1, False), (7, None, 1, True)):
        out = glu.launch(a, b, sa2, sb2, rb, None, torch.float32, block_k=256, stages=stages, grid_size=grid_size,
                         order=order, sb_cvt=sb_cvt)
        assert quant.relative_error(ref, out) <= 1e-5, (grid_size, stages, order, sb_cvt)
    with pytest.raises(ValueError, match="magic"):
        glu.launch(a, b, sa2, sb2, rb, None, torch.float32, block_k=256, magic=True)


@pytest.mark.gpu
@needs_hopper
def test_triton_block_gemm_routes_to_gluon_on_hopper():
    """qtrain.kernels.block_gemm sends supported calls above the size threshold to this kernel (same bits),
    and everything else to the Triton kernel."""
    from qtrain.kernels import block_gemm as kbg

    M, K, N = 8192, 4096, 4096                                       # 2·M·N·K = 2³⁸, above the threshold
    _, (qa, qb, sa, sb, bb) = _operands(M, N, K, 128, True)
    assert torch.equal(kbg.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, bb, torch.bfloat16),
                       glu.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, bb, torch.bfloat16))
    small = kbg.block_int8_gemm(qa[:64], qb[:128], sa[:64], sb[:1], 1, 128, 128, None, torch.float32)
    ref = quant.block_int8_gemm(qa[:64], qb[:128], sa[:64], sb[:1], 1, 128, 128, None, torch.float32)
    assert quant.relative_error(ref, small) <= 1e-5


@pytest.mark.gpu
@needs_hopper
def test_block_gemm_nan_scales_non_contiguous_and_errors():
    _, (qa, qb, sa, sb, _) = _operands(200, 136, 512, 128, False)
    sa[7, 1] = float("nan")
    sb[1, 2] = float("nan")                          # columns 128..135 of K block 2
    out = glu.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, None, torch.float32)
    ref = quant.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, None, torch.float32)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[7]).all() and torch.isnan(out[:, 128:]).all() and not torch.isnan(out[8:, :128]).any()
    fin = ~torch.isnan(ref)
    assert quant.relative_error(ref[fin], out[fin]) <= 1e-5
    # a row-strided A (a view into a wider buffer) goes straight to TMA
    wide = torch.zeros(200, 640, dtype=torch.int8, device="cuda")
    wide[:, :512] = qa
    sa[7, 1], sb[1, 2] = 1e-3, 2e-3
    ref = quant.block_int8_gemm(qa, qb, sa, sb, 1, 128, 128, None, torch.float32)
    assert quant.relative_error(ref, glu.block_int8_gemm(wide[:, :512], qb, sa, sb, 1, 128, 128, None,
                                                         torch.float32)) <= 1e-5
    for args in ((qa, qb, sa, sb, 32, 128, 128), (qa, qb, sa, sb[:, :2], 1, 128, 256)):
        with pytest.raises(ValueError):
            glu.block_int8_gemm(*args)
    assert not glu.supported(qa[:, :200].contiguous(), qb[:, :200].contiguous(), 1, 128, 128)  # rows not 16-B
    out = glu.block_int8_gemm(qa[:, :200], qb[:, :200], sa[:, :2].contiguous(), sb[:, :2].contiguous(), 1, 128,
                              128, None, torch.float32)             # K = 200 in 512-byte rows: TMA takes it
    ref = quant.block_int8_gemm(qa[:, :200], qb[:, :200], sa[:, :2], sb[:, :2], 1, 128, 128, None, torch.float32)
    assert quant.relative_error(ref, out) <= 1e-5


def _fallback_case(m, n, k, rb, ratio, bias, seed=0, bk=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[torch.rand(m, k, generator=g) < 0.002] *= 300.0                       # scattered outliers
    x = x.cuda()
    tmax = qfb.tile_absmax(x, bk)
    if ratio == 0:
        tau = torch.tensor([float("inf")], device="cuda")
    elif ratio == 1:
        tau = torch.tensor([-1.0], device="cuda")
    else:
        tau = torch.quantile(tmax.flatten(), 1 - ratio).reshape(1)
    q, s, q2, s2, flags, _ = qfb.quantize_fallback(x, tau, bk)
    w = torch.randn(n, k, generator=g).cuda()
    qb, sb = quant.quantize_blockwise(w, rb, bk)
    bb = torch.randn(n, generator=g).cuda() if bias else None
    return q, s, q2, s2, flags, qb, sb, bb


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rb", [128, 1])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("mkn", [(1000, 1152, 520), (4096, 4096, 1024)], ids=str)
def test_fallback_gemm(mkn, ratio, rb, out_dtype):
    M, K, N = mkn
    q, s, q2, s2, flags, qb, sb, bb = _fallback_case(M, N, K, rb, ratio, bias=True)
    ref32 = qfb.fallback_block_gemm(q, s, q2, s2, flags, qb, sb, rb, 128, bb, torch.float32)
    rows = qfb.expand_tiles(flags, M)                                        # [M, nk]
    cols = rows.repeat_interleave(128, 1)[:, :K]
    assert 0.5 * ratio <= flags.float().mean().item() <= max(1.5 * ratio, 0.0)
    # unflagged residual bytes and scales are garbage: the kernel must skip those tiles entirely
    q2 = torch.where(cols, q2, torch.randint_like(q2, -127, 128))
    s2 = torch.where(rows, s2, torch.full_like(s2, float("nan")))
    for fl in (flags, flags.to(torch.uint8)):
        out = glu.fallback_block_gemm(q, s, q2, s2, fl, qb, sb, rb, 128, bb, out_dtype)
        magnitude = (_expand(q, s, 1) + _expand(torch.where(cols, q2, 0), torch.nan_to_num(s2), 1)) \
            @ _expand(qb, sb, rb).t() + bb.abs()
        _check(out, ref32, out_dtype, magnitude, -(-K // 128))
    if ratio == 0.0:                      # no flagged tile: the plain block GEMM, bit for bit
        assert torch.equal(out, glu.block_int8_gemm(q, qb, s, sb, 1, rb, 128, bb, out_dtype))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("rb", [128, 1])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("mkn", [(1000, 1152, 520), (4096, 4096, 1024), (300, 400, 136)], ids=str)
def test_fallback_gemm_wide_scale_blocks(mkn, ratio, rb, monkeypatch):
    """The fallback term over 256-wide scale blocks (two chained 128-deep A2 steps per flagged block), through
    ``launch`` at each pipeline depth, the Gluon module's ``fallback_block_gemm`` and the public one (routed to Gluon:
    size gate off);
    poisoned unflagged residuals as above; fp32 output within 1e-5 of the reference."""
    M, K, N = mkn
    q, s, q2, s2, flags, qb, sb, bb = _fallback_case(M, N, K, rb, ratio, bias=True, bk=256)
    ref32 = qfb.fallback_block_gemm(q, s, q2, s2, flags, qb, sb, rb, 256, bb, torch.float32)
    cols = qfb.expand_tiles(flags, M).repeat_interleave(256, 1)[:, :K]
    q2 = torch.where(cols, q2, torch.randint_like(q2, -127, 128))
    s2 = torch.where(qfb.expand_tiles(flags, M), s2, torch.full_like(s2, float("nan")))
    for stages in (None, 2, 3):
        out = glu.launch(q, qb, s, sb, rb, bb, torch.float32, q2, s2, flags, block_k=256, stages=stages)
        assert quant.relative_error(ref32, out) <= 1e-5, stages
    assert glu.supported(q, qb, 1, rb, 256, torch.float32, a2=q2)
    out = glu.fallback_block_gemm(q, s, q2, s2, flags, qb, sb, rb, 256, bb, torch.float32)   # hands block_k on
    assert quant.relative_error(ref32, out) <= 1e-5
    monkeypatch.setattr(kbg, "GLUON_MIN_OPS", 0)
    out = kfb.fallback_block_gemm(q, s, q2, s2, flags, qb, sb, rb, 256, bb, torch.float32)
    assert quant.relative_error(ref32, out) <= 1e-5


@pytest.mark.gpu
@needs_hopper
def test_fallback_gemm_errors():
    q, s, q2, s2, flags, qb, sb, _ = _fallback_case(256, 128, 256, 128, 0.05, bias=False)
    with pytest.raises(ValueError, match="flags"):
        glu.fallback_block_gemm(q, s, q2, s2, flags[:1], qb, sb, 128)
    with pytest.raises(ValueError, match="residual"):
        glu.fallback_block_gemm(q, s, q2[:, :128], s2, flags, qb, sb, 128)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("bk", [128, 256])
@pytest.mark.parametrize("rb", [128, 1])
@pytest.mark.parametrize("mkn", [(1000, 1152, 520), (300, 4096, 136)], ids=str)
def test_split_store(mkn, rb, bk):
    """fp32 output stored in two column halves (``split=2``, half the epilogue tile, one more ring stage): the
    same bits as the whole-tile epilogue, with and without the fallback term, on ragged M and N edges."""
    M, K, N = mkn
    q, s, q2, s2, flags, qb, sb, bb = _fallback_case(M, N, K, rb, 0.05, bias=True, bk=bk)
    for fb in ((), (q2, s2, flags)):
        want = glu.launch(q, qb, s, sb, rb, bb, torch.float32, *fb, block_k=bk, split=1)
        out = glu.launch(q, qb, s, sb, rb, bb, torch.float32, *fb, block_k=bk, split=2)
        assert torch.equal(out, want), (len(fb), (out - want).abs().max().item())
