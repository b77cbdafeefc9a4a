"""Stochastic rounding in the block quantizer: the reference (explicit generator) and the Triton kernel (tl.rand
seeded from a tensor) against DESIGN.md's SR gate — the mean over many draws comes back to x, every code is
within one step of x / scale — with the RTN quantizer's scales bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from qtrain import ops, quant  # noqa: E402
from qtrain.kernels import blockwise as kbw  # noqa: E402

from .helpers import assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {"reference": quant.quantize_blockwise_sr, "kernel": kbw.quantize_blockwise_sr}


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("blk", [(32, 32), (1, 128)], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_sr_is_unbiased_and_within_one_step(impl, blk, transposed):
    """Transposed: a ``.t()`` view (the kernel's uniforms then run down the columns, ``_uniforms_down``)."""
    fn = IMPLS[impl]
    x = rows_with_distinct_scales(40, 100, torch.bfloat16, DEV, seed=3)       # ragged in both dims
    if transposed:
        x = x.t().contiguous().t()
    x[0, :4] = 0.0
    q_rtn, s_rtn = quant.quantize_blockwise(x, *blk)
    r, c = blk
    step = s_rtn.repeat_interleave(r, 0)[:x.shape[0]].repeat_interleave(c, 1)[:, :x.shape[1]]
    v = x.float() / step
    n, acc = 40, torch.zeros_like(v, dtype=torch.float64)
    for i in range(n):
        q, s = fn(x, r, c, torch.tensor([1000 + i], device=DEV))
        assert_same(s, s_rtn, f"SR scales {blk}")                            # the scales are RTN's
        assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous()
        assert ((q.float() - v).abs() < 1).all(), "a code is more than one step from x / scale"
        acc += q.double()
    mean = acc / n
    # each draw has variance ≤ 1/4 step²: the mean of n draws is within 6 standard deviations of v
    assert ((mean - v).abs() <= 6 * 0.5 / math.sqrt(n) + 1e-6).all()
    assert abs((mean - v).mean().item()) < 0.01                               # no bias overall
    frac = (v - v.floor()).double()
    assert abs((mean - v.floor()).mean().item() - frac.mean().item()) < 0.01
    assert (q[0, :4] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_sr_seed_reproducible_and_transposed_input(impl):
    fn = IMPLS[impl]
    x = rows_with_distinct_scales(64, 96, torch.float32, DEV)
    a = fn(x.t(), 32, 32, torch.tensor([7], device=DEV))
    b = fn(x.t(), 32, 32, torch.tensor([7], device=DEV))
    c = fn(x.t(), 32, 32, torch.tensor([8], device=DEV))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert_same(a[1], quant.quantize_blockwise(x.t().contiguous(), 32, 32)[1], "scales of x.t()")
    with pytest.raises(ValueError, match="seed"):
        fn(x, 32, 32, torch.tensor([0.5]))


def test_ops_dispatch_sr_from_generator():
    x = torch.randn(48, 80, device=DEV)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            g1 = torch.Generator(device=DEV).manual_seed(5)
            g2 = torch.Generator(device=DEV).manual_seed(5)
            q1, s1 = ops.quantize_blockwise_sr(x, 32, 32, g1)
            q2, s2 = ops.quantize_blockwise_sr(x, 32, 32, g2)
            assert torch.equal(q1, q2) and torch.equal(s1, s2), backend
            q3, _ = ops.quantize_blockwise_sr(x, 32, 32, g1)                   # the generator moved on
            assert not torch.equal(q1, q3)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("c", [128, 256])
def test_sr_kernel_roundings_are_uncorrelated(c, transposed):
    """Every element halfway between two codes: each rounds up with probability ½, independently of its
    neighbours along rows and columns (the kernel draws eight uniforms per Philox call, grouped along columns, or
    along rows for a transposed view)."""
    M, K = 64, 2 * c
    x = torch.full((M, K), 0.5, device=DEV)
    x[:, ::c] = 127.0                                                     # every block's scale is exactly 1
    if transposed:
        x = x.t().contiguous().t()
    q, s = kbw.quantize_blockwise_sr(x, 1, c, torch.tensor([11], device=DEV))
    assert torch.equal(s, torch.ones_like(s))
    up = q.float()
    up[:, ::c] = float("nan")
    u = up[~up.isnan()]
    assert set(u.unique().tolist()) <= {0.0, 1.0} and abs(u.mean().item() - 0.5) < 0.03
    for a, b in ((up[1:, :], up[:-1, :]), (up[:, 1:], up[:, :-1]), (up[8:, :], up[:-8, :]), (up[:, 8:], up[:, :-8])):
        keep = ~(a.isnan() | b.isnan())
        a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
        assert abs((a * b).mean().item() / (a.std() * b.std()).item()) < 0.06


@pytest.mark.parametrize("impl", IMPLS)
def test_sr_tiny_blocks(impl):
    """Blocks whose scale is subnormal (absmax ~1e-37: its reciprocal overflows fp32) or underflows to 0 keep the
    contract: every code within one step of x / scale (±127 where x / scale is ±Inf), zeros stay 0."""
    fn = IMPLS[impl]
    x = rows_with_distinct_scales(8, 256, torch.float32, DEV, seed=5)
    x[0] *= 1e-37 / x[0].abs().max()
    x[1] *= 3e-39 / x[1].abs().max()
    x[2] = 0.0
    x[2, 3] = 2e-44                                            # absmax / 127 underflows: scale 0
    q_rtn, s_rtn = quant.quantize_blockwise(x, 1, 128)
    q, s = fn(x, 1, 128, torch.tensor([3], device=DEV))
    assert_same(s, s_rtn, "SR scales")
    v = (x / s.repeat_interleave(128, 1)).nan_to_num(0.0).clamp(-127, 127)
    assert ((q.float() - v).abs() < 1).all(), "a code is more than one step from x / scale"
    assert (q[2, :3] == 0).all() and q[2, 3] == 127


def test_transposed_tilings_draw_the_same_uniforms():
    """Down a transposed view the uniforms are counted by column and 8-row group, whatever the tile: the 32-row
    tiles the GPU's default takes for 256-token blocks give the codes of the 16-row ones bit for bit."""
    x = rows_with_distinct_scales(600, 300, torch.bfloat16, DEV, seed=4).t()
    seed = torch.tensor([11], device=DEV)
    first = kbw._launch(x, 1, 256, seed, config=(16, 4))
    for cfg in [(32, 4), (64, 8), (8, 4)]:
        got = kbw._launch(x, 1, 256, seed, config=cfg)
        assert_same(got[0], first[0], f"SR codes {cfg}")
        assert_same(got[1], first[1], f"SR scales {cfg}")


def test_gpu_tiling_of_transposed_256_wide_blocks(monkeypatch):
    """The GPU's default (measured, kernels/blockwise.launch_config): 16-bit 256-token blocks in 32-row tiles with 4
    warps, INT8 codes re-blocked with 4 warps; other calls as the general rule."""
    monkeypatch.setattr(kbw, "interpreting", lambda: False)
    assert kbw.launch_config(4096, 1, 256, transposed=True, elem_size=2) == (32, 4)
    assert kbw.launch_config(4096, 128, 256, transposed=True, elem_size=1) == (128, 4)
    assert kbw.launch_config(4096, 128, 256, transposed=True, elem_size=4) == (128, 8)
    assert kbw.launch_config(8192, 1, 256, elem_size=2) == (16, 4)
    assert kbw.launch_config(8192, 1, 128, transposed=True, elem_size=2) == (32, 4)
    assert kbw.launch_config(22016, 128, 256) == (128, 8)
