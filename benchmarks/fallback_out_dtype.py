"""Does the output dtype (shared-memory epilogue, hence pipeline depth) explain the fallback GEMM's cost in a
compiled step? The Gluon block GEMM, plain and with the fallback term (5 % of tiles flagged), bf16 and fp32
output, 256-wide scale blocks, on the 7B step's wgrad (K = 8192 tokens) and dgrad shapes; stage counts printed;
the fallback kernel also with its output stored from registers (``direct``: no epilogue tile, one stage more).

Run on the GPU: ``PYTHONPATH=. python benchmarks/fallback_out_dtype.py`` (markdown table on stdout).
"""
from __future__ import annotations

import torch
import triton
from block_gemm_gluon import bench, operands      # benchmarks/block_gemm_gluon.py (this script's directory)

from qtrain.kernels import block_gemm_gluon as glu

CASES = [("wgrad 4096x8192x4096", 4096, 8192, 4096, 1), ("wgrad 11008x8192x4096", 11008, 8192, 4096, 1),
         ("dgrad 8192x11008x4096", 8192, 11008, 4096, 128), ("dgrad 8192x4096x12288", 8192, 4096, 12288, 128)]


def main():
    bk = 256
    print(f"# fallback GEMM by output dtype — {torch.cuda.get_device_name()}, triton {triton.__version__}\n")
    print("| case | out | plain stages | plain µs | fallback stages | fallback µs | fallback / plain "
          "| fallback, stored from registers: stages | µs | / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, M, K, N, rb in CASES:
        a, b, sa, sb = operands(M, K, N, rb, block_k=bk)
        a2 = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        flags = torch.rand(triton.cdiv(M, 128), triton.cdiv(K, bk), device="cuda") < 0.05
        for out in (torch.bfloat16, torch.float32):
            tp = bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, block_k=bk))
            tf = bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, a2, sa, flags, block_k=bk))
            td = bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, a2, sa, flags, block_k=bk, direct=True))
            print(f"| {label} | {str(out)[6:]} | {glu.stages_for(out, False)} | {tp * 1e3:.0f} | "
                  f"{glu.stages_for(out, True, False)} | {tf * 1e3:.0f} | {tf / tp:.2f} | "
                  f"{glu.stages_for(out, True, True)} | {td * 1e3:.0f} | {td / tp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
