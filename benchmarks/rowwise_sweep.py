"""Row-wise quantize tilings on the GPU (PYTHONPATH=.): % of copy bandwidth by minimum bytes for each config.

Each config's output is checked equal to the default config's (itself checked against the CPU reference by
``pytest -m gpu``). Prints one markdown table; the chosen default is the row marked ``default``.
"""
from __future__ import annotations

import torch
import triton
import triton.testing

from qtrain.kernels.rowwise import LaunchConfig as C
from qtrain.kernels.rowwise import launch_config, quantize_rowwise

SHAPES = [(16384, 11008), (16384, 5504), (16384, 14336), (16384, 4096), (8192, 2048), (4096, 28672)]


def candidates(M: int, K: int) -> list[tuple[str, C]]:
    d = launch_config(M, K)
    out = [("default", d)]
    for bk, w in ((2048, 4), (4096, 8), (8192, 8)):
        if bk < K:
            out.append((f"loop {bk} w{w}", C(1, bk, False, w)))
    for w in (16, 32):
        out.append((f"one tile w{w}", C(1, triton.next_power_of_2(K), True, w)))
    return out


def main() -> None:
    print("| shape | config | us | TB/s | % of copy |\n|---|---|---|---|---|")
    for M, K in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.rand(M, 1, device="cuda",
                                                                                 dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        copy_bw = 4 * x.numel() / triton.testing.do_bench(lambda: dst.copy_(x), return_mode="median") / 1e9
        min_bytes = 3 * x.numel() + 4 * M
        q0, s0 = quantize_rowwise(x)
        for name, cfg in candidates(M, K):
            q, s = quantize_rowwise(x, cfg)
            if not (torch.equal(q, q0) and torch.equal(s, s0)):
                raise RuntimeError(f"{name} {cfg} differs from the default at {M}x{K}")
            ms = triton.testing.do_bench(lambda: quantize_rowwise(x, cfg), return_mode="median")
            bw = min_bytes / ms / 1e9
            print(f"| {M}x{K} | {name} {tuple(cfg)} | {ms * 1e3:.1f} | {bw:.2f} | {100 * bw / copy_bw:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
