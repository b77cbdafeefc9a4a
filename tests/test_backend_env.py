"""``QTRAIN_BACKEND`` set to a value qtrain does not know: one line naming the accepted values, no traceback
(``import qtrain`` itself succeeds; the check runs where a backend is chosen)."""
import os
import subprocess
import sys

import pytest

ACCEPTED = "auto, triton, reference"


def _run(args, tmp_path, backend="bogus"):
    env = {**os.environ, "QTRAIN_BACKEND": backend, "QTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_cli_train_one_line(tmp_path):
    r = _run(["-m", "qtrain", "train", "--steps", "1", "--batch-size", "1", "--seq-len", "16", "--eval-batches",
              "1", "--sample-tokens", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")],
             tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("qtrain train: error: QTRAIN_BACKEND='bogus'") and ACCEPTED in err, err
    assert not (tmp_path / "run").exists()                # reported before the run starts, for any recipe
    r = _run(["-m", "qtrain", "train", "--recipe", "bf16", "--steps", "1", "--out", str(tmp_path / "bf")], tmp_path)
    assert r.returncode == 2 and "QTRAIN_BACKEND" in r.stderr and not (tmp_path / "bf").exists(), r.stderr


@pytest.mark.parametrize("backend", ["Triton"])
def test_library_error_names_the_accepted_values(tmp_path, backend):
    code = ("import torch, qtrain\n"
            "try:\n"
            "    qtrain.ops.quantize_rowwise(torch.ones(2, 2))\n"
            "except ValueError as e:\n"
            "    assert isinstance(e, qtrain.errors.UserError), type(e)\n"
            "    print(e)\n"
            "qtrain.ops.set_backend('reference')\n"      # a valid choice in code overrides the variable
            "qtrain.ops.quantize_rowwise(torch.ones(2, 2))\n")
    r = _run(["-c", code], tmp_path, backend)
    assert r.returncode == 0, r.stderr
    assert f"QTRAIN_BACKEND={backend!r}" in r.stdout and ACCEPTED in r.stdout, r.stdout


def test_empty_means_auto(tmp_path):
    r = _run(["-c", "import qtrain; print(qtrain.ops.get_backend())"], tmp_path, "")
    assert r.returncode == 0 and r.stdout.strip() == "auto", r.stderr
