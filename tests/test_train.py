"""The training loop: SwitchBack tracks bf16, resume is bit-exact, compare writes its plot and table, and the run
folder holds what the docs promise."""
import importlib
import json
import math
import shutil

import pytest
import torch

from qtrain.errors import UserError
from qtrain.models import build
from qtrain.train import TrainConfig, compare, train
from qtrain.train.loop import lr_at, param_groups, resume_config

SMALL = dict(batch_size=4, seq_len=64, eval_batches=8, sample_tokens=0, progress=False)


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = TrainConfig(steps=100, eval_every=50, save_every=100, out=str(out), **SMALL)
    return out, compare(cfg, ["bf16", "switchback"])


def test_switchback_within_2_percent_of_bf16(compared):
    _, (bf16, sb) = compared
    assert bf16["recipe"] == "bf16" and sb["recipe"] == "switchback"
    assert bf16["final_val_loss"] < 3.0   # it learned something (uniform over bytes is 5.55)
    assert abs(sb["final_val_loss"] - bf16["final_val_loss"]) / bf16["final_val_loss"] < 0.02


def test_compare_same_init_and_data(compared):
    out, _ = compared
    first = [json.loads((out / r / "log.jsonl").read_text().splitlines()[0]) for r in ("bf16", "switchback")]
    assert abs(first[0]["loss"] - first[1]["loss"]) < 0.01   # same weights and batch; only quantization noise


