"""Does the output dtype (shared-memory epilogue, hence pipeline depth) explain the fallback GEMM's cost in a
compiled step? The Gluon block GEMM, plain and with the fallback term (5 % of tiles flagged), bf16 and fp32
output, on the 7B step's wgrad (K = 8192 tokens) and dgrad shapes; stage counts printed;
128- and 256-wide scale blocks; the epilogue two ways: the whole tile through shared memory and TMA, or two column
halves through a half-size tile (``split``, one ring stage more for the fallback kernel with fp32 output). A third
way, storing from registers (no tile), measured 1.13-1.26x the plain kernel and was dropped
(benchmarks/results/2026-12-01-h200-fallback-epilogue.md).

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
    print(f"# fallback GEMM by output dtype — {torch.cuda.get_device_name()}, triton {triton.__version__}\n")
    print("epilogue: whole — the tile through shared memory and TMA; split — two column halves through a half-size "
          "tile. µs, and / plain (the kernel without the fallback term, whole-tile epilogue, same output dtype).\n")
    print("| case | block_k | out | plain stages | plain µs | fallback whole: stages | µs | / plain "
          "| fallback split: stages | µs | / plain | plain split: stages | µs | / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for bk in (128, 256):
        for label, M, K, N, rb in CASES:
            a, b, sa, sb = operands(M, K, N, rb, block_k=bk)
            a2 = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            flags = torch.rand(triton.cdiv(M, 128), triton.cdiv(K, bk), device="cuda") < 0.05
            for out in (torch.bfloat16, torch.float32):
                tp = bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, block_k=bk, split=1))
                cells = []
                for split in (1, 2):
                    t = bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, a2, sa, flags, block_k=bk, split=split))
                    cells += [glu.stages_for(out, True, split), f"{t * 1e3:.0f}", f"{t / tp:.2f}"]
                t = bench(lambda: glu.launch(a, b, sa, sb, rb, None, out, block_k=bk, split=2))
                cells += [glu.stages_for(out, False, 2), f"{t * 1e3:.0f}", f"{t / tp:.2f}"]
                print(f"| {label} | {bk} | {str(out)[6:]} | {glu.stages_for(out, False)} | {tp * 1e3:.0f} | "
                      + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
