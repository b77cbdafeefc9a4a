"""scripts/distributed_report.py on synthetic run folders: DDP/FSDP2 loss differences against one process on the
same global batch, tokens/s against one process with half the batch, missing runs named."""
import json
from pathlib import Path

import pytest


@pytest.fixture()
def script(load_script):
    return load_script("distributed_report")


def _run(folder: Path, losses, val_loss, tokens_per_s, torn_line=False):
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": v}) for i, v in enumerate(losses)]
    (folder / "log.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 9, \"lo" if torn_line else "\n"))
    (folder / "summary.json").write_text(json.dumps({"final_val_loss": val_loss, "tokens_per_s": tokens_per_s}))


def test_report_rows_and_missing_runs(script, tmp_path):
    _run(tmp_path / "int4-1gpu", [4.0, 3.0, 2.0], 2.5, 1000.0)
    _run(tmp_path / "int4-ddp", [4.0, 3.03, 2.0], 2.525, 1900.0, torn_line=True)
    _run(tmp_path / "int4-fsdp", [4.0, 3.0, 1.98], 2.5, 1800.0)
    _run(tmp_path / "int4-1gpu-half", [4.1, 3.1, 2.1], 2.6, 1000.0)
    _run(tmp_path / "bf16-1gpu", [4.0], 2.5, 1000.0)
    data, text = script.report(tmp_path)
    ddp, fsdp = data["recipes"]["int4"]["ddp"], data["recipes"]["int4"]["fsdp"]
    assert ddp["max_loss_rel_diff"] == pytest.approx(0.01) and ddp["val_loss_rel_diff"] == pytest.approx(0.01)
    assert ddp["scaling"] == pytest.approx(1.9) and fsdp["scaling"] == pytest.approx(1.8)
    assert fsdp["max_loss_rel_diff"] == pytest.approx(0.01) and fsdp["val_loss_rel_diff"] == 0
    assert "| int4 | DDP | 1.00e-02 | +1.000 % | 1,900 | 1.90× |" in text
    assert "| bf16 | FSDP2 | - | - | - | - |" in text
    assert data["missing"] == ["bf16-ddp", "bf16-fsdp", "bf16-1gpu-half"]
    assert "Missing or unfinished runs: bf16-ddp, bf16-fsdp, bf16-1gpu-half." in text


def test_main_writes_the_files_and_refuses_a_missing_folder(script, tmp_path, capsys):
    _run(tmp_path / "runs" / "bf16-1gpu", [4.0], 2.5, 1000.0)
    assert script.main([str(tmp_path / "runs"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "distributed.json").read_text())["missing"] == [
        "bf16-ddp", "bf16-fsdp", "bf16-1gpu-half"]
    assert (tmp_path / "out" / "distributed.md").read_text().startswith("| recipe | mode |")
    assert script.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
