"""Run-folder safety: a finished run resumes to nothing, ``--out`` never mixes two runs, checkpoint writes and
pruning killed half-way leave only complete ``step-*`` folders, a torn ``log.jsonl`` line does not break resume,
and a run whose loss or weights turn non-finite stops, keeping its last good checkpoint."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain.cli import main
from qtrain.errors import UserError
from qtrain.train import checkpoint, loop

from .cli_checks import one_error_line

# a tiny run: 4 steps of 2 × 32 byte tokens on a small text file, checkpoints at steps 2 and 4
FLAGS = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1",
         "--save-every", "2", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus (instant to tokenize) and a token cache of this module's own."""
    root = tmp_path_factory.mktemp("corpus")
    path = root / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                            for i in range(600)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTRAIN_CACHE", str(root / "cache"))
        yield str(path)


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished 4-step run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", corpus, *FLAGS, "--out", str(out)]) == 0
    return out


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}




# ----------------------------------------------------------------------- 1a: resuming a finished run
def test_resume_finished_run_trains_nothing_and_changes_nothing(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    capsys.readouterr()
    for extra in ([], ["--steps", "4"], ["--steps", "2"]):
        assert main(["train", "--resume", str(run), *extra]) == 0
        captured = capsys.readouterr()
        lines = captured.out.strip().splitlines()
        assert len(lines) == 1, captured.out
        assert "already at step 4" in lines[0] and "--steps" in lines[0] and "nothing to train" in lines[0]
        assert str(run) in lines[0]
        assert "Traceback" not in captured.err
        assert _snapshot(run) == before
    # resuming into a new --out creates nothing either
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "new")]) == 0
    assert not (tmp_path / "new").exists() and _snapshot(run) == before


def test_help_documents_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "-h"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "nothing to train" in text and "exit status" in text.lower()


# ---------------------------------------------------------------------- 1b, 1c: what --out may name
def test_out_refuses_an_existing_run(finished, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    line = one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", str(run)],
                           str(run), f"--resume {run}", "--out")
    assert "already holds a run" in line
    assert _snapshot(run) == before
    # resuming one run into another run's folder is refused too
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    one_error_line(capsys, ["train", "--resume", str(run), "--steps", "6", "--out", str(other)], str(other))
    assert _snapshot(run) == before and _snapshot(other) == before
    # a run stopped before its first checkpoint cannot be resumed: the line says so
    for step in ("step-000002", "step-000004"):
        shutil.rmtree(other / step)
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", str(other)], str(other),
                    "no checkpoint to resume", "another --out")
    # a folder that is not empty but holds no run
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", str(tmp_path / "stuff")],
                    str(tmp_path / "stuff"), "not empty")
    assert [p.name for p in (tmp_path / "stuff").iterdir()] == ["notes.txt"]


