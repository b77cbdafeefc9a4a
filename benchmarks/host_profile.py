"""Where a SwitchBack layer's host time goes, and what CUDA graphs recover (run on the GPU, PYTHONPATH=.).

1. cProfile of QuantLinear forward+backward in eager mode (weight cached), on a launch-bound shape.
2. fwd+bwd time (CUDA events over many steps, so host gaps count) of nn.Linear vs QuantLinear, eager and under
   ``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graphs), bf16, at shapes below and at the crossover.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import triton.testing

import qtrain


def _step_fn(m, x, dy):
    def step():
        m(x).backward(dy)
    return step


def profile_eager():
    layer = qtrain.QuantLinear(1024, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    step = _step_fn(layer, x, dy)
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        step()
    print(f"eager QuantLinear fwd+bwd host: {(time.perf_counter() - t) / 200 * 1e6:.1f} µs")
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(100):
        step()
    torch.cuda.synchronize()
    pr.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(22)
        print("\n".join(line[:150] for line in s.getvalue().splitlines()[4:]))


def compare(shapes):
    print("| tokens | in=out | bf16 eager ms | sb eager ms | bf16 graph ms | sb graph ms | eager × | graph × |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens, d in shapes:
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        res = {}
        for name, make in (("bf16", lambda: torch.nn.Linear(d, d, bias=False)),
                           ("sb", lambda: qtrain.QuantLinear(d, d, bias=False, recipe="switchback"))):
            m = make().to("cuda", torch.bfloat16)
            res[name, "eager"] = triton.testing.do_bench(_step_fn(m, x, dy), return_mode="median")
            torch._dynamo.reset()
            try:
                step = _step_fn(torch.compile(m, mode="reduce-overhead"), x, dy)
                for _ in range(3):
                    step()
                res[name, "graph"] = triton.testing.do_bench(step, return_mode="median")
            except Exception as e:  # report and go on: whether CUDA graphs capture the layer is the question
                print(f"{name} d={d}: reduce-overhead failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                res[name, "graph"] = float("nan")
        print(f"| {tokens} | {d} | {res['bf16', 'eager']:.3f} | {res['sb', 'eager']:.3f} | "
              f"{res['bf16', 'graph']:.3f} | {res['sb', 'graph']:.3f} | "
              f"{res['bf16', 'eager'] / res['sb', 'eager']:.2f} | {res['bf16', 'graph'] / res['sb', 'graph']:.2f} |",
              flush=True)


if __name__ == "__main__":
    profile_eager()
    compare([(16384, 768), (16384, 2048), (4096, 4096)])
