"""INT4 recipe reference numerics (METHODS.md § INT4 training): block Hadamard, LSQ, bit splitting and
leverage-score sampling."""
from __future__ import annotations

import math

import pytest
import torch

from qtrain.quant import fake_quantize, int8_gemm, lsq, relative_error, sqnr
from qtrain.quant.hadamard import (HADAMARD_BLOCKS, block_hadamard, hadamard_matrix, hadamard_quantize_int4,
                                   quantize_step)
from qtrain.quant.lsq import fake_quantize_lsq, hq_search, lsq_grad_scale, lsq_init, lsq_quantize
from qtrain.quant.lss import (bit_split, leverage_probabilities, lss_dgrad, lss_wgrad, sample_rows,
                              split_dequantize, split_stacked, stacked_norms, stacked_scales)
from qtrain.quant.testing import PATTERNS, outlier_data
from qtrain.recipes import TENSOR


@pytest.mark.parametrize("b", HADAMARD_BLOCKS)
def test_hadamard_orthonormal_and_product_preserved(b):
    h = hadamard_matrix(b, torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.t())
    g = torch.Generator().manual_seed(b)
    x, w = torch.randn(37, 300, generator=g), torch.randn(23, 300, generator=g)     # K not a multiple of b
    xh, wh = block_hadamard(x, b), block_hadamard(w, b)
    assert xh.shape == (37, -(-300 // b) * b)
    dense = torch.block_diag(*[h] * (xh.shape[1] // b))
    xp = torch.nn.functional.pad(x.double(), (0, xh.shape[1] - 300))
    assert torch.allclose(xh.double(), xp @ dense, atol=1e-5)
    assert torch.allclose(xh @ wh.t(), x @ w.t(), rtol=1e-5, atol=1e-4)          # (XH)(WH)ᵀ = XWᵀ
    assert torch.allclose(block_hadamard(xh, b)[:, :300], x, atol=1e-5)           # H is its own inverse


def _int4_product_sqnr(x, w, hadamard_block=None, step="lsq"):
    ref = x.double() @ w.double().t()
    if hadamard_block is None:
        xq, wq = fake_quantize(x, TENSOR, "int4"), fake_quantize(w, TENSOR, "int4")
    else:
        xh, wh = block_hadamard(x, hadamard_block), block_hadamard(w, hadamard_block)
        if step == "lsq":
            sx, sw = lsq_init(xh).reshape(1), lsq_init(wh).reshape(1)
        else:
            sx, sw = (t.abs().amax().reshape(1) / 7 for t in (xh, wh))
        xq, wq = quantize_step(xh, sx).float() * sx, quantize_step(wh, sw).float() * sw
    return sqnr(ref, xq.double() @ wq.double().t())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hq_beats_plain_int4_on_outlier_data(pattern):
    x = outlier_data(512, 512, magnitude=50.0, pattern=pattern, seed=3)
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(4)) / math.sqrt(512)
    plain = _int4_product_sqnr(x, w)
    hq_absmax = _int4_product_sqnr(x, w, 128, step="absmax")
    hq_lsq = _int4_product_sqnr(x, w, 128)
    print(f"{pattern}: Y SQNR INT4 per-tensor {plain:.1f} dB, HQ(128) absmax step {hq_absmax:.1f} dB, "
          f"HQ(128) LSQ init step {hq_lsq:.1f} dB")
    if pattern == "token":
        return      # reported only: a transform along K cannot spread outliers that fill whole rows (tokens)
    assert hq_absmax >= plain and hq_lsq > plain + 2


def test_lsq_init_and_gradient_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * 3
    x[::7, ::5] *= 10                                                             # some beyond the clip range
    s0 = lsq_init(x)
    assert s0.dtype == torch.float32 and torch.allclose(s0, 2 * x.abs().mean() / math.sqrt(7))
    assert lsq_init(torch.zeros(4, 4)).item() == 1.0
    assert lsq_grad_scale(64 * 48) == 1 / math.sqrt(64 * 48 * 7)
    step = s0.reshape(1).clone().requires_grad_()
    xx = x.clone().requires_grad_()
    out = fake_quantize_lsq(xx, step)
    v = x / s0
    q = torch.round(v.clamp(-7, 7))
    assert torch.equal(out.detach(), q * s0)
    grad = torch.randn(64, 48, generator=g)
    out.backward(grad)
    inside = v.abs() <= 7
    assert 0 < (~inside).sum() < x.numel()                                       # both sides exercised
    assert torch.equal(xx.grad, torch.where(inside, grad, torch.zeros_like(grad)))   # STE masked outside
    want = (grad * torch.where(inside, q - v, q)).sum() / math.sqrt(x.numel() * 7)
    assert torch.allclose(step.grad, want.reshape(1), rtol=1e-5)


def test_mse_step_is_the_least_error_step_of_its_grid():
    """mse_step: on Gaussian data ~0.35·RMS (MSE-optimal 4-bit uniform step), with less squared error than
    LSQ's init and than every other ratio of its grid; an all-zero tensor gets 1.0; only the first rows count."""
    torch.manual_seed(0)
    x = torch.randn(2048, 512)
    rms = x.pow(2).mean().sqrt()
    s = lsq.mse_step(x)
    assert 0.33 <= (s / rms).item() <= 0.38

    def err(step):
        return (quantize_step(x, step).float() * step - x).pow(2).sum()

    assert err(s) < err(lsq.lsq_init(x))
    assert all(err(s) <= err(c * rms) for c in lsq.MSE_RATIOS.tolist())
    assert lsq.mse_step(torch.zeros(8, 16)).item() == 1.0
    y = torch.cat([x[:64], 100 * x[64:]])
    torch.testing.assert_close(lsq.mse_step(y, rows=64), lsq.mse_step(x[:64]))


def test_lsq_quantize_matches_quantize_step():
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(3)) * 4
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    step = torch.tensor([0.6])
    q, inside, r = lsq_quantize(x, step)
    v = x / step
    assert torch.equal(q, quantize_step(x, step).float())
    assert torch.equal(inside, v.abs() <= 7) and torch.equal(r, torch.where(inside, q - v, q))


def test_hq_search_is_the_per_block_search():
    """One shared transform for every block gives what each block's own transform, quantizer and exact INT8 GEMM
    give (K = 200: every block pads differently)."""
    g = torch.Generator().manual_seed(5)
    x = outlier_data(80, 200, magnitude=30.0, pattern="scattered", seed=6)
    w = torch.randn(48, 200, generator=g)
    steps, errors = hq_search(x, w, list(HADAMARD_BLOCKS), rows=64)
    ref = x[:64] @ w.t()
    for i, b in enumerate(HADAMARD_BLOCKS):
        sx, sw = lsq_init(block_hadamard(x, b)), lsq_init(block_hadamard(w, b))
        assert torch.equal(steps[i], torch.stack((sx, sw)))
        out = int8_gemm(hadamard_quantize_int4(x[:64], b, sx.reshape(1)), hadamard_quantize_int4(w, b, sw.reshape(1)),
                        sx.expand(64), sw, None, torch.float32)
        assert errors[i].item() == relative_error(ref, out)
    one_steps, none = hq_search(x, w, [64])
    assert none is None and torch.equal(one_steps[0], steps[2])


def test_bit_split_reconstructs_to_about_8_bits():
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(256, 192, generator=torch.Generator().manual_seed(1))
    hi, lo, s = bit_split(dy, gen)
    assert hi.dtype == lo.dtype == torch.int8 and s.dtype == torch.float32
    assert hi.abs().max() <= 7 and lo.abs().max() <= 7
    assert torch.allclose(s, 98 / dy.abs().max())
    rec = split_dequantize(hi, lo, s)
    assert ((rec - dy).abs() <= 1 / s + 1e-6).all()                     # one low step, the maximum too (no clip)
    int8_sr = fake_quantize(dy, TENSOR, "int8", "stochastic", torch.Generator().manual_seed(2))
    got, int8_db = sqnr(dy, rec), sqnr(dy, int8_sr)
    print(f"bit split {got:.1f} dB, INT8 per-tensor SR {int8_db:.1f} dB")
    assert got >= 30 and got >= int8_db - 3                                           # ~8 bits
    sub = dy[:8].clone()
    s8 = bit_split(sub, gen)[2]
    r = sub * s8 - 14 * torch.round(sub * s8 / 14)
    assert (r.abs() > 6).float().mean() > 0.05          # residuals METHODS' clamp at ±6 would bias: here unbiased
    sub[0, 0] = sub.abs().max() * sub[0, 0].sign()      # the maximum, which METHODS' ±6 would clip at 90
    draws = torch.stack([split_dequantize(*bit_split(sub, gen)) for _ in range(2000)]).mean(0)
    err = (draws - sub) * s8
    print(f"mean of 2000 draws − dY: max {err.abs().max():.3f} low steps, mean {err.mean():+.4f}")
    assert err.abs().max() < 0.06 and abs(err.mean()) < 0.002         # SR's sd/√2000 ≤ 0.011 steps: unbiased
    z = bit_split(torch.zeros(3, 4), gen)
    assert z[2].item() == 1.0 and not z[0].any() and not z[1].any()
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    assert math.isnan(bit_split(bad, gen)[2].item())


def test_bit_split_per_row_scales_each_token():
    """One scale per row: each row's own 98/max; on rows of different scale (a token's gradient norm spreads over
    orders of magnitude) the split keeps ~8 bits per row where one scale per tensor leaves most rows to the low
    part; the sampling norms are the code norms in dY's units; a row holding NaN keeps its NaN, alone."""
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(512, 256, generator=g) * torch.exp(torch.randn(512, 1, generator=g) * 1.5)
    hi, lo, s = bit_split(dy, g, per_row=True)
    assert s.shape == (512,) and torch.allclose(s, 98 / dy.abs().amax(dim=1))
    rec = split_dequantize(hi, lo, s)
    assert ((rec - dy).abs() <= 1 / s[:, None] + 1e-6).all()                  # each row's maximum too
    tensor_err = relative_error(dy, split_dequantize(*bit_split(dy, g)))
    row_err = relative_error(dy, rec)
    print(f"bit split relative error: per tensor {tensor_err:.3f}, per row {row_err:.3f}")
    assert row_err < 0.03 and tensor_err > 5 * row_err              # measured: 0.27 per tensor, 0.018 per row
    codes, s2, norms = split_stacked(dy, g, per_row=True)
    assert torch.allclose(norms, stacked_norms(codes) / torch.cat((s2, s2)))
    bad = torch.ones(3, 4)
    bad[0] = 0.0
    bad[1, 2] = float("nan")
    _, sb, nb = split_stacked(bad, g, per_row=True)
    assert sb[0] == 1.0 and math.isnan(sb[1]) and sb[2] == 98.0
    assert math.isinf(nb[1]) and math.isinf(nb[4]) and torch.isfinite(nb[[0, 2, 3, 5]]).all()
    assert split_stacked(torch.zeros(3, 0), g, per_row=True)[1].shape == (3,)


def test_split_stacked_is_bit_split_with_row_norms():
    dy = torch.randn(40, 24, generator=torch.Generator().manual_seed(1)) * 5
    hi, lo, s = bit_split(dy, torch.Generator().manual_seed(2))
    codes, s2, norms = split_stacked(dy, torch.Generator().manual_seed(2))
    assert torch.equal(codes, torch.cat((hi, lo))) and torch.equal(s, s2)
    want = torch.cat((14 * hi.float().norm(dim=1), lo.float().norm(dim=1)))
    assert torch.equal(norms, want) and torch.equal(stacked_norms(codes), want)


def test_leverage_probabilities_budget_cap_and_renormalization():
    c = torch.tensor([100.0, 1.0, 2.0, 0.0, 3.0, 50.0, 4.0])
    p = leverage_probabilities(c, 3.0)
    assert torch.allclose(p.sum(), torch.tensor(3.0)) and (p <= 1).all() and p[3] == 0
    assert p[0] == 1 and p[5] == 1                                                   # capped, kept surely
    rest = torch.tensor([1, 2, 4, 6])
    assert torch.allclose(p[rest] / c[rest], (p[rest] / c[rest])[0].expand(4))       # the rest ∝ c
    assert torch.equal(leverage_probabilities(c, 10.0), (c > 0).float())              # budget ≥ rows: all
    keep = sample_rows(p, torch.Generator().manual_seed(0))
    assert keep[0] and keep[5] and not keep[3]
    rows = torch.stack((c, c.flip(0), torch.zeros(7)))                               # batched along the last dim
    assert torch.equal(leverage_probabilities(rows, 3.0),
                       torch.stack([leverage_probabilities(r, 3.0) for r in rows]))


def _split_case(seed=0, M=64, N=32, K=48, per_row=False):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(M, N, generator=g) * torch.rand(M, 1, generator=g) * 3      # rows of varied norm
    codes, s, norms = split_stacked(dy, g, per_row)
    b = torch.randint(-7, 8, (K, N), generator=g, dtype=torch.int8)
    x = torch.randint(-7, 8, (M, K), generator=g, dtype=torch.int8)
    return codes, s, norms, b, x


@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "row"])
@pytest.mark.parametrize("gemm", ["dgrad", "wgrad"])
def test_lss_is_unbiased_error_falls_like_one_over_sqrt_draws(gemm, per_row):
    codes, s, norms, b, x = _split_case(per_row=per_row)
    M = codes.shape[0] // 2
    sb, sx = torch.tensor(0.5), torch.tensor(0.25)
    d = split_dequantize(codes[:M], codes[M:], s).double()
    if gemm == "dgrad":
        exact = d @ (b.double() * 0.5).t()
        c = norms
    else:
        exact = d.t() @ (x.double() * 0.25)
        xn = x.float().norm(dim=1)
        c = norms * torch.cat((xn, xn))
    p = leverage_probabilities(c, float(M))
    assert abs(p.sum().item() - M) < 1e-3
    gen = torch.Generator().manual_seed(5)

    def draw(gather):
        scale = stacked_scales(p, sample_rows(p, gen), s)
        if gemm == "dgrad":
            return lss_dgrad(codes, scale, b, sb, gather=gather).double()
        return lss_wgrad(codes, scale, x, sx).double()

    if gemm == "dgrad":
        scale = stacked_scales(p, sample_rows(p, torch.Generator().manual_seed(9)), s)
        one = [lss_dgrad(codes, scale, b, sb, gather=g) for g in (True, False)]
        assert torch.equal(one[0], one[1])                       # gathered rows = masked rows, bit for bit
    errs, total, n = {}, torch.zeros_like(exact), 0
    for target in (16, 64, 256):
        while n < target:
            total += draw(gather=n % 2 == 0)
            n += 1
        errs[target] = ((total / n - exact).norm() / exact.norm()).item()
    print(gemm, {k: round(v, 4) for k, v in errs.items()})
    assert errs[64] < errs[16] and errs[256] < errs[64]
    assert errs[256] < errs[16] / 2.5                                    # ~1/√draws: 4× expected
    assert errs[256] < 0.1


def test_lss_wgrad_on_tensor_cores_has_bf16_training_precision():
    """The CUDA path of lss_wgrad (bf16 operands, fp32 accumulation, bf16 result) against the fp32 one: within
    bf16's rounding of the operands and the result (relative error ~2⁻⁸ per element at most)."""
    torch.manual_seed(3)
    M, N, K = 256, 48, 80
    codes = torch.randint(-6, 7, (2 * M, N), dtype=torch.int8)
    scale = torch.rand(2 * M) * (torch.rand(2 * M) < 0.5)                  # half the rows dropped
    x = torch.randint(-7, 8, (M, K), dtype=torch.int8)
    sx = torch.tensor(0.03)
    fp32 = lss_wgrad(codes, scale, x, sx, tensor_cores=False)
    bf16 = lss_wgrad(codes, scale, x, sx, tensor_cores=True)
    assert bf16.dtype == fp32.dtype == torch.float32 and not torch.equal(bf16, fp32)
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert rel < 2 ** -8, rel
