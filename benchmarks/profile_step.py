"""Where a training step's GPU time goes: torch.profiler over steps of `qtrain bench e2e`'s LLaMA shapes.

Usage (on the GPU, PYTHONPATH=.): python benchmarks/profile_step.py [--compile|--cudagraphs] [SHAPE] RECIPE...
(SHAPE: 7b or 1b, default 7b; RECIPE: bf16 or a preset / recipe file; --compile: `torch.compile` of the model as
`qtrain bench e2e --modes compile` does, Inductor's fused kernels then appear as `triton_*`; --cudagraphs: the same
with Inductor's CUDA graphs, as `--modes cudagraphs`). Per recipe: the step time, then
the kernels by total GPU time (2 profiled steps after 2 warm-up steps, 3 when compiled), the top 25, and the time
per kind of kernel (INT8 GEMM, 16-bit GEMM, attention, quantize, optimizer, Inductor's fused kernels, the rest);
the GPU's busy time (union of kernel intervals) and idle time per step (the profiled window less busy: host-bound
gaps, syncs); the host time of qtrain's own ops (CPU time from the op's call to its return: argument checks,
launchers, kernel launches — what keeps the GPU idle when the host is the bottleneck; compiled modes only: eager
calls bypass the op dispatcher, so the profiler records no `qtrain::` ops there) and their GPU time per input
shapes (which GEMM or quantize call costs what); then the aten ops with the
most GPU time of their own, by input shapes (where copies and casts come from). User annotations on the GPU
timeline (`## Call CompiledFxGraph`, `Optimizer.step#…`) span other kernels and are left out of every total.
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from qtrain.bench import e2e
from qtrain.train.loop import resolve_recipe

STEPS = 2


KINDS = (  # first match wins: (kind, substrings of the lower-cased kernel name)
    ("int8 gemm", ("block_gemm", "int8_gemm", "_rowwise_gemm", "int4_gemm", "imma")),
    ("attention", ("sdpa", "flash", "fmha", "attention", "compute_dot_do_o", "convert_dq")),
    ("16-bit gemm", ("gemm", "nvjet", "mma", "sm90", "matmul", "cutlass")),
    ("quantize", ("quant", "hadamard", "_rowwise", "_tensorwise", "blockwise", "_transpose_kernel", "bitsplit",
                  "lss", "sr_")),
    ("optimizer", ("_moments_kernel", "_update_kernel", "adam", "multi_tensor")),
    ("norm/act", ("_norm", "_act", "swiglu", "gelu")),
    ("inductor", ("triton_",)),
    ("sort/select", ("sort", "radix", "topk", "kthvalue")),
    ("copy", ("memcpy", "memset", "copy", "elementwise_kernel", "vectorized")),
)


def kind(name: str) -> str:
    low = name.lower()
    for label, keys in KINDS:
        if any(k in low for k in keys):
            return label
    return "other"


def annotation(event) -> bool:
    """GPU-timeline user annotations (they span kernels counted on their own)."""
    return getattr(event, "is_user_annotation", False) or event.key.startswith("## ") or "#" in event.key


def busy_and_window_us(prof) -> tuple[float, float]:
    """Union of the GPU kernel intervals, and first start to last end, in µs."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA" and not annotation(e) and e.time_range.end > e.time_range.start)
    if not spans:
        return 0.0, 0.0
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > cur_e:
            busy, cur_s, cur_e = busy + cur_e - cur_s, a, b
        else:
            cur_e = max(cur_e, b)
    return busy + cur_e - cur_s, spans[-1][1] - spans[0][0]


def profile_recipe(shape: e2e.Shape, name: str, mode: str = "eager") -> None:
    recipe = None if name == "bf16" else resolve_recipe(name)
    if mode in e2e.COMPILED:
        torch._dynamo.reset()
    step, converted = e2e.build_step(shape, recipe, mode, "cuda")
    for _ in range(3 if mode in e2e.COMPILED else 2):         # compile: the first steps compile (int4: twice)
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()
              if e.device_time_total > 0 and e.device_type.name == "CUDA" and not annotation(e)]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / STEPS / 1e3
    timer = e2e.CudaTimer()
    ms = sorted(timer.time_ms(step) for _ in range(5))[2]
    print(f"\n## {shape.name} {mode} {name} ({converted} converted): step {ms:.1f} ms, kernels {total:.1f} ms/step")
    shares = {}
    for e in events:
        shares[kind(e.key)] = shares.get(kind(e.key), 0.0) + e.device_time_total / STEPS / 1e3
    print("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    busy, window = busy_and_window_us(prof)
    print(f"  GPU busy {busy / STEPS / 1e3:.1f} ms/step, idle {(window - busy) / STEPS / 1e3:.1f} ms/step "
          f"(profiled window {window / STEPS / 1e3:.1f} ms/step)")
    for e in events[:25]:
        print(f"  {e.device_time_total / STEPS / 1e3:7.2f} ms  {e.count // STEPS:4d}×  {kind(e.key):8s} {e.key[:110]}")
    host = [e for e in prof.key_averages() if e.key.startswith("qtrain::") and e.cpu_time_total > 0]
    _op_table(f"host time of qtrain ops: {sum(e.cpu_time_total for e in host) / STEPS / 1e3:.1f} ms/step (nested "
              "ops counted in their callers too)", host, lambda e: e.cpu_time_total, 15)
    by_shape = prof.key_averages(group_by_input_shape=True)
    _op_table("qtrain ops by GPU time, per input shapes (their kernels; compiled modes only):",
              [e for e in by_shape if e.key.startswith("qtrain::")], lambda e: e.device_time_total, 20, shapes=True)
    _op_table("aten ops by own GPU time:", [e for e in by_shape if e.key.startswith("aten::")],
              lambda e: e.self_device_time_total, 15, shapes=True)
    del step
    torch.cuda.empty_cache()


def _op_table(title: str, events, time_us, n: int, shapes: bool = False) -> None:
    """The ``n`` events with the most ``time_us(event)`` (µs over the profiled steps): ms per step, calls per
    step, µs per call, name (and input shapes)."""
    events = sorted((e for e in events if time_us(e) > 0), key=lambda e: -time_us(e))
    print(f"  {title}")
    for e in events[:n]:
        print(f"  {time_us(e) / STEPS / 1e3:7.2f} ms  {e.count // STEPS:4d}×  {time_us(e) / max(e.count, 1):7.1f} "
              f"µs/call  {e.key}" + (f" {str(e.input_shapes)[:90]}" if shapes else ""))


def main(argv: list[str]) -> None:
    mode = "cudagraphs" if "--cudagraphs" in argv else "compile" if "--compile" in argv else "eager"
    argv = [a for a in argv if a not in ("--compile", "--cudagraphs")]
    shape = e2e.SHAPES["7b"]
    if argv and argv[0] in e2e.SHAPES:
        shape, argv = e2e.SHAPES[argv[0]], argv[1:]
    for name in argv or ["bf16", "switchback"]:
        profile_recipe(shape, name, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
