"""Shared benchmark plumbing: timing, run metadata, JSON/markdown output."""
from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import torch

from qtrain.errors import UserError


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError("qtrain bench needs a CUDA GPU (none is visible to torch)")


def bench(fn, quick: bool = False) -> float:
    """Median time of ``fn()`` in milliseconds (``triton.testing.do_bench``, L2 flushed before each call)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                   return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph: GPU time without host launch overhead.
    Call ``fn`` once first (autotuning cannot run inside a capture)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def gpu_slug() -> str:
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-").split("-")[0] or "gpu"


def metadata() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(), "sm_count": props.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def write_results(suite: str, rows: list[dict], notes: list[str], out_dir) -> list[Path]:
    """Write ``<date>-<gpu>-<suite>.json`` (metadata + rows) and ``.md`` (a table) under ``out_dir``."""
    meta = metadata()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{meta['date']}-{gpu_slug()}-{suite}"
    stem.with_suffix(".json").write_text(json.dumps({"suite": suite, "meta": meta, "rows": rows,
                                                     "notes": notes}, indent=1) + "\n")
    cols = list(rows[0]) if rows else []
    lines = [f"# qtrain bench {suite}", "",
             f"{meta['gpu']} · torch {meta['torch']} · triton {meta['triton']} · CUDA {meta['cuda']} · "
             f"{meta['date']}", ""]
    if rows:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return [stem.with_suffix(".json"), stem.with_suffix(".md")]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


class partial_results_writer:
    """For long suites: ``writer(rows, notes)`` rewrites ``<date>-<gpu>-<suite>.partial.json`` under ``out_dir``
    (same content as :func:`write_results`' JSON) so that a run killed midway leaves what it measured;
    ``writer.done()`` removes it once the final results are written."""

    def __init__(self, suite: str, out_dir):
        self.suite, self.meta = suite, metadata()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{self.meta['date']}-{gpu_slug()}-{suite}.partial.json"

    def __call__(self, rows: list[dict], notes: list[str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"suite": self.suite, "meta": self.meta, "rows": rows, "notes": notes,
                                   "partial": True}, indent=1) + "\n")
        tmp.replace(self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)
