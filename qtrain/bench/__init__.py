"""``qtrain bench gemm|linear|quant|block|all|e2e``: benchmark suites for the current GPU.

Each suite times qtrain's kernels against the BF16 (and ``torch._int_mm``) baselines in the same process,
checks correctness before timing, and writes ``<out>/<date>-<gpu>-<suite>.{json,md}``. torch and Triton are
imported inside the suites, so ``qtrain --help`` works without a GPU. ``e2e`` (whole LLaMA training steps,
bf16 vs every recipe, eager and compiled; minutes) is not part of ``all``.
"""
from __future__ import annotations

SUITES = ("gemm", "linear", "quant", "block")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark qtrain's kernels against BF16 on the current GPU",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=SUITES + ("all", "e2e"),
                   help="which suite to run ('all': every kernel suite; 'e2e': training steps, its own options)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON/markdown results")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (a smoke run)")
    from qtrain.bench import e2e
    e2e.add_arguments(p.add_argument_group("e2e options"), common=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from qtrain.bench.common import require_cuda, write_results

    if args.suite == "e2e":
        from qtrain.bench import e2e
        return e2e.run(args)
    require_cuda()
    for suite in SUITES if args.suite == "all" else (args.suite,):
        module = __import__(f"qtrain.bench.{suite}", fromlist=["run_suite"])
        rows, notes = module.run_suite(quick=args.quick)
        paths = write_results(suite, rows, notes, args.out)
        print(f"wrote {', '.join(map(str, paths))}")
    return 0
