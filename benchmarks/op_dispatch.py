"""Host time of one qtrain operator call through the dispatcher (how torch.compile's code calls them): the
implementation called directly, the ``qtrain::`` operator (:func:`qtrain.ops.custom_op`: one
CompositeExplicitAutograd kernel) and the same function as a ``torch.library.custom_op`` (what qtrain used before).
Launch-bound shapes, so the numbers are host time. Runs on CUDA when present, else on the CPU (reference kernels).
On CUDA also where a direct call's host time goes: the block quantize kernel launched by Triton's ``JITFunction``
with prebuilt arguments, the same compiled kernel launched directly (``CompiledKernel[grid]``: no binder, cache
key or global checks), output allocation, and a cProfile of the direct calls.

    PYTHONPATH=. python benchmarks/op_dispatch.py
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import triton

from qtrain import ops


def host_us(fn, n=200, repeats=7):
    """Median over ``repeats`` loops of ``n`` calls of the host µs per call (single loops moved by tens of µs
    between calls on the H200's host)."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sorted(times)[repeats // 2]


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
    a = torch.randint(-127, 128, (256, 256), dtype=torch.int8, device=dev)
    sa, sb = torch.rand(256, 2, device=dev), torch.rand(2, 2, device=dev)
    cases = {
        "quantize_blockwise": (ops._quantize_blockwise, (x, 1, 128)),
        "block_int8_gemm": (ops._block_int8_gemm, (a, a, sa, sb, 1, 128, 128, None, torch.bfloat16)),
    }
    print(f"host µs per call on {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}")
    print(f"{'op':22s} {'direct':>8s} {'qtrain op':>10s} {'custom_op':>10s}")
    for name, (fn, args) in cases.items():
        new = ops.OPS[name].overload
        schema = str(new._schema)
        old = torch.library.custom_op(f"qtrain_bench::{name}", fn, mutates_args=(), schema=schema[schema.index("("):])
        print(f"{name:22s} {host_us(lambda: fn(*args)):8.1f} {host_us(lambda: new(*args)):10.1f} "
              f"{host_us(lambda: old(*args)):10.1f}")

    if dev == "cuda":
        launch_pieces(x)
        for name, (fn, args) in cases.items():
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(300):
                fn(*args)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
            print(f"cProfile of 300 direct {name} calls (tottime):\n{out.getvalue()[:4000]}")


def launch_pieces(x: torch.Tensor) -> None:
    """Host µs of the pieces of one ``quantize_blockwise`` call (RTN, 1×128 blocks)."""
    from qtrain.kernels import blockwise as kbw
    M, K = x.shape
    nr, nc = M, K // 128
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((nr, nc), dtype=torch.float32, device=x.device)
    tm, warps = kbw.launch_config(M, 1, 128)
    grid = (triton.cdiv(M, tm), nc)
    args = (x, q, s, s, s, M, K, x.stride(0), x.stride(1), s.stride(0), s.stride(1), nr, nc)
    meta = dict(R=1, C=128, TM=tm, SR=False, XR=1, XC=1, SCALED_INPUT=False, DOWN=False)
    compiled = kbw._blockwise_kernel[grid](*args, **meta, num_warps=warps)
    if compiled is None:                           # Triton's interpreter returns no compiled kernel
        print("launch pieces: no compiled kernel (interpreter)")
        return
    full = (*args, *meta.values())
    grid3 = (*grid, 1)                             # a CompiledKernel takes all three grid dims
    pieces = {
        "checks + launch config": lambda: (kbw.check_2d(x), kbw.check_float(x), kbw.check_block(1, 128),
                                           kbw.launch_config(M, 1, 128)),
        "two torch.empty": lambda: (torch.empty((M, K), dtype=torch.int8, device=x.device),
                                    torch.empty((nr, nc), dtype=torch.float32, device=x.device)),
        "JITFunction launch": lambda: kbw._blockwise_kernel[grid](*args, **meta, num_warps=warps),
        "CompiledKernel launch": lambda: compiled[grid3](*full),
        "whole kernels.quantize_blockwise": lambda: kbw.quantize_blockwise(x, 1, 128),
    }
    print("host µs of the pieces of one quantize_blockwise call:")
    for name, fn in pieces.items():
        try:
            print(f"  {name:34s} {host_us(fn):8.1f}")
        except Exception as e:                     # a diagnostic: report and go on
            print(f"  {name:34s} failed: {type(e).__name__}: {e}")
    q2 = torch.empty_like(q)
    compiled[grid3](x, q2, s, s, s, *args[5:], *meta.values())
    print("  CompiledKernel launch writes what the JIT launch writes:", torch.equal(q, q2))


if __name__ == "__main__":
    main()
