"""The exact division of ``qtrain.kernels._common.quantize_rtn`` (reciprocal per block, two FMAs per element),
replayed in exact arithmetic on the CPU: the quotients must equal IEEE ``x / scale`` bit for bit — on random and
adversarial quotients (next to every half-integer code boundary) over the whole exponent range — and the codes
must equal the reference's in the edge cases (scale 0 from an underflowed absmax/127, Inf, NaN, subnormal x and
scales). Triton's interpreter cannot run this path (its ``tl.fma`` rounds twice), so the kernels' CPU tests
take ``div_rn`` there; the GPU tests compare the kernels bit for bit with the reference."""
from __future__ import annotations

import numpy as np
import pytest

F32, F64 = np.float32, np.float64
TINY, PRE = F32(2.0 ** -100), F32(2.0 ** 64)


def fma32(a, b, c):
    """float32 ``a·b + c`` rounded once (round to nearest even), from float64 error-free transforms."""
    p = a.astype(F64) * b.astype(F64)                       # exact: two 24-bit significands
    c = c.astype(F64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c
        bb = s - p
        e = (p - (s - bb)) + (c - bb)                       # TwoSum: s + e = p + c exactly (finite inputs)
        r = s.astype(F32)
        rs = r.astype(F64)
        at_mid = (np.abs(s - rs) == np.spacing(np.abs(r)).astype(F64) / 2) & (e != 0) & np.isfinite(s)
        # s lies exactly on a float32 midpoint and the rest e breaks the tie
        beyond = ((s > rs) & (e > 0)) | ((s < rs) & (e < 0))
        nxt = np.nextafter(r, np.where(s > rs, F32(np.inf), F32(-np.inf)))
    return np.where(at_mid & beyond, nxt, r)


def kernel_quotient(x, scale):
    """The kernel's steps: ``divisor`` per block, then ``quantize_rtn``'s FUSED_FMA branch up to v."""
    with np.errstate(all="ignore"):
        pre = np.where(scale < TINY, PRE, F32(1.0)).astype(F32)
        d = (scale * pre).astype(F32)
        inv = (F32(1.0) / d).astype(F32)
        xs = (x * pre).astype(F32)
        q0 = (xs * inv).astype(F32)
        v = fma32(fma32(-q0, d, xs), inv, q0)
        return np.where(np.isnan(v), q0, v)


def codes(v):
    v = np.where(np.isnan(v), F32(0), v)
    return np.rint(np.clip(v, -127, 127)).astype(np.int8)     # rint: half to even


def ieee(x, scale):
    with np.errstate(all="ignore"):
        return (x / scale).astype(F32)


def _scales(rng, n, lo=-120, hi=120):
    amax = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(lo, hi, n)).astype(F32)
    return amax, (amax / F32(127)).astype(F32)


@pytest.mark.parametrize("seed", range(4))
def test_quotients_equal_ieee_division(seed):
    rng = np.random.default_rng(seed)
    n = 1_000_000
    amax, scale = _scales(rng, n)
    uniform = (rng.uniform(-1, 1, n) * amax).astype(F32)
    half = (rng.integers(-127, 127, n) + 0.5) * scale.astype(F64)   # the code boundaries k + ½ …
    near = half.astype(F32)
    for _ in range(3):                                               # … and up to 3 ulps either side
        step = rng.integers(-1, 2, n)
        near = np.where(step == 0, near, np.nextafter(near, np.where(step > 0, F32(np.inf), F32(-np.inf))))
    for x in (uniform, near, amax, -amax):
        np.testing.assert_array_equal(kernel_quotient(x, scale), ieee(x, scale))


def test_tiny_scales_and_subnormals():
    rng = np.random.default_rng(7)
    n = 200_000
    amax, scale = _scales(rng, n, -149, -90)                         # subnormal and tiny scales
    x = (rng.uniform(-1, 1, n) * amax).astype(F32)
    ok = scale > 0
    np.testing.assert_array_equal(kernel_quotient(x[ok], scale[ok]), ieee(x[ok], scale[ok]))
    np.testing.assert_array_equal(codes(kernel_quotient(x, scale)), codes(ieee(x, scale)))


def test_edge_cases_give_the_reference_codes():
    sub = np.array([2.0 ** -149, 40 * 2.0 ** -149], dtype=F32)
    assert ((sub / F32(127)).astype(F32) == 0).all()                 # absmax/127 underflows: scale 0
    x = np.array([0.0, 1e-45, -1e-45, 5e-44, np.inf, -np.inf, np.nan, 3.0, 0.0, np.nan, 1.0], dtype=F32)
    s = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.inf, 1.0, np.inf, np.inf, np.nan, 2.0 ** -130], dtype=F32)
    np.testing.assert_array_equal(codes(kernel_quotient(x, s)), codes(ieee(x, s)))


def test_the_replay_can_fail():
    """Without the fused (single-rounding) steps the same quotients go wrong: the checks above can fail."""
    rng = np.random.default_rng(1)
    amax, scale = _scales(rng, 200_000)
    x = (rng.uniform(-1, 1, amax.size) * amax).astype(F32)
    inv = (F32(1.0) / scale).astype(F32)
    q0 = (x * inv).astype(F32)
    unfused = (((-q0 * scale).astype(F32) + x).astype(F32) * inv).astype(F32) + q0
    assert (unfused.astype(F32) != ieee(x, scale)).sum() > 100
    assert (q0 != ieee(x, scale)).sum() > 100
