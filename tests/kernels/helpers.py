"""Shared checks for kernel tests: inputs with a distinct scale per row, bit-exact and one-rounding gates."""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def rows_with_distinct_scales(m: int, k: int, dtype: torch.dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    """N(0, 1) rows each multiplied by its own factor spread over 1e-3 … 1e3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]
    return x.to(device=device, dtype=dtype)


def assert_same(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-exact equality, NaN where the reference has NaN."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    nan = torch.isnan(ref) if ref.is_floating_point() else torch.zeros_like(ref, dtype=torch.bool)
    if ref.is_floating_point():
        assert torch.equal(torch.isnan(out), nan), f"{what}: NaN positions differ"
    diff = (out[~nan] != ref[~nan]).sum().item()
    assert diff == 0, f"{what}: {diff} of {ref.numel()} elements differ"


def assert_one_rounding(out: torch.Tensor, ref32: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
    """Every element of ``out`` (bf16/fp16) within one unit in the last place of ``ref32`` in out's dtype, plus
    the fp32 epilogue's own rounding noise, ``2⁻²¹·magnitude`` (``|acc·scales| + |bias|``: where a bias cancels
    the product, an FMA on the GPU and two roundings in the reference legitimately differ by that much)."""
    bits = MANTISSA_BITS[out.dtype]
    tiny = torch.finfo(out.dtype).smallest_normal * 2.0 ** -bits
    ulp = torch.exp2(torch.floor(torch.log2(ref32.abs().clamp_min(tiny))) - bits).clamp_min(tiny)
    err = (out.float() - ref32).abs()
    finite = torch.isfinite(ref32)
    assert torch.equal(torch.isnan(out), torch.isnan(ref32)), "NaN positions differ"
    if magnitude is not None:
        ulp = ulp + magnitude * 2.0 ** -21
    bad = (err > ulp) & finite
    assert not bad.any(), f"{bad.sum().item()} elements beyond one rounding; worst {(err / ulp)[finite].max()}"
