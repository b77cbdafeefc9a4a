"""The data-flow ops of one 7B-shape jetfire_wide layer (1×256 blocks, 8192 tokens, d 4096, ffn 11008) against the
time of their bytes at copy bandwidth: SwiGLU + quantize, SwiGLU backward (bf16 dh), RMSNorm backward, and the
re-blocking of the saved INT8 X for wgrad; the forward's quantize of bf16 h then SwiGLU, as two ops and as one
(``ops.quantize_swiglu``, ``qtrain.nn.dataflow.FUSED_H_ACT``: both lines count the one op's minimum bytes).

Usage (on the GPU): PYTHONPATH=. python benchmarks/dataflow_ops.py [sweep]. One line per op: µs per call (median,
``qtrain.bench.common.bench``), the bytes read and written, and the share of copy bandwidth that is (copy: a
``torch.Tensor.copy_`` of the same bytes). ``sweep``: each op again under other tilings (the module constants of
:mod:`qtrain.kernels.dataflow`, the re-blocking's ``(TM, warps)``), each checked against the default tiling's
output (codes and scales equal; the norm backward's fp32 sums within 1e-5 — their order depends on the tiling).
The session-10 profile of the step (before the kernels changed) gave 572 / 502 / 269 / 115 µs for these calls
(`benchmarks/results/2026-12-01-h200-profile-7b-session10.md`); after: `…-dataflow-kernels.md`.
"""
from __future__ import annotations

import torch

import sys

from qtrain import ops
from qtrain.bench.common import bench
from qtrain.kernels import blockwise, dataflow

M, D, F, C = 8192, 4096, 11008, 256


def codes(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device="cuda")
    return q, torch.rand(rows, -(-cols // C), device="cuda") * 0.01 + 1e-3


def copy_us(n_bytes: int) -> float:
    src = torch.empty(n_bytes // 2, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    return 1e3 * bench(lambda: dst.copy_(src))         # reads and writes n_bytes in all


def calls() -> dict:
    """name → (call, bytes read and written) of the ops of one 7B-shape layer."""
    hq, hs = codes(M, 2 * F)
    gq, gs = codes(M, F)
    xq, xs = codes(M, D)
    dq, ds = codes(M, D)
    w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    h = torch.randn(M, 2 * F, device="cuda", dtype=torch.bfloat16)
    return {
        "swiglu_quantize [8192, 22016] → int8 [8192, 11008]":
            (lambda: ops.swiglu_quantize(hq, hs, 1, C), M * 2 * F + M * F),
        "quantize_blockwise + swiglu_quantize, bf16 h [8192, 22016]":
            (lambda: ops.swiglu_quantize(*ops.quantize_blockwise(h, 1, C), 1, C), 2 * M * 2 * F + M * 2 * F + M * F),
        "quantize_swiglu (one op), bf16 h [8192, 22016]":
            (lambda: ops.quantize_swiglu(h, 1, C), 2 * M * 2 * F + M * 2 * F + M * F),
        "swiglu_backward → bf16 dh [8192, 22016]":
            (lambda: ops.swiglu_backward(hq, hs, gq, gs, 1, C, torch.bfloat16), M * 2 * F + M * F + 2 * M * 2 * F),
        "rmsnorm_backward [8192, 4096] → fp32 dx":
            (lambda: ops.rmsnorm_backward(xq, xs, w, dq, ds, 1e-6, 1, C), 2 * M * D + 4 * M * D),
        "requantize_blockwise_t [8192, 4096] → 256-token blocks":
            (lambda: ops.requantize_blockwise_t(xq, xs, 1, C, 1, C), 2 * M * D),
    }


def line(name: str, fn, n_bytes: int) -> None:
    us, floor = 1e3 * bench(fn), copy_us(n_bytes)
    print(f"{name:58s} {us:8.1f} µs  {n_bytes / 2**20:7.0f} MiB  {100 * floor / us:5.1f} % of copy bandwidth")


def same(a, b) -> bool:
    """Equal codes and scales; fp32 results within 1e-5 of the largest magnitude."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(torch.equal(x, y) if x.dtype == torch.int8 else
               bool(((x.float() - y.float()).abs().max() <= 1e-5 * y.float().abs().max()).item())
               for x, y in zip(a, b))


def sweep(ops_: dict) -> None:
    """The ops again under other tilings: one line per config, '(differs)' where the output is not the
    default's."""
    settings = {"swiglu": ("ACT_TILE_ELEMS", (2048, 8192, 16384)),
                "rmsnorm": ("NORM_BWD_ROWS", (2, 4, 8, 32, 64))}
    for name, (fn, n_bytes) in ops_.items():
        want = fn()
        key = next((k for k in settings if name.startswith(k)), None)
        if key is not None:
            attr, values = settings[key]
            default = getattr(dataflow, attr)
            for value in values:
                setattr(dataflow, attr, value)
                tag = "" if same(fn(), want) else " (differs)"
                line(f"{name.split()[0]} {attr}={value}{tag}", fn, n_bytes)
            setattr(dataflow, attr, default)
        elif name.startswith("requantize"):
            q, s = codes(M, D)
            want = ops.requantize_blockwise_t(q, s, 1, C, 1, C)
            for tm in (8, 16, 32, 64):
                for warps in (2, 4, 8):
                    def call(tm=tm, warps=warps):
                        return blockwise._launch(q.t(), 1, C, None, (s.t(), C, 1), config=(tm, warps))
                    tag = "" if same(call(), want) else " (differs)"
                    line(f"{name.split()[0]} TM={tm} warps={warps}{tag}", call, n_bytes)


def main(argv: list[str]) -> None:
    ops_ = calls()
    for name, (fn, n_bytes) in ops_.items():
        line(name, fn, n_bytes)
    if "sweep" in argv:
        sweep(ops_)


if __name__ == "__main__":
    main(sys.argv[1:])
