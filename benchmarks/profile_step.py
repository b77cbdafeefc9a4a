"""Where a training step's GPU time goes: torch.profiler over steps of `qtrain bench e2e`'s LLaMA shapes.

Usage (on the GPU, PYTHONPATH=.): python benchmarks/profile_step.py [--compile] [SHAPE] RECIPE...   (SHAPE: 7b or
1b, default 7b; RECIPE: bf16 or a preset / recipe file; --compile: `torch.compile` of the model as `qtrain bench
e2e --modes compile` does, Inductor's fused kernels then appear as `triton_*`). Per recipe: the step time, then
the kernels by total GPU time (2 profiled steps after 2 warm-up steps, 3 when compiled), the top 25, and the share
of GEMM kernels, quantize kernels and the rest; then the aten ops with the most GPU time of their own, by input
shapes (where copies and casts come from).
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from qtrain.bench import e2e
from qtrain.train.loop import resolve_recipe

STEPS = 2


def kind(name: str) -> str:
    low = name.lower()
    if "gemm" in low or "mma" in low or "sm90" in low or "matmul" in low or "cutlass" in low:
        return "gemm"
    if "quant" in low or "hadamard" in low or "_rowwise" in low or "_tensorwise" in low or "blockwise" in low:
        return "quantize"
    return "other"


def profile_recipe(shape: e2e.Shape, name: str, mode: str = "eager") -> None:
    recipe = None if name == "bf16" else resolve_recipe(name)
    if mode == "compile":
        torch._dynamo.reset()
    step, converted = e2e.build_step(shape, recipe, mode, "cuda")
    for _ in range(3 if mode == "compile" else 2):            # compile: the first steps compile (int4: twice)
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / STEPS / 1e3
    timer = e2e.CudaTimer()
    ms = sorted(timer.time_ms(step) for _ in range(5))[2]
    print(f"\n## {shape.name} {mode} {name} ({converted} converted): step {ms:.1f} ms, kernels {total:.1f} ms/step")
    shares = {}
    for e in events:
        shares[kind(e.key)] = shares.get(kind(e.key), 0.0) + e.device_time_total / STEPS / 1e3
    print("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(shares.items())))
    for e in events[:25]:
        print(f"  {e.device_time_total / STEPS / 1e3:7.2f} ms  {e.count // STEPS:4d}×  {kind(e.key):8s} {e.key[:110]}")
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.key.startswith("aten::") and e.self_device_time_total > 0]
    ops.sort(key=lambda e: -e.self_device_time_total)
    print("  aten ops by own GPU time:")
    for e in ops[:15]:
        print(f"  {e.self_device_time_total / STEPS / 1e3:7.2f} ms  {e.count // STEPS:4d}×  {e.key} "
              f"{str(e.input_shapes)[:100]}")
    del step
    torch.cuda.empty_cache()


def main(argv: list[str]) -> None:
    mode = "compile" if "--compile" in argv else "eager"
    argv = [a for a in argv if a != "--compile"]
    shape = e2e.SHAPES["7b"]
    if argv and argv[0] in e2e.SHAPES:
        shape, argv = e2e.SHAPES[argv[0]], argv[1:]
    for name in argv or ["bf16", "switchback"]:
        profile_recipe(shape, name, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
