"""Diagnostics for the GPU (run by scripts/gpu_run.sh): host overhead per call of each kernel wrapper and of
QuantLinear, a cProfile of QuantLinear forward+backward, TMA vs pointer loads, and CUDA scalar division."""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import triton.testing

import qtrain
from qtrain import ops
from qtrain.kernels import int8_gemm as kg
from qtrain.kernels.rowwise import quantize_rowwise
from qtrain.kernels.tensorwise import quantize_tensorwise


def host_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    a = torch.rand(1 << 22, device="cuda") * 100
    kg.TMA_MIN_MNK = 0
    print("cuda a/127 != cpu a/127:", (a / 127.0 != (a.cpu() / 127.0).cuda()).sum().item(),
          "| a/full_like(127) != cpu:", (a / torch.full_like(a, 127.0) != (a.cpu() / 127.0).cuda()).sum().item())

    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_rowwise(x)
    wq, wqt, ws = quantize_tensorwise(x)
    print("host µs per call (tiny shapes: launch-bound):")
    for name, fn in [("empty kernel-less torch add", lambda: x.add(1)),
                     ("kernels.quantize_rowwise", lambda: quantize_rowwise(x)),
                     ("kernels.quantize_tensorwise", lambda: quantize_tensorwise(x)),
                     ("kernels.int8_gemm (TMA)", lambda: kg.int8_gemm(xq, wq, xs, ws, None, torch.bfloat16)),
                     ("ops.quantize_rowwise", lambda: ops.quantize_rowwise(x)),
                     ("ops.int8_gemm", lambda: ops.int8_gemm(xq, wq, xs, ws, None, torch.bfloat16))]:
        print(f"  {name:32s} {host_us(fn):8.1f}")
    kg.TMA_ENABLED = False
    ptr_us = host_us(lambda: kg.int8_gemm(xq, wq, xs, ws, None, torch.bfloat16))
    print(f"  {'kernels.int8_gemm (pointers)':32s} {ptr_us:8.1f}")
    kg.TMA_ENABLED = True

    layer = qtrain.QuantLinear(1024, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(1024, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    xx = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)

    def step(m):
        m.weight.grad = None
        m(xx).backward(dy)
    print(f"  {'QuantLinear fwd+bwd':32s} {host_us(lambda: step(layer), 100):8.1f}")
    print(f"  {'nn.Linear fwd+bwd':32s} {host_us(lambda: step(lin), 100):8.1f}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        step(layer, True)
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])

    from qtrain.kernels import rowwise as kr
    for K in (11008, 16384):
        xr = torch.randn(16384, K, device="cuda", dtype=torch.bfloat16)
        res = []
        for one_pass in (False, True):
            kr._MAX_BLOCK_K = 16384 if one_pass else 8192
            t = triton.testing.do_bench(lambda: kr.quantize_rowwise(xr), return_mode="median")
            res.append(f"{'one pass' if one_pass else 'loop'} {xr.numel() * 3 / t / 1e9:.2f} TB/s")
        kr._MAX_BLOCK_K = 8192
        print(f"rowwise 16384x{K}: " + " | ".join(res))
    kg.TMA_MIN_MNK = 0
    print("TMA vs pointer loads (TOP/s), M×K×N:")
    for M, K, N in [(16384, 4096, 4096), (16384, 11008, 4096), (8192, 2048, 2048), (8192, 1024, 1024)]:
        A = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        B = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        sa, sb = torch.rand(M, device="cuda"), torch.tensor(1e-3, device="cuda")
        res = []
        for tma in (True, False):
            kg.TMA_ENABLED = tma
            t = triton.testing.do_bench(lambda: kg.int8_gemm(A, B, sa, sb, None, torch.bfloat16),
                                        return_mode="median")
            res.append(f"{'tma' if tma else 'ptr'} {2 * M * N * K / t / 1e9:7.1f} ({kg._int8_gemm_kernel.best_config})")
        kg.TMA_ENABLED = True
        print(f"  {M}x{K}x{N}: " + " | ".join(res))


if __name__ == "__main__":
    main()
