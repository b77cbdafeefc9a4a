"""scripts/int4_grad_sqnr.py on a two-step checkpoint: one row per 2-D parameter, the per-token split with every
row kept closer to the exact-dY gradients than METHODS.md's per-tensor split with sampling, step gradients listed."""
import statistics

import pytest

from qtrain.train import TrainConfig, train


@pytest.fixture()
def script(load_script):
    return load_script("int4_grad_sqnr")


def test_report_on_a_checkpoint(script, tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train(TrainConfig(steps=2, save_every=2, eval_every=2, eval_batches=1, batch_size=4, seq_len=64,
                      sample_tokens=0, progress=False, recipe="bf16", out=str(out)))
    text = script.report(str(out), 4, 64, "cpu")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| layers.") and "weight" in line]
    assert len(rows) == 4 * 4                                   # llama-tiny: 4 blocks × (wqkv, wo, w_gate_up, w_down)
    vs_exact = lambda col: [float(r[col].split("/")[0]) for r in rows]
    names = [v.name for v in script.VARIANTS]
    tensor, row_all = vs_exact(2 + names.index("tensor_lss1.5")), vs_exact(2 + names.index("row_all"))
    assert statistics.median(row_all) > statistics.median(tensor) + 3
    assert text.count("int4_step |") == 16
