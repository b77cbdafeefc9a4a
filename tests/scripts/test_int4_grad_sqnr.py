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


def test_recipe_report_against_the_unquantized_model(script, tmp_path, monkeypatch):
    """``--recipes``: BF16 (nothing converted) is the exact gradient itself; switchback's and jetfire_wide's are
    finite and close; jetfire_wide's stochastic rounding differs between draws, switchback's backward does not."""
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train(TrainConfig(steps=2, save_every=2, eval_every=2, eval_batches=1, batch_size=4, seq_len=64,
                      sample_tokens=0, progress=False, recipe="bf16", out=str(out)))
    text = script.recipe_report(str(out), ["bf16", "switchback", "jetfire_wide"], 4, 64, "cpu")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| layers.") and "weight" in line]
    assert len(rows) == 16
    cell = lambda r, col: [float(v) for v in r[col].split("/")]
    assert all(cell(r, 2) == [float("inf"), float("inf")] for r in rows)               # bf16 converts nothing
    for col in (3, 4):
        assert all(15 < cell(r, col)[0] < 80 for r in rows), [r[col] for r in rows]
    assert all(cell(r, 3)[1] == float("inf") for r in rows)                            # switchback: no SR
    assert all(cell(r, 4)[1] < 80 for r in rows)                                       # jetfire_wide: SR
