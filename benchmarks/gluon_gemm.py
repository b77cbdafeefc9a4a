"""Gluon INT8 GEMM (qtrain/kernels/int8_gemm_gluon.py) vs the Triton kernel and cuBLAS BF16, same run.
Checks correctness against the exact reference first; a config that fails to compile or is wrong is reported
and skipped. Run on the GPU: `PYTHONPATH=. python benchmarks/gluon_gemm.py`."""
from __future__ import annotations

import traceback

import torch
import triton.testing

from qtrain import quant
from qtrain.kernels import int8_gemm as tri
from qtrain.kernels import int8_gemm_gluon as glu

SHAPES = [(16384, 4096, 4096), (16384, 4096, 11008), (16384, 11008, 4096), (8192, 2048, 2048),
          (8192, 1024, 1024)]
CONFIGS = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 64, 4, 8), (128, 128, 128, 4, 4)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    bad = set()
    for M, K, N in SHAPES:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        sa = torch.rand(M, device="cuda") * 1e-2 + 1e-3
        sb = torch.tensor(2e-3, device="cuda")
        bias = torch.randn(N, device="cuda")
        a16, b16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda",
                                                                                        dtype=torch.bfloat16)
        ops = 2 * M * N * K
        line = [f"{M}x{K}x{N}", f"bf16 {ops / bench(lambda: a16 @ b16.t()) / 1e9:6.0f}",
                f"triton {ops / bench(lambda: tri.int8_gemm(a, b, sa, sb, None, torch.bfloat16)) / 1e9:6.0f}"]
        for cfg in CONFIGS:
            if cfg in bad or not glu.supported(a, b, torch.bfloat16, cfg):
                line.append(f"{cfg}: n/a")
                continue
            try:
                ref = quant.int8_gemm(a, b, sa, sb, bias, torch.float32)
                e32 = quant.relative_error(ref, glu.int8_gemm(a, b, sa, sb, bias, torch.float32, config=cfg))
                e16 = quant.relative_error(ref, glu.int8_gemm(a, b, sa, sb, bias, torch.bfloat16, config=cfg))
                sbr = torch.rand(N, device="cuda") * 1e-3
                erow = quant.relative_error(quant.int8_gemm(a, b, sa, sbr, None, torch.float32),
                                            glu.int8_gemm(a, b, sa, sbr, None, torch.float32, config=cfg))
                if not (e32 <= 1e-5 and e16 <= 4e-3 and erow <= 1e-5):
                    line.append(f"{cfg}: WRONG e32={e32:.2e} e16={e16:.2e} erow={erow:.2e}")
                    continue
                t = bench(lambda: glu.int8_gemm(a, b, sa, sb, None, torch.bfloat16, config=cfg))
                line.append(f"{cfg}: {ops / t / 1e9:6.0f}")
            except Exception:
                bad.add(cfg)
                line.append(f"{cfg}: FAILED")
                traceback.print_exc(limit=3)
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
