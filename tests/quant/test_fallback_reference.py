"""Fallback quantization reference (qtrain.quant.fallback): the two-term representation, tile selection on the
three outlier patterns, the threshold controller, the mixed GEMM's contract, bad input."""
from __future__ import annotations

import pytest
import torch

from qtrain.quant import fallback as fb
from qtrain.quant import quantize_blockwise, relative_error
from qtrain.quant.testing import PATTERNS, outlier_data, outlier_tiles
from qtrain.recipes import Fallback


def _dequant(q, s, c=128):
    return q.float() * s.repeat_interleave(c, 1)[:, :q.shape[1]]


def test_two_terms_reconstruct_flagged_tiles_to_about_15_bits():
    x = outlier_data(300, 260, magnitude=80.0)
    q, s, q2, s2, flags, tmax = fb.quantize_fallback(x, torch.tensor(-1.0))        # τ unset: every tile
    assert flags.all() and tmax.shape == (3, 3)
    one = _dequant(q, s)
    two = one + _dequant(q2, s2)
    assert relative_error(x, two) < relative_error(x, one) / 100                     # ~7 more bits
    assert torch.equal(tmax, fb.tile_absmax(x, 128))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_flags_are_exactly_the_tiles_holding_outliers(pattern):
    x = outlier_data(512, 512, magnitude=100.0, pattern=pattern, n_outlier_channels=3, seed=1)
    tau = torch.tensor(20.0)              # N(0, 1) entries stay below 20; the ×100 outliers do not
    *_, flags, _ = fb.quantize_fallback(x, tau)
    want = outlier_tiles(x, 20.0)
    assert 0 < want.sum() < want.numel()
    assert torch.equal(flags, want)


def test_unflagged_tiles_have_no_residual_term():
    x = outlier_data(256, 256, magnitude=100.0, pattern="token", n_outlier_channels=1, seed=3)
    q, s, q2, s2, flags, _ = fb.quantize_fallback(x, torch.tensor(20.0))
    rows = fb.expand_tiles(~flags, 256)
    assert (s2[rows] == 0).all() and (s2[~rows] > 0).all()


def test_adaptive_threshold_converges_to_the_target_share():
    policy = Fallback(target=0.1, ema=0.8)
    tau = torch.tensor([-1.0])
    ratios = []
    for i in range(40):
        x = outlier_data(1024, 1024, magnitude=30.0, pattern="scattered", seed=i)
        *_, flags, tmax = fb.quantize_fallback(x, tau)
        fb.update_threshold(tau, tmax, policy)
        ratios.append(fb.fallback_ratio(flags).item())
    assert ratios[0] == 1.0                                            # unset τ: everything falls back once
    late = sum(ratios[-20:]) / 20
    assert abs(late - 0.1) < 0.04, ratios


def test_fixed_threshold_stays():
    tau = torch.tensor([3.0])
    fb.update_threshold(tau, torch.rand(4, 4) * 100, Fallback(threshold=3.0))
    assert tau.item() == 3.0


def test_gemm_matches_two_block_gemms_and_ignores_unflagged_residual_bytes():
    x = outlier_data(300, 256, magnitude=60.0, seed=2)
    w = torch.randn(96, 256)
    q, s, q2, s2, flags, _ = fb.quantize_fallback(x, torch.tensor(30.0))
    assert 0 < flags.sum() < flags.numel()
    qw, sw = quantize_blockwise(w, 128, 128)
    out = fb.fallback_block_gemm(q, s, q2, s2, flags, qw, sw, 128, 128, None, torch.float32)
    garbage = torch.where(fb.expand_tiles(flags, 300).repeat_interleave(128, 1), q2, torch.full_like(q2, 99))
    assert torch.equal(out, fb.fallback_block_gemm(q, s, garbage, s2, flags, qw, sw, 128, 128, None, torch.float32))
    xhat = _dequant(q, s) + torch.where(fb.expand_tiles(flags, 300).repeat_interleave(128, 1), _dequant(q2, s2), 0.0)
    ref = xhat.double() @ (qw.double() * sw.double().repeat_interleave(128, 0)[:96].repeat_interleave(128, 1)).t()
    assert relative_error(ref.float(), out) < 1e-6


def test_bad_input_is_named():
    x = torch.randn(8, 128)
    with pytest.raises(ValueError, match="tau"):
        fb.quantize_fallback(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="block_k"):
        fb.quantize_fallback(x, torch.tensor(1.0), block_k=100)
    with pytest.raises(TypeError):
        fb.quantize_fallback(x.int(), torch.tensor(1.0))
    q, s, q2, s2, flags, _ = fb.quantize_fallback(x, torch.tensor(1.0))
    qw, sw = quantize_blockwise(torch.randn(4, 128), 128, 128)
    with pytest.raises(ValueError, match="flags"):
        fb.fallback_block_gemm(q, s, q2, s2, flags[:, :0], qw, sw, 128)
    with pytest.raises(ValueError, match="residual"):
        fb.fallback_block_gemm(q, s, q2[:4], s2, flags, qw, sw, 128)
    for bad in (dict(target=0.0), dict(threshold=float("nan")), dict(ema=1.0), dict(group_rows=64)):
        with pytest.raises(ValueError):
            Fallback(**bad)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_nanquantile_is_torchs_bit_for_bit(n):
    """The threshold controller's quantile: torch.nanquantile's value bit for bit (NaNs skipped, all NaN → NaN)."""
    g = torch.Generator().manual_seed(n)
    for p in (0.0, 0.05, 0.5, 0.95, 0.9999, 1.0):
        for nan_share in (0.0, 0.1, 1.0):
            v = torch.randn(n, generator=g).abs() * 10
            v[torch.rand(n, generator=g) < nan_share] = float("nan")
            want, got = torch.nanquantile(v, p), fb.nanquantile(v, p)
            assert got.shape == () and (torch.equal(got, want) or (want.isnan() and got.isnan())), (n, p, nan_share)


def test_nanquantile_traces_whole_with_dynamic_shapes():
    f = torch.compile(lambda v: fb.nanquantile(v, 0.95), backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (100, 333):
        v = torch.rand(n)
        assert torch.equal(f(v), torch.nanquantile(v, 0.95))
