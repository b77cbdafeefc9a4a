"""Test data generators shared by tests and benchmarks."""
from __future__ import annotations

import torch


def outlier_data(m: int, k: int, *, n_outlier_channels: int = 4, magnitude: float = 50.0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """N(0, 1) activations ``[m, k]`` with ``n_outlier_channels`` channels (columns, chosen at random) scaled by
    ``magnitude`` (×20–×100 is typical of LLM activations) — the documented outlier generator of the numerics
    gates (DESIGN.md)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    cols = torch.randperm(k, generator=g)[:n_outlier_channels]
    x[:, cols] *= magnitude
    return x.to(device=device, dtype=dtype)
