"""``qtrain inspect``: outlier and per-granularity INT8 statistics of a checkpoint's GEMM operands."""
import json

import pytest
import torch
from torch import nn

from qtrain.cli import main
from qtrain.models import build
from qtrain.quant.testing import outlier_data
from qtrain.train import TrainConfig, train
from qtrain.train.inspection import GRANULARITIES, collect, operand_stats


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))


def test_operand_stats_see_outlier_channels():
    x = outlier_data(512, 512, n_outlier_channels=4, magnitude=50.0, seed=0)
    s = operand_stats(x, "x")
    assert s.outlier_channels == pytest.approx(4 / 512)
    assert s.absmax_over_rms > 20
    # Channel outliers sit in every row: 1×128 blocks confine them to one block of each row.
    assert s.sqnr_db["tensor"] < s.sqnr_db["row"] < s.sqnr_db["1x128"] - 2
    g = operand_stats(torch.randn(512, 512, generator=torch.Generator().manual_seed(1)), "x")
    assert g.outlier_channels == 0 and g.absmax_over_rms < 6
    assert all(35 < v < 45 for v in g.sqnr_db.values()), g.sqnr_db
    assert operand_stats(torch.randn(64, 256), "w").outlier_channels is None
    assert set(operand_stats(torch.randn(64, 256), "w").sqnr_db) == set(GRANULARITIES["w"])


def test_collect_every_linear_and_leaves_no_hooks():
    model = build("llama-tiny", n_layer=1)
    x = torch.randint(0, 256, (2, 16))
    stats = collect(model, [(x, x.roll(-1, 1))] * 2)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [s.name for s in stats] == linears and linears[-1] == "lm_head"
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert stats[0].shape == f"{model.config.d_model}→{stats[0].shape.split('→')[1]}"


def test_inspect_command_writes_table_json_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(model="gpt2-tiny", recipe="fallback", steps=2, batch_size=2, seq_len=32, eval_batches=1,
                      sample_tokens=0, progress=False, out=str(run)))    # its per-layer thresholds load too
    assert main(["inspect", str(run), "--batches", "1"]) == 0
    out = run / "inspect"
    rows = json.loads((out / "inspect.json").read_text())
    model = build("gpt2-tiny")
    assert [r["name"] for r in rows] == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(r["dy"]["sqnr_db"]["1x128"] > 0 for r in rows)
    assert all(r["x"]["sqnr_db"]["1x128+fb"] >= r["x"]["sqnr_db"]["1x128"] - 0.01 for r in rows)
    assert "| lm_head |" in (out / "inspect.md").read_text() and "| lm_head |" in capsys.readouterr().out
    assert (out / "inspect.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--batches", "0"]) == 2
    assert "--batches must be at least 1" in capsys.readouterr().err


def test_jetfire_run_reports_and_inspects_its_dataflow_linears(tmp_path, capsys):
    """A jetfire run: its quantization report lists the linears inside the data-flow blocks with their errors,
    and ``qtrain inspect`` loads its checkpoint into the plain model and shows every linear."""
    run = tmp_path / "run"
    train(TrainConfig(model="gpt2-tiny", recipe="jetfire", steps=2, batch_size=2, seq_len=32, eval_batches=1,
                      sample_tokens=0, progress=False, out=str(run)))
    report = (run / "quant_report.txt").read_text()
    model = build("gpt2-tiny")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1
    for name in linears[:-1]:
        row = next(line.split() for line in report.splitlines() if line.startswith(name + " "))
        assert row[2] == "jetfire" and float(row[5]) > 20, row
    assert "lm_head" not in report
    assert main(["inspect", str(run), "--batches", "1"]) == 0
    rows = json.loads((run / "inspect" / "inspect.json").read_text())
    assert [r["name"] for r in rows] == linears
    assert "| transformer.h.0.attn.c_attn |" in capsys.readouterr().out
