"""Bad input to ``qtrain train`` / ``qtrain compare`` is one line on stderr, exit code 2, no traceback, and leaves
no run folder behind: invalid numbers, a binary ``--data`` file, errors building or converting the model, and a
``--compile-mode`` the device or the world cannot run."""
import random

import pytest
import torch

import qtrain
from qtrain.cli import build_parser, main
from qtrain.errors import UserError
from qtrain.train import TrainConfig, distributed, loop

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


def _parsed(*argv) -> TrainConfig:
    return TrainConfig.from_namespace(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("command", [["train"], ["compare", "--recipes", "bf16"]])
def test_compile_mode_implies_compile(command):
    cfg = _parsed(*command, "--compile-mode", "reduce-overhead")
    assert cfg.compile and cfg.compile_mode == "reduce-overhead"
    assert _parsed(*command, "--compile-mode", "default").compile
    assert build_parser().parse_args([*command, "--compile-mode", "default"]).compile is True   # given: resume keeps it
    assert _parsed(*command, "--compile").compile_mode == "default"
    plain = _parsed(*command)
    assert not plain.compile and plain.compile_mode == "default"
    with pytest.raises(SystemExit):                     # argparse: not one of the choices
        build_parser().parse_args([*command, "--compile-mode", "max-autotune"])
    with pytest.raises(UserError, match="unknown compile mode 'max-autotune'; accepted: default, reduce-overhead"):
        loop.check_compile_mode(TrainConfig(compile_mode="max-autotune"), torch.device("cpu"), distributed.World())


def test_cuda_graphs_on_cpu_makes_no_run_folder(capsys, tmp_path, corpus):
    out = tmp_path / "run"
    flags = [*FLAGS, "--device", "cpu", "--compile-mode", "reduce-overhead", "--out", str(out)]
    expected = ("--compile-mode reduce-overhead", "CUDA graphs need a CUDA device; got cpu")
    _refused(capsys, out, ["train", "--data", corpus, *flags], *expected)
    _refused(capsys, out, ["compare", "--recipes", "bf16", "--data", corpus, *flags], *expected)


def test_cuda_graphs_under_torchrun_makes_no_run_folder(capsys, tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(loop.distributed, "init", lambda device: (distributed.World(0, 2, 0), torch.device("cuda", 0)))
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "--data", corpus, *FLAGS, "--compile-mode", "reduce-overhead", "--out", str(out)],
             "--compile-mode reduce-overhead under torchrun (2 processes): not supported", "--compile-mode default")
