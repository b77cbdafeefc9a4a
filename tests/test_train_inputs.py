"""Bad input to ``qtrain train`` / ``qtrain compare`` is one line on stderr, exit code 2, no traceback, and leaves
no run folder behind: invalid numbers, a binary ``--data`` file, and errors building or converting the model."""
import random

import pytest

import qtrain
from qtrain.cli import main
from qtrain.train import loop

from .cli_checks import one_error_line

FLAGS = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--sample-tokens", "0",
         "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    path = root / "text.txt"
    path.write_text("".join(f"line {i}: pack my box with five dozen liquor jugs\n" for i in range(400)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTRAIN_CACHE", str(root / "cache"))
        yield str(path)


def _refused(capsys, out, argv, *expected):
    """``argv`` fails with one ``qtrain <command>: error:`` line holding ``expected``, and ``out`` is not created."""
    one_error_line(capsys, argv, *expected)
    assert not out.exists(), f"{out} was created"


@pytest.mark.parametrize("flag,value,expected", [
    ("--lr", "-1", "--lr must be"), ("--lr", "nan", "--lr must be"), ("--lr", "inf", "--lr must be"),
    ("--lr", "0", "--lr must be"), ("--weight-decay", "-0.1", "--weight-decay must be"),
    ("--weight-decay", "nan", "--weight-decay must be"), ("--grad-clip", "-1", "--grad-clip must be"),
    ("--grad-clip", "nan", "--grad-clip must be"), ("--warmup", "-3", "--warmup must be"),
    ("--sample-tokens", "-5", "--sample-tokens must be"), ("--seed", "-1", "--seed must be"),
    ("--seed", str(2**64), "--seed must be"), ("--steps", "0", "--steps must be"),
    ("--steps", "-5", "--steps must be"), ("--batch-size", "0", "--batch-size must be"),
    ("--grad-accum", "-1", "--grad-accum must be"), ("--seq-len", "0", "--seq-len must be"),
    ("--save-every", "0", "--save-every must be"), ("--eval-batches", "0", "--eval-batches must be"),
])
def test_invalid_numbers(capsys, tmp_path, corpus, flag, value, expected):
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "--data", corpus, *FLAGS, flag, value, "--out", str(out)], expected, value)
    _refused(capsys, out, ["compare", "--recipes", "bf16", "--data", corpus, *FLAGS, flag, value, "--out",
                           str(out)], expected)


def test_binary_data_file(capsys, tmp_path, corpus):
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(0).randbytes(10_000))
    out = tmp_path / "run"
    for path in (png, noise):
        _refused(capsys, out, ["train", "--data", str(path), *FLAGS, "--out", str(out)],
                 str(path), "not a text file", "stdlib", "folder")


def test_unknown_recipe_makes_no_run_folder(capsys, tmp_path, corpus):
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "--data", corpus, *FLAGS, "--recipe", "nope", "--out", str(out)], "'nope'")
    _refused(capsys, out, ["compare", "--recipes", "bf16,nope", "--data", corpus, *FLAGS, "--out", str(out)],
             "'nope'")


@pytest.mark.parametrize("error", [ValueError, TypeError, NotImplementedError])
def test_convert_error_makes_no_run_folder(capsys, tmp_path, corpus, monkeypatch, error):
    def convert(*args, **kwargs):
        raise error("this recipe cannot convert that layer")

    monkeypatch.setattr(qtrain, "convert", convert)
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "--data", corpus, *FLAGS, "--recipe", "switchback", "--out", str(out)],
             "switchback", "cannot convert that layer")
    _refused(capsys, out, ["compare", "--recipes", "switchback", "--data", corpus, *FLAGS, "--out", str(out)],
             "switchback", "cannot convert that layer")


def test_model_build_error_makes_no_run_folder(capsys, tmp_path, corpus, monkeypatch):
    def build(*args, **kwargs):
        raise ValueError("n_heads must divide d_model")

    monkeypatch.setattr(loop.models, "build_from_config", build)
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "--data", corpus, *FLAGS, "--out", str(out)], "n_heads must divide d_model")


def test_fsdp_without_torchrun_makes_no_run_folder(capsys, tmp_path, corpus):
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "--data", corpus, *FLAGS, "--fsdp", "--out", str(out)], "--fsdp", "torchrun")
