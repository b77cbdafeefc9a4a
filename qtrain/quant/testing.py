"""Test data generators shared by tests and benchmarks."""
from __future__ import annotations

import torch


PATTERNS = ("channel", "token", "scattered")


def outlier_data(m: int, k: int, *, n_outlier_channels: int = 4, magnitude: float = 50.0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
                 pattern: str = "channel") -> torch.Tensor:
    """N(0, 1) activations ``[m, k]`` with outliers scaled by ``magnitude`` (×20–×100 is typical of LLM
    activations) — the documented outlier generator of the numerics gates (DESIGN.md). ``pattern``:
    ``channel`` — ``n_outlier_channels`` columns chosen at random; ``token`` — as many rows; ``scattered`` —
    ``n_outlier_channels`` single entries per 16k elements, at random (GLU models show all three)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r} is not one of {PATTERNS}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if pattern == "channel":
        x[:, torch.randperm(k, generator=g)[:n_outlier_channels]] *= magnitude
    elif pattern == "token":
        x[torch.randperm(m, generator=g)[:n_outlier_channels]] *= magnitude
    else:
        n = max(1, n_outlier_channels * m * k // 16384)
        x.view(-1)[torch.randperm(m * k, generator=g)[:n]] *= magnitude
    return x.to(device=device, dtype=dtype)


def outlier_tiles(x: torch.Tensor, threshold: float, rows: int = 128, cols: int = 128) -> torch.Tensor:
    """bool ``[⌈m/rows⌉, ⌈k/cols⌉]``: which tiles of ``x`` hold an entry with ``|x| > threshold``."""
    m, k = x.shape
    hit = torch.zeros(-(-m // rows), -(-k // cols), dtype=torch.bool)
    idx = (x.abs() > threshold).nonzero()
    hit[idx[:, 0] // rows, idx[:, 1] // cols] = True
    return hit
