"""`qtrain bench`: argument parsing, the no-GPU error, and the result files' names and contents."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from qtrain import bench
from qtrain.bench import common
from qtrain.errors import UserError


def _parser():
    p = argparse.ArgumentParser()
    bench.add_commands(p.add_subparsers(dest="command"))
    return p


def test_parses_suites_and_rejects_unknown():
    args = _parser().parse_args(["bench", "gemm", "--out", "x", "--quick"])
    assert args.func is bench.run and args.suite == "gemm" and args.out == "x" and args.quick
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_needs_cuda():
    with pytest.raises(UserError, match="CUDA"):
        bench.run(_parser().parse_args(["bench", "quant"]))


def test_write_results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "metadata", lambda: {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11",
                                                     "triton": "3.6.0", "cuda": "13.0", "date": "2026-11-25"})
    monkeypatch.setattr(common, "gpu_slug", lambda: "h100")
    paths = common.write_results("gemm", [{"M": 1, "tops": 1234.5}], ["a note"], tmp_path)
    assert [p.name for p in paths] == ["2026-11-25-h100-gemm.json", "2026-11-25-h100-gemm.md"]
    data = json.loads(paths[0].read_text())
    assert data["meta"]["gpu"].startswith("NVIDIA") and data["rows"][0]["tops"] == 1234.5
    assert "| 1 | 1234.5 |" in paths[1].read_text() and "a note" in paths[1].read_text()


def test_blockwise_quant_rows_check_the_kernel(monkeypatch):
    """The blockwise rows of the quant suite on tiny shapes (CPU, interpreter; a wall-clock ``bench``)."""
    import time

    from qtrain.bench import quant as suite

    def wall_ms(fn, quick):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(suite, "bench", wall_ms)
    cases = [("x", (64, 256), torch.bfloat16, (1, 128), False, False),
             ("dYT SR", (256, 64), torch.bfloat16, (1, 128), True, True),
             ("WT", (128, 256), torch.float32, (128, 128), True, False)]
    rows = suite._blockwise_rows(False, cases, device="cpu")
    assert [r["kernel"] for r in rows] == ["blockwise x", "blockwise dYT SR", "blockwise WT"]
    assert rows[1]["shape"] == "256x64ᵀ" and all(r["time_us"] > 0 for r in rows)
    rows = suite._blockwise_dual_rows(False, [("dY dual SR", (96, 160), torch.bfloat16, 32)], device="cpu")
    assert rows[0]["kernel"] == "blockwise dY dual SR" and rows[0]["two_calls_us"] > 0
    rows = suite._fallback_rows(False, [("x", (200, 260), False, 0.25), ("dYT", (260, 130), True, 1.0),
                                        ("dY SR", (200, 260), False, 0.25, True)], device="cpu")
    assert [r["kernel"] for r in rows] == ["fallback x", "fallback dYT", "fallback dY SR"]
    assert 0 < rows[0]["flagged"] < 1 and rows[1]["flagged"] == 1.0 and rows[2]["flagged"] == rows[0]["flagged"]
    rows = suite._transpose_rows(False, ((130, 70),), device="cpu")
    assert rows[0]["kernel"] == "transpose int8" and rows[0]["time_us"] > 0
