"""The dual-direction SR block quantizer (1×c blocks of dY and of dYᵀ from one read): the Triton kernel against its
reference twin — both scale arrays bit for bit, NaN/Inf and all-zero blocks included; every code within one step
of x / scale; unbiased over many seeds (DESIGN.md's SR gate); the two directions' roundings independent."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from qtrain import ops, quant  # noqa: E402
from qtrain.kernels import blockwise as kbw  # noqa: E402

from .helpers import assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {"reference": quant.quantize_blockwise_sr_dual, "kernel": kbw.quantize_blockwise_sr_dual}


def _scaled(x: torch.Tensor, s: torch.Tensor, c: int) -> torch.Tensor:
    """``x / scale`` per 1×c block as the reference rounds it: NaN → 0, clamped to ±127."""
    v = x.float() / s.repeat_interleave(c, 1)[:, :x.shape[1]]
    return torch.where(torch.isnan(v), 0.0, v).clamp(-127, 127)


def _check_codes(q, s, x, c, what):
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous(), what
    assert ((q.float() - _scaled(x, s, c)).abs() < 1).all(), f"{what}: a code is more than one step from x / scale"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("c", [32, 128])
@pytest.mark.parametrize("shape", [(300, 200), (64, 512)], ids=str)
def test_dual_kernel_scales_bit_exact_codes_within_one_step(shape, c, dtype):
    x = rows_with_distinct_scales(*shape, dtype, DEV, seed=1)
    x[:, :3] *= torch.logspace(-2, 2, shape[0], device=DEV, dtype=dtype)[:, None]  # column blocks' own scales
    x[0, :c] = 0.0                                                          # an all-zero row block
    x[c:2 * c, 5] = 0.0                                                     # an all-zero column block
    x[3, 7], x[40, shape[1] - 1], x[50, 2] = float("nan"), float("inf"), -float("inf")
    seed = torch.tensor([11], device=DEV)
    q, s, qt, st = kbw.quantize_blockwise_sr_dual(x, c, seed)
    assert_same(s, quant.quantize_blockwise(x, 1, c)[1], "row-block scales")
    assert_same(st, quant.quantize_blockwise(x.t(), 1, c)[1], "token-block scales")
    _check_codes(q, s, x, c, "q")
    _check_codes(qt, st, x.t(), c, "qt")
    assert (q[0, :c] == 0).all() and (qt[5, c:2 * c] == 0).all()
    assert torch.equal(q, kbw.quantize_blockwise_sr(x, 1, c, seed)[0])        # q is the single kernel's, bit for bit


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_sr_is_unbiased_both_ways(impl):
    fn, c = IMPLS[impl], 32
    x = rows_with_distinct_scales(72, 100, torch.bfloat16, DEV, seed=3)       # ragged in both dims
    s, st = quant.quantize_blockwise(x, 1, c)[1], quant.quantize_blockwise(x.t(), 1, c)[1]
    v, vt = _scaled(x, s, c).double(), _scaled(x.t(), st, c).double()
    n, acc, acct = 40, torch.zeros_like(v), torch.zeros_like(vt)
    for i in range(n):
        q, _, qt, _ = fn(x, c, torch.tensor([2000 + i], device=DEV))
        acc += q.double()
        acct += qt.double()
    for mean, ref in ((acc / n, v), (acct / n, vt)):
        # each draw has variance ≤ 1/4 step²: the mean of n draws is within 6 standard deviations of v
        assert ((mean - ref).abs() <= 6 * 0.5 / math.sqrt(n) + 1e-6).all()
        assert abs((mean - ref).mean().item()) < 0.01


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_directions_round_independently(impl):
    """Blocks whose absmax is 1 both ways (a 1 on each c×c block's diagonal): both directions quantize the same
    ``v``; with independent uniforms they disagree on ``2·p·(1 − p)`` of the codes (1/3 for uniform fractions)."""
    c, m, n = 32, 128, 96
    g = torch.Generator().manual_seed(4)
    x = torch.rand(m, n, generator=g) * 1.98 - 0.99
    i = torch.arange(m)[:, None]
    x = torch.where(i % c == torch.arange(n)[None, :] % c, 1.0, x).to(DEV)
    q, s, qt, st = IMPLS[impl](x, c, torch.tensor([5], device=DEV))
    assert torch.equal(s, torch.full_like(s, 1 / 127)) and torch.equal(st, torch.full_like(st, 1 / 127))
    differ = (q != qt.t()).double().mean().item()
    assert 0.28 < differ < 0.39, differ


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_seed_reproducible_and_strided_input(impl):
    fn = IMPLS[impl]
    base = rows_with_distinct_scales(96, 80, torch.float16, DEV)
    x = base.t()                                                             # a transposed view [80, 96]
    a, b = fn(x, 32, torch.tensor([7], device=DEV)), fn(x.contiguous(), 32, torch.tensor([7], device=DEV))
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    assert not torch.equal(a[0], fn(x, 32, torch.tensor([8], device=DEV))[0])
    assert a[2].shape == (96, 80) and a[2].is_contiguous() and a[3].shape == (96, 3)
    with pytest.raises(ValueError, match="seed"):
        fn(x, 32, torch.tensor([0.5]))


def test_dual_kernel_rejects_blocks_it_does_not_take():
    x = torch.randn(16, 16, device=DEV)
    for c in (48, 512):
        with pytest.raises(ValueError, match="power-of-two c"):
            kbw.quantize_blockwise_sr_dual(x, c, torch.tensor([1], device=DEV))
    q, s, qt, st = kbw.quantize_blockwise_sr_dual(x[:0], 32, torch.tensor([1], device=DEV))
    assert q.shape == (0, 16) and s.shape == (0, 1) and qt.shape == (16, 0) and st.shape == (16, 0)


def test_ops_dispatch_dual_from_generator_and_under_compile():
    from qtrain.nn.functional import sr_generator
    x = torch.randn(48, 80, device=DEV)
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            g1 = torch.Generator(device=DEV).manual_seed(5)
            g2 = torch.Generator(device=DEV).manual_seed(5)
            a, b = ops.quantize_blockwise_sr_dual(x, 32, g1), ops.quantize_blockwise_sr_dual(x, 32, g2)
            assert all(torch.equal(u, w) for u, w in zip(a, b)), backend
            assert not torch.equal(a[0], ops.quantize_blockwise_sr_dual(x, 32, g1)[0])   # the generator moved on
    with ops.use_backend("reference"):
        compiled = torch.compile(lambda t: ops.quantize_blockwise_sr_dual(t, 32), backend="aot_eager",
                                 fullgraph=True)
        gen = sr_generator(torch.device(DEV))
        state = gen.get_state()
        eager = ops.quantize_blockwise_sr_dual(x, 32)
        gen.set_state(state)
        assert all(torch.equal(u, w) for u, w in zip(eager, compiled(x)))
