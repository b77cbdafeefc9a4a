"""Block-wise quantize tilings on the GPU (PYTHONPATH=.): % of copy bandwidth by minimum bytes for each config.

Runs every block quantize call of a 7B-width step (``qtrain.bench.quant.BLOCKWISE``) with tiles of ``TM × c``
elements, TM from 2k to 32k elements' worth, 4/8 warps. Each config's output (scales, and codes for RTN) is
checked equal to the default config's (itself checked against the CPU reference by `qtrain bench quant`).
Then the re-blocking of saved INT8 X (``REQUANTIZE``) per tiling. Prints markdown tables; the default is the row
marked ``default``. Then the dual SR quantize of dY (``quantize_blockwise_sr_dual``: dY's and dYᵀ's 1×128 blocks
from one read) per (TM, warps), against the two single SR calls it replaces (``blockwise_sweep.py dual``: that part
alone; ``only=256``: the rows named with 256 and the re-blocking, no dual). ``blockwise_sweep.py fallback``: the
fallback quantizer's row chunks (``qtrain.bench.quant.FALLBACK`` calls, 5 % of tiles flagged) per (TM, warps),
each config's six outputs checked equal to the default's.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.testing

from qtrain.bench.quant import (BLOCKWISE, BLOCKWISE_DUAL, FALLBACK, REQUANTIZE, fallback_case, fallback_mismatch,
                                fallback_min_bytes)
from qtrain.kernels import blockwise, fallback


def candidates(x: torch.Tensor, r: int, c: int) -> list[tuple[str, tuple[int, int]]]:
    """The default and ``[TM, c]`` tiles of 2k-32k elements with 4 and 8 warps."""
    M = x.shape[0]
    transposed = x.stride(0) == 1 and x.stride(1) != 1
    out = [("default", blockwise.launch_config(M, r, c, transposed, x.element_size()))]
    for elems in (2048, 4096, 8192, 16384, 32768):
        tm = max(r, min(elems // c, triton.next_power_of_2(M)))
        for w in (4, 8):
            if (tm, w) not in [cfg for _, cfg in out]:
                out.append((f"{tm * c // 1024}k w{w}", (tm, w)))
    return out


def sweep_tilings(what: str, shape: str, x: torch.Tensor, r: int, c: int, run, min_bytes: int, copy_bw: float,
                  codes: bool = True) -> None:
    """One table row per tiling of ``candidates(x, r, c)``: ``run(config)`` timed, its scales (and ``codes``: its
    codes) checked equal to the default config's."""
    q0, s0 = run(None)
    for name, cfg in candidates(x, r, c):
        q, s = run(cfg)
        if not (torch.equal(s, s0) and (not codes or torch.equal(q, q0))):
            raise RuntimeError(f"{what}: config {cfg} differs from the default")
        ms = triton.testing.do_bench(lambda: run(cfg), return_mode="median")
        bw = min_bytes / ms / 1e9
        print(f"| {what} | {shape} | {name} {cfg} | {ms * 1e3:.1f} | {bw:.2f} | {100 * bw / copy_bw:.1f} |",
              flush=True)


