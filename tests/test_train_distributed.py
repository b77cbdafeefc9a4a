"""``qtrain train`` under torchrun (2 CPU processes, gloo; DDP and FSDP2) against one process with twice the batch.

All see the same data (each process trains on its slice of the same global batch), so the losses agree up to
the order of the gradient reduction; a resumed 2-process run reproduces the uninterrupted one exactly (FSDP2
gathers its checkpoints into the same format); resuming with another number of processes is refused.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")

FLAGS = ["--steps", "6", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "3", "--save-every", "3",
         "--sample-tokens", "0", "--device", "cpu", "--no-progress"]


def _run(args, env, procs=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] \
        if procs > 1 else [sys.executable]
    return subprocess.run(launcher + ["-m", "qtrain", "train", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _errors(r) -> str:
    """The tail of a failed run's stderr, warnings left out."""
    lines = [ln for ln in r.stderr.splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
    return "\n".join(lines[-40:])


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_resumes_exactly(out, resumed, env):
    """Resume the 2-process run ``out`` from its step-3 checkpoint into ``resumed``: the same log from step 4 on."""
    r = _run(["--resume", str(out / "step-000003"), "--out", str(resumed), "--no-progress"], env, procs=2)
    assert r.returncode == 0, _errors(r)
    assert [(e["step"], e["loss"], e.get("val_loss")) for e in _log(resumed)] == \
        [(e["step"], e["loss"], e.get("val_loss")) for e in _log(out)][3:]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "QTRAIN_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = _run(FLAGS + ["--batch-size", "2", "--out", str(out)], env, procs=2)
    assert r.returncode == 0, _errors(r)
    return out, r


def test_ddp_matches_one_process_with_the_global_batch(two_procs, tmp_path, env):
    out, r = two_procs
    assert r.stdout.count("done: 6 steps") == 1          # rank 0 reports, rank 1 stays quiet
    one = tmp_path / "one"
    r1 = _run(FLAGS + ["--batch-size", "4", "--out", str(one)], env)
    assert r1.returncode == 0, _errors(r1)
    ddp, single = _log(out), _log(one)
    assert [e["step"] for e in ddp] == list(range(1, 7))
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000003", "step-000006"]
    state = torch.load(out / "step-000006" / "state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2                 # each process resumes its own RNG stream


def test_ddp_resume_is_exact_and_world_size_is_checked(two_procs, tmp_path, env):
    out, _ = two_procs
    _assert_resumes_exactly(out, tmp_path / "resumed", env)
    r = _run(["--resume", str(out), "--out", str(tmp_path / "single")], env)
    assert r.returncode == 2 and "trained on 2 processes, not 1" in r.stderr


def test_fsdp2_matches_ddp_and_resumes_exactly(two_procs, tmp_path, env):
    ddp_out, _ = two_procs
    out = tmp_path / "fsdp"
    r = _run(FLAGS + ["--batch-size", "2", "--fsdp", "--sample-tokens", "8", "--out", str(out)], env, procs=2)
    assert r.returncode == 0, _errors(r)
    assert "2 processes, FSDP2" in r.stderr + r.stdout
    for a, b in zip(_log(out), _log(ddp_out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    assert (out / "sample.txt").exists() and (out / "quant_report.txt").exists()
    _assert_resumes_exactly(out, tmp_path / "resumed", env)


def test_int4_under_fsdp2_matches_ddp_from_one_calibration(tmp_path, env):
    """INT4 layers calibrate before the model is wrapped, alike on every process (on process 0's share of the
    first batch): under FSDP2 the steps written during the first (sharded) forward were once lost — every layer
    trained from the −1 placeholder, and the loss left DDP's from step 2 on."""
    flags = FLAGS + ["--recipe", "int4", "--batch-size", "2", "--steps", "3", "--save-every", "3"]
    runs = {name: tmp_path / name for name in ("ddp", "fsdp")}
    for name, out in runs.items():
        r = _run(flags + ["--out", str(out)] + (["--fsdp"] if name == "fsdp" else []), env, procs=2)
        assert r.returncode == 0, _errors(r)
    for a, b in zip(_log(runs["fsdp"]), _log(runs["ddp"]), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
    ddp, sharded = (load_file(out / "step-000003" / "model.safetensors") for out in runs.values())
    state = [k for k in ddp if k.endswith(("int4_step", "hq_block"))]
    assert len(state) == 32                                             # 16 layers: steps and block each
    for k in state:
        torch.testing.assert_close(sharded[k], ddp[k], rtol=1e-4, atol=0)
        assert not torch.all(ddp[k] == -1), k                           # calibrated


def test_fallback_under_fsdp2_resumes_exactly(tmp_path, env):
    """Fallback thresholds are buffers each process updates from its own data; under FSDP2 rank 0's are broadcast
    before the first forward of each step, as DDP does, so a resumed run — which loads rank 0's — reproduces the
    uninterrupted one exactly (without the broadcast it ended 3e-7 apart at step 4)."""
    out = tmp_path / "fsdp"
    r = _run(FLAGS + ["--recipe", "fallback", "--batch-size", "2", "--fsdp", "--out", str(out)], env, procs=2)
    assert r.returncode == 0, _errors(r)
    _assert_resumes_exactly(out, tmp_path / "resumed", env)


def test_fsdp_needs_several_processes(tmp_path, env):
    r = _run(FLAGS + ["--fsdp", "--out", str(tmp_path / "x")], env)
    assert r.returncode == 2 and "--fsdp shards the model over several processes" in r.stderr


def test_compare_under_torchrun(tmp_path, env):
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "qtrain", "compare", "--recipes", "bf16,switchback", *FLAGS, "--batch-size", "2",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, _errors(r)
    assert r.stdout.count("| switchback |") == 1        # rank 0 prints the table once
    table = (out / "compare.md").read_text()
    assert "| bf16 |" in table and "| switchback |" in table and (out / "compare.png").exists()
    assert [e["step"] for e in _log(out / "switchback")] == list(range(1, 7))
