"""Checkpoints: one folder per save, ``<run>/step-000030/``, holding

- ``model.safetensors`` — the weights (the same keys whether or not the model was converted);
- ``state.pt`` — optimizer state, learning-rate schedule, RNG states and data position, in a form that
  ``torch.load(path, weights_only=True)`` reads;
- ``config.json`` — the run's settings, the model config, the recipe, the corpus and the software versions.

A checkpoint is written into a temporary folder and renamed into place, so a folder named ``step-*`` is complete.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from qtrain.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "state.pt", "config.json")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save(run_dir: Path, step: int, model: torch.nn.Module, state: dict, config: dict, keep: int) -> Path:
    """Write checkpoint ``step`` under ``run_dir`` and delete all but the newest ``keep`` checkpoints."""
    final = run_dir / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp-step-"))
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders of ``run_dir``, oldest first."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if run_dir.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find(path: str, flag: str = "--resume") -> Path:
    """The checkpoint folder ``path`` names: a checkpoint itself, or a run folder (then its latest)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {path!r}: no such checkpoint or run folder")
    if (p / "state.pt").exists() or STEP_DIR.match(p.name):
        return p
    found = list_checkpoints(p)
    if not found:
        raise UserError(f"{flag} {path!r}: not a checkpoint (step-NNNNNN/ with {', '.join(FILES)}) nor a run "
                        f"folder holding one")
    return found[-1]


def read_config(ckpt: Path) -> dict:
    """The ``config.json`` of checkpoint ``ckpt``; :class:`UserError` if missing or unreadable."""
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} is incomplete or corrupt: cannot read config.json ({e})") from None


def load(ckpt: Path, model: torch.nn.Module) -> dict:
    """Load the weights of ``ckpt`` into ``model`` (strict: same keys and shapes) and return its ``state.pt``.
    A corrupt file or a checkpoint of another architecture raises :class:`UserError`."""
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} is corrupt: cannot read model.safetensors ({e})") from None
    except RuntimeError as e:   # shape mismatch
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {ckpt} is from another model: {first}") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} is from another model: missing weights {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    try:
        return torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:   # torch raises several types (pickle, zip, runtime) for a damaged file
        raise UserError(f"checkpoint {ckpt} is corrupt: cannot read state.pt ({type(e).__name__})") from None
