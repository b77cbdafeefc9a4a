"""Host time of one qtrain operator call through the dispatcher (how torch.compile's code calls them): the
implementation called directly, the ``qtrain::`` operator (:func:`qtrain.ops.custom_op`: one
CompositeExplicitAutograd kernel) and the same function as a ``torch.library.custom_op`` (what qtrain used before).
Launch-bound shapes, so the numbers are host time. Runs on CUDA when present, else on the CPU (reference kernels).

    PYTHONPATH=. python benchmarks/op_dispatch.py
"""
from __future__ import annotations

import time

import torch

from qtrain import ops


def host_us(fn, n=500):
    for _ in range(20):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return us


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


if __name__ == "__main__":
    main()
