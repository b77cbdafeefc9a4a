"""``qtrain train`` / ``qtrain compare`` on the command line: bad input is one line on stderr, exit code 2, no
traceback; a short run succeeds."""
import json

import pytest

from qtrain.cli import main


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))


def _error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"qtrain {argv[0]}: error: ")
    for text in expected:
        assert text in lines[0], lines[0]


def test_unknown_names(capsys):
    _error(capsys, ["train", "--model", "llama-7b"], "'llama-7b'", "llama-tiny", "gpt2-small")
    _error(capsys, ["train", "--recipe", "fp4"], "'fp4'", "bf16", "switchback")
    _error(capsys, ["train", "--tokenizer", "spm"], "'spm'", "bytes", "gpt2")
    _error(capsys, ["train", "--optimizer", "sgd"], "'sgd'", "stableadamw", "adamw")
    _error(capsys, ["train", "--precision", "fp8"], "'fp8'", "auto", "fp32", "bf16")
    _error(capsys, ["compare", "--recipes", "bf16,fp4"], "'fp4'", "switchback")
    _error(capsys, ["train", "--eval-every", "0"], "--eval-every must be at least 1")
    _error(capsys, ["train", "--device", "tpu"], "'tpu'", "cpu", "cuda")


def test_bad_data_paths(capsys, tmp_path):
    _error(capsys, ["train", "--data", str(tmp_path / "missing.txt")], "no such file or folder", "stdlib")
    (tmp_path / "empty").mkdir()
    _error(capsys, ["train", "--data", str(tmp_path / "empty")], "holds no text")
    (tmp_path / "short.txt").write_text("tiny\n")
    _error(capsys, ["train", "--data", str(tmp_path / "short.txt")], "too few for --seq-len")


def test_seq_len_too_long(capsys):
    _error(capsys, ["train", "--seq-len", "4096"], "--seq-len 4096", "at most 512")


def test_bad_checkpoints(capsys, tmp_path):
    run = tmp_path / "run"
    args = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--sample-tokens", "0",
            "--no-progress", "--out", str(run)]
    assert main(["train", *args]) == 0
    assert "final val loss" in capsys.readouterr().out
    _error(capsys, ["train", "--resume", str(run), "--model", "gpt2-tiny"], "--model llama-tiny")
    _error(capsys, ["train", "--resume", str(tmp_path / "nope")], "no such checkpoint")
    (run / "step-000002" / "model.safetensors").write_bytes(b"\x00" * 100)
    _error(capsys, ["train", "--resume", str(run)], "corrupt", "model.safetensors")
    (run / "step-000002" / "config.json").write_text("{not json")
    _error(capsys, ["train", "--resume", str(run / "step-000002")], "corrupt", "config.json")


def test_side_by_side_runs_prefix_their_lines(capsys, tmp_path):
    """A --jobs worker's printed lines carry its run folder's name (the runs' lines interleave in one log)."""
    from qtrain.train.compare import _train_one
    from qtrain.train.config import TrainConfig
    cfg = TrainConfig(recipe="bf16", steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1,
                      sample_tokens=0, progress=False, out=str(tmp_path / "int4-seed3"))
    _train_one(cfg, threads=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines and all(line.startswith("[int4-seed3] ") for line in lines), lines[:3]
    assert any("step 2: loss" in line for line in lines)


def test_compare_cli(capsys, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--recipes", "bf16,switchback", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| switchback |" in printed and (out / "compare.png").exists() and (out / "compare.md").exists()
    assert main([*argv[:-1], str(tmp_path / "side-by-side"), "--jobs", "2"]) == 0     # one process per recipe
    together = json.loads((tmp_path / "side-by-side" / "compare.json").read_text())
    alone = json.loads((out / "compare.json").read_text())
    assert [s["final_val_loss"] for s in together] == [s["final_val_loss"] for s in alone]
    assert "2 runs trained at a time" in (tmp_path / "side-by-side" / "compare.md").read_text()
    _error(capsys, ["compare", "--jobs", "0"], "--jobs 0")


def test_compare_over_seeds(capsys, tmp_path):
    """``--seeds``: every recipe once per seed (its own folder and seed), the table pairs each run with bf16 of
    the same seed; --seed and --seeds together and bad seed lists are refused."""
    out = tmp_path / "seeds"
    argv = ["compare", "--recipes", "bf16,switchback", "--seeds", "3,4", "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    runs = json.loads((out / "compare.json").read_text())
    assert [(s["recipe"], s["seed"]) for s in runs] == [("bf16", 3), ("bf16", 4), ("switchback", 3), ("switchback", 4)]
    for s in runs:
        config = json.loads((out / f"{s['recipe']}-seed{s['seed']}" / "config.json").read_text())
        assert config["train"]["seed"] == s["seed"]
    bf16 = {s["seed"]: s["final_val_loss"] for s in runs if s["recipe"] == "bf16"}
    assert bf16[3] != bf16[4]                                 # another seed: another init and data order
    assert "val loss seed 3" in printed and "mean Δ % ± s.e." in printed and "| switchback (seed 4) |" in printed
    _error(capsys, [*argv[:-1], str(tmp_path / "x"), "--seed", "1"], "--seed or --seeds")
    _error(capsys, ["compare", "--seeds", "1,a"], "--seeds '1,a'", "integers")
    _error(capsys, ["compare", "--seeds", "1,1"], "distinct")


def test_seeds_table_pairs_each_seed_with_its_bf16():
    from qtrain.train.compare import seeds_table

    runs = [{"recipe": r, "seed": n, "final_val_loss": v} for r, n, v in
            [("bf16", 0, 1.0), ("bf16", 1, 2.0), ("x", 0, 1.01), ("x", 1, 2.06)]]
    row = next(line for line in seeds_table(runs).splitlines() if line.startswith("| x |"))
    # Δ 1 % and 3 %: mean 2 %, s.d. √2, s.e. √2/√2 = 1
    assert row == "| x | 1.0100 | 2.0600 | 1.5350 | +1.00 % | +3.00 % | +2.00 % ± 1.00 |"
    one = seeds_table([{"recipe": "bf16", "seed": 5, "final_val_loss": 1.0},
                       {"recipe": "y", "seed": 5, "final_val_loss": 1.02}])
    assert "| y | 1.0200 | 1.0200 | +2.00 % | +2.00 % |" in one


def test_recipe_from_json_file(capsys, tmp_path):
    from qtrain.recipes import GemmSpec, Recipe, block, int8

    blocked = Recipe("blocked", fprop=GemmSpec(int8(block(1, 128)), int8(block(128, 128))),
                     dgrad=GemmSpec(int8(block(1, 128)), int8(block(128, 128))))
    path = tmp_path / "blocked.json"
    path.write_text(json.dumps(blocked.to_dict()))
    out = tmp_path / "cmp"
    argv = ["compare", "--recipes", f"bf16,{path}", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "| blocked |" in capsys.readouterr().out
    saved = json.loads((out / "blocked" / "step-000002" / "config.json").read_text())["recipe"]
    assert Recipe.from_dict(saved) == blocked
    assert main(["train", "--resume", str(out / "blocked"), "--steps", "3", "--no-progress"]) == 0   # from the record
    _error(capsys, ["train", "--recipe", str(tmp_path / "missing.json")], "cannot read the recipe file")
    (tmp_path / "bad.json").write_text('{"name": "x", "fprop": {"a": 1}}')
    _error(capsys, ["train", "--recipe", str(tmp_path / "bad.json")], "not a valid recipe file")
    _error(capsys, ["train", "--recipe", "fp4"], "'fp4'", "recipe .json file")