def test_out_may_be_an_empty_folder(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", corpus, *FLAGS, "--out", str(empty)]) == 0
    assert (empty / "step-000004").is_dir() and (empty / "summary.json").exists()


def test_out_file_or_unusable_path_is_one_line(corpus, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", str(a_file)], str(a_file), "file")
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", str(a_file / "run")], str(a_file))
    assert a_file.read_text() == "keep me"
    one_error_line(capsys, ["compare", "--recipes", "bf16", "--data", corpus, *FLAGS, "--out", str(a_file)],
                    str(a_file))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, where no folder can be created")
def test_out_unwritable_is_one_line(corpus, capsys):
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", "/proc/qtrain-run"], "/proc/qtrain-run")


# -------------------------------------------------------- 1d, 1e: interrupted checkpoint writes and pruning
def _save(run_dir, step, keep=2):
    torch.manual_seed(step)
    return checkpoint.save(run_dir, step, torch.nn.Linear(3, 2), {"step": step}, {"train": {}}, keep)


def test_orphan_tmp_folders_removed_by_next_save(tmp_path):
    _save(tmp_path, 1)
    orphan = tmp_path / ".tmp-step-abc123"        # a kill during a checkpoint write
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_orphan_tmp_folders_removed_on_resume(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    orphan = run / ".tmp-step-xyz"
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(b"half")
    assert main(["train", "--resume", str(run), "--steps", "5", "--save-every", "100"]) == 0
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".trash-*"))


def test_prune_killed_midway_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    _save(tmp_path, 2)

    def killed(path, *args, **kwargs):             # deletes one file, then the process dies
        (Path(path) / "state.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)                          # prunes step 1
    monkeypatch.undo()
    steps = sorted(p.name for p in tmp_path.glob("step-*"))
    assert steps == ["step-000002", "step-000003"]
    for step in steps:
        assert all((tmp_path / step / f).is_file() for f in checkpoint.FILES), step
    assert checkpoint.find(str(tmp_path)).name == "step-000003"
    _save(tmp_path, 4)                              # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


def test_loader_never_picks_an_incomplete_checkpoint(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    (tmp_path / "step-000004" / "state.pt").unlink()   # as an older qtrain's interrupted pruning left it
    assert checkpoint.find(str(tmp_path)).name == "step-000002"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000002"]
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.find(str(tmp_path / "step-000004"))


# ------------------------------------------------------------------------- 1f: a torn log.jsonl line
def test_truncated_log_line_is_dropped_with_a_warning(finished, tmp_path, capsys):
    cut = tmp_path / "cut"                         # killed while writing step 4's log line, before its save
    cut.mkdir()
    shutil.copytree(finished / "step-000002", cut / "step-000002")
    lines = (finished / "log.jsonl").read_text().splitlines()
    (cut / "log.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])
    capsys.readouterr()
    assert main(["train", "--resume", str(cut)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "log.jsonl" in err and "Traceback" not in err
    records = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    whole = [json.loads(line) for line in lines]                # the resumed run reproduces the whole one
    assert [(r["loss"], r.get("val_loss")) for r in records] == [(r["loss"], r.get("val_loss")) for r in whole]


# ------------------------------------------------------------------------------ 3: non-finite loss
def _poison_after(monkeypatch, n: int):
    """The optimizer fills the first weight with NaN at the end of its ``n``-th step."""
    make = loop.make_optimizer

    def poisoned(name, model, lr, weight_decay):
        opt = make(name, model, lr, weight_decay)
        step, calls = opt.step, [0]

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            calls[0] += 1
            if calls[0] == n:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            return out

        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(loop, "make_optimizer", poisoned)


def _finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _poison_after(monkeypatch, 3)                  # step 4's loss is NaN
    line = one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--steps", "6", "--out", str(out)],
                           "loss is nan at step 4", "stopped", f"last good checkpoint: {out / 'step-000002'}")
    assert line
    assert [p.name for p in out.glob("step-*")] == ["step-000002"] and _finite(out / "step-000002")
    assert not (out / "summary.json").exists()
    assert [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_non_finite_weights_are_never_saved(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _poison_after(monkeypatch, 4)                  # step 4's loss is finite, the weights after it are not
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--steps", "6", "--out", str(out)],
                    "not finite after step 4", f"last good checkpoint: {out / 'step-000002'}")
    assert [p.name for p in out.glob("step-*")] == ["step-000002"] and _finite(out / "step-000002")
    # no good checkpoint at all
    monkeypatch.undo()
    _poison_after(monkeypatch, 1)
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--out", str(tmp_path / "early")],
                    "loss is nan at step 2", "no checkpoint")
    assert not list((tmp_path / "early").glob("step-*"))


def test_huge_lr_stops_with_a_clear_message(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    one_error_line(capsys, ["train", "--data", corpus, *FLAGS, "--steps", "8", "--warmup", "0",
                             "--optimizer", "adamw", "--grad-clip", "0", "--lr", "1e30", "--out", str(out)],
                    "step", "stopped")
    assert all(_finite(p) for p in out.glob("step-*"))