def main(only: str = "") -> None:
    """``only``: the rows whose name contains it (e.g. ``256``: jetfire_wide's calls), then the re-blocking."""
    print("| call | shape | config (TM, warps) | us | TB/s | % of copy |\n|---|---|---|---|---|---|")
    seed = torch.tensor([7], device="cuda")
    for what, (R, C), dtype, (r, c), transposed, sr in BLOCKWISE:
        if only not in what:
            continue
        base = torch.randn(R, C, device="cuda", dtype=dtype) * torch.rand(R, 1, device="cuda", dtype=dtype)
        x = base.t() if transposed else base
        n = x.numel()
        dst = torch.empty_like(base)
        copy_bw = 2 * n * base.element_size() / triton.testing.do_bench(lambda: dst.copy_(base),
                                                                        return_mode="median") / 1e9
        run = lambda cfg: blockwise._launch(x, r, c, seed if sr else None, config=cfg)  # noqa: E731
        sweep_tilings(what, f"{R}x{C}{'ᵀ' if transposed else ''}", x, r, c, run,
                      n * base.element_size() + n + 4 * n // (r * c), copy_bw, codes=not sr)
    requantize()
    if not only:
        dual()


def requantize() -> None:
    """``requantize_blockwise_t`` (saved INT8 X re-blocked along tokens) per tiling, % of copy bandwidth by its
    minimum bytes (the codes read and written once, the scales)."""
    print("\n| requantize call | shape of X | config | us | TB/s | % of copy |\n|---|---|---|---|---|---|")
    for what, (R, C), (ri, ci), (r, c) in REQUANTIZE:
        q, s = blockwise.quantize_blockwise(torch.randn(R, C, device="cuda") * torch.rand(R, 1, device="cuda"), ri, ci)
        dst = torch.empty_like(q)
        copy_bw = 2 * q.numel() / triton.testing.do_bench(lambda: dst.copy_(q), return_mode="median") / 1e9
        run = lambda cfg: blockwise._launch(q.t(), r, c, None, (s.t(), ci, ri), config=cfg)  # noqa: E731
        sweep_tilings(what, f"{R}x{C}", q.t(), r, c, run, 2 * q.numel() + 4 * (s.numel() + q.numel() // (r * c)),
                      copy_bw)


def dual() -> None:
    print("\n| dual SR call | shape | config (TM, warps) | us | two single calls us | dual / two |\n"
          "|---|---|---|---|---|---|")
    seed = torch.tensor([7], device="cuda")
    for what, (R, C), dtype, c in BLOCKWISE_DUAL:
        for cols in (C, 11008):
            x = torch.randn(R, cols, device="cuda", dtype=dtype) * torch.rand(R, 1, device="cuda", dtype=dtype)
            two = triton.testing.do_bench(lambda: (blockwise.quantize_blockwise_sr(x, 1, c, seed),
                                                   blockwise.quantize_blockwise_sr(x.t(), 1, c, seed)),
                                          return_mode="median")
            s0 = blockwise.quantize_blockwise_sr_dual(x, c, seed)[1]
            configs = [("default", blockwise.dual_launch_config(R, c))]
            configs += [(f"TM {tm} w{w}", (tm, w)) for tm in (128, 256) for w in (4, 8, 16)
                        if (tm, w) != configs[0][1]]
            for name, cfg in configs:
                try:
                    if not torch.equal(blockwise.quantize_blockwise_sr_dual(x, c, seed, config=cfg)[1], s0):
                        raise RuntimeError(f"{what}: config {cfg} gives other scales than the default")
                    ms = triton.testing.do_bench(lambda: blockwise.quantize_blockwise_sr_dual(x, c, seed, config=cfg),
                                                 return_mode="median")
                except Exception as e:  # noqa: BLE001 - a config that fails is reported, the sweep goes on
                    print(f"| {what} | {R}x{cols} | {name} {cfg} | failed: {type(e).__name__} | | |", flush=True)
                    continue
                print(f"| {what} | {R}x{cols} | {name} {cfg} | {ms * 1e3:.1f} | {two * 1e3:.1f} | {ms / two:.2f} |",
                      flush=True)


def fallback_chunks() -> None:
    print("\n| fallback call | shape | config (TM, warps) | us | TB/s | % of copy |\n|---|---|---|---|---|---|")
    for what, (R, C), transposed, frac, *sr in FALLBACK:
        if sr and sr[0]:            # the SR rows tile like the RTN ones (same chunks, same passes)
            continue
        base, x, tau = fallback_case((R, C), transposed, frac)
        dst = torch.empty_like(base)
        copy_bw = 4 * x.numel() / triton.testing.do_bench(lambda: dst.copy_(base), return_mode="median") / 1e9
        out0 = fallback.quantize_fallback(x, tau)
        min_bytes = fallback_min_bytes(x, out0[4])
        configs = [("default", fallback.launch_config(128))]
        configs += [(f"TM {tm} w{w}", (tm, w)) for tm in (8, 16, 32, 64, 128) for w in (2, 4, 8)
                    if (tm, w) != configs[0][1]]
        for name, cfg in configs:
            bad = fallback_mismatch(fallback.quantize_fallback(x, tau, config=cfg), out0)
            if bad is not None:
                raise RuntimeError(f"fallback {what}: config {cfg} gives another {bad} than the default")
            ms = triton.testing.do_bench(lambda: fallback.quantize_fallback(x, tau, config=cfg), return_mode="median")
            bw = min_bytes / ms / 1e9
            print(f"| {what} | {R}x{C}{'ᵀ' if transposed else ''} | {name} {cfg} | {ms * 1e3:.1f} | {bw:.2f} | "
                  f"{100 * bw / copy_bw:.1f} |", flush=True)


if __name__ == "__main__":
    arg = sys.argv[1] if sys.argv[1:] else ""
    if arg.startswith("only="):                      # only=256: jetfire_wide's calls and the re-blocking
        main(arg[5:])
    else:
        {"dual": dual, "fallback": fallback_chunks}.get(arg, main)()