def test_compare_writes_plot_and_table(compared):
    out, _ = compared
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| bf16 |" in table and "| switchback |" in table and "Δ % vs bf16" in table
    assert "+0.00 %" in table   # bf16 against itself
    for recipe in ("bf16", "switchback"):
        records = [json.loads(line) for line in (out / recipe / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 101))
        assert all({"step", "loss", "lr", "tokens_per_s"} <= r.keys() for r in records)
        assert [r["step"] for r in records if "val_loss" in r] == [50, 100]


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(steps=6, eval_every=3, save_every=2, keep_checkpoints=2, out=str(out),
                                **{**SMALL, "sample_tokens": 20}))
    assert summary["steps"] == 6 and math.isfinite(summary["final_val_loss"])
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000004", "step-000006"]
    ckpt = out / "step-000006"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "rng" in state and "data" in state
    config = json.loads((ckpt / "config.json").read_text())
    assert config["recipe"]["name"] == "switchback" and config["model_config"]["family"] == "llama"
    assert config["data"]["python"] and config["train"]["seq_len"] == 64
    assert (out / "loss.png").exists() and "--- sampled ---" in (out / "sample.txt").read_text()
    report = (out / "quant_report.txt").read_text()
    assert "layers.0.mlp.w_down" in report and "switchback" in report and " - " not in report
    assert json.loads((out / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]


def _losses(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in
            map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("recipe", ["bf16", "switchback", "fallback", "jetfire", "int4"])
def test_resume_reproduces_uninterrupted_run(tmp_path, recipe):
    """Bit for bit, stochastic rounding included (jetfire's gradients, int4's split and sampling: the checkpoint
    holds the SR generators' states; without them the resumed run parted at its second step)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cfg = TrainConfig(recipe=recipe, steps=16, eval_every=4, save_every=8, warmup=3, **SMALL)
    train(cfg.replace(out=str(whole)))
    # an interrupted run: its folder as it was right after the step-8 checkpoint
    cut.mkdir()
    shutil.copytree(whole / "step-000008", cut / "step-000008")
    lines = (whole / "log.jsonl").read_text().splitlines()
    (cut / "log.jsonl").write_text("\n".join(lines[:10]) + "\n")   # includes 2 lines past the checkpoint
    train(TrainConfig(resume=str(cut), progress=False), explicit={"resume", "progress"})
    assert _losses(cut) == _losses(whole)
    assert (cut / "step-000016" / "model.safetensors").read_bytes() == \
        (whole / "step-000016" / "model.safetensors").read_bytes()
    if recipe == "fallback":            # per-layer thresholds are checkpointed; shares reach the log
        logged = [json.loads(r) for r in (whole / "log.jsonl").read_text().splitlines()]
        shares = [r["fallback_pct"] for r in logged if "val_loss" in r]
        assert len(shares) == 4 and all(set(s) == {"fprop", "dgrad", "wgrad"} for s in shares)
        assert all(0 <= v <= 100 for s in shares for v in s.values())


def test_processes_round_with_streams_of_their_own():
    from qtrain.nn.functional import sr_generator
    from qtrain.train.distributed import World
    from qtrain.train.loop import seed_rounding

    def draws(rank, size):
        torch.manual_seed(0)
        seed_rounding(7, World(rank, size), torch.device("cpu"))
        return torch.rand(8, generator=sr_generator(torch.device("cpu")))

    assert torch.equal(draws(0, 2), draws(0, 2))                       # reproducible
    assert not torch.equal(draws(0, 2), draws(1, 2))                   # and apart between processes
    assert torch.equal(draws(0, 1), draws(0, 2))                       # one process rounds as rank 0


def test_a_run_rounds_alike_after_another_in_the_process(tmp_path):
    """``qtrain compare`` trains its runs in one process: a run's stochastic rounding must not continue the
    generators of the run before it (it did: the second of two identical jetfire runs parted at its second step)."""
    cfg = TrainConfig(recipe="jetfire", steps=3, eval_every=3, warmup=1, **SMALL)
    for name in ("a", "b"):
        train(cfg.replace(out=str(tmp_path / name)))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_int4_run_logs_its_weight_steps(tmp_path):
    """An int4 run's evaluation lines log where its weight steps stand against the weights: step over the
    transformed weight's RMS (LSQ's init ~0.6 at calibration; here after two steps at lr 2e-3 already 0.08–1.05,
    up to 55 % of a weight clipped) and the clipped share."""
    train(TrainConfig(recipe="int4", steps=4, eval_every=2, warmup=1, **SMALL).replace(out=str(tmp_path / "r")))
    logged = [json.loads(r) for r in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    stats = [r["int4_w"] for r in logged if "val_loss" in r]
    assert len(stats) == 2 and all(set(s) == {"step_rms_min", "step_rms_max", "clipped_pct_mean",
                                               "clipped_pct_max"} for s in stats)
    assert all(0 < s["step_rms_min"] <= s["step_rms_max"] < 10 and 0 <= s["clipped_pct_mean"] <= s[
        "clipped_pct_max"] <= 100 for s in stats)


def test_resume_rejects_other_model_and_corrupt_files(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(steps=2, save_every=2, eval_every=2, out=str(run), **SMALL))
    with pytest.raises(UserError, match="was trained with --model llama-tiny"):
        train(TrainConfig(resume=str(run), model="gpt2-tiny"), explicit={"resume", "model"})
    other = tmp_path / "other"
    train(TrainConfig(model="gpt2-tiny", steps=2, save_every=2, eval_every=2, out=str(other), **SMALL))
    shutil.copy(other / "step-000002" / "model.safetensors", run / "step-000002" / "model.safetensors")
    with pytest.raises(UserError, match="from another model"):
        train(TrainConfig(resume=str(run)), explicit={"resume"})
    (other / "step-000002" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt: cannot read state.pt"):
        train(TrainConfig(resume=str(other)), explicit={"resume"})
    with pytest.raises(UserError, match="not a checkpoint"):
        train(TrainConfig(resume=str(tmp_path)), explicit={"resume"})


def test_resume_config_without_compile_mode(tmp_path):
    """A checkpoint written before --compile-mode existed resumes (default compile mode); the mode is run control:
    a resumed run may change it, and it implies --compile."""
    run = tmp_path / "run"
    train(TrainConfig(recipe="bf16", steps=2, save_every=2, eval_every=2, out=str(run), **{**SMALL, "eval_batches": 1}))
    for path in (run / "config.json", run / "step-000002" / "config.json"):
        saved = json.loads(path.read_text())
        del saved["train"]["compile_mode"]
        path.write_text(json.dumps(saved))
    cfg, _, _ = resume_config(TrainConfig(resume=str(run), compile_mode="reduce-overhead", seq_len=32),
                              {"resume", "compile_mode"})
    assert cfg.compile and cfg.compile_mode == "reduce-overhead" and cfg.seq_len == 64
    summary = train(TrainConfig(resume=str(run), steps=3, progress=False), explicit={"resume", "steps", "progress"})
    assert summary["steps"] == 3 and math.isfinite(summary["final_val_loss"])
    resumed = json.loads((run / "step-000003" / "config.json").read_text())["train"]
    assert resumed["compile_mode"] == "default" and not resumed["compile"]


def test_adamw_grad_accum_gpt2(tmp_path):
    summary = train(TrainConfig(model="gpt2-tiny", recipe="switchback_m", optimizer="adamw", grad_accum=2,
                                steps=3, eval_every=3, save_every=3, out=str(tmp_path), **SMALL))
    assert math.isfinite(summary["final_val_loss"])


def test_lr_schedule():
    cfg = TrainConfig(steps=100)
    assert lr_at(0, cfg, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, cfg, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, cfg, 1.0, 10) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 1.0, 10) >= lr_at(s + 1, cfg, 1.0, 10) for s in range(10, 99))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_no_weight_decay_on_norms_biases_embeddings(name):
    model = build(name)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not any("norm" in names[id(p)] or "ln_" in names[id(p)] or names[id(p)].endswith("bias")
                   or "wte" in names[id(p)] or "wpe" in names[id(p)] or "embed" in names[id(p)]
                   for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_compare_keeps_the_runs_finished_when_stopped(tmp_path, monkeypatch):
    """A comparison stopped part way (here the third of four runs fails) has written the two runs it finished:
    the table marks the missing ones and says how many finished."""
    compare_module = importlib.import_module("qtrain.train.compare")      # qtrain.train.compare is the function
    real, calls = compare_module.train, []

    def train_or_stop(cfg):
        calls.append(cfg.out)
        if len(calls) == 3:
            raise KeyboardInterrupt("time limit")
        return real(cfg)

    monkeypatch.setattr(compare_module, "train", train_or_stop)
    out = tmp_path / "stopped"
    cfg = TrainConfig(steps=2, eval_every=2, save_every=2, out=str(out), **SMALL)
    with pytest.raises(KeyboardInterrupt):
        compare(cfg, ["bf16", "switchback"], seeds=[3, 4])
    table = (out / "compare.md").read_text()
    assert "**2 of 4 runs finished**" in table
    assert "| bf16 |" in table and "| switchback |" not in table
    assert [(s["recipe"], s["seed"]) for s in json.loads((out / "compare.json").read_text())] == [("bf16", 3),
                                                                                                 ("bf16", 4)]
    assert (out / "compare.png").exists()
