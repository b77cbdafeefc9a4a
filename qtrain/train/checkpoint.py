"""Checkpoints: one folder per save, ``<run>/step-000030/``, holding

- ``model.safetensors`` — the weights (the same keys whether or not the model was converted);
- ``state.pt`` — optimizer state, learning-rate schedule, RNG states and data position, in a form that
  ``torch.load(path, weights_only=True)`` reads;
- ``config.json`` — the run's settings, the model config, the recipe, the corpus and the software versions.

A checkpoint is written into a temporary folder (``.tmp-step-*``) and renamed into place, and an old one is
renamed away (``.trash-*``) before it is deleted, so a process killed at any moment leaves every ``step-*``
folder complete; what such a kill leaves behind is removed by the next save. Only complete checkpoints (all
three files present) are listed, resumed from or counted when pruning.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from qtrain.errors import UserError
from qtrain.nn.linear import STATE_KEYS

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "state.pt", "config.json")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save(run_dir: Path, step: int, model: torch.nn.Module, state: dict, config: dict, keep: int) -> Path:
    """Write checkpoint ``step`` under ``run_dir`` and delete all but the newest ``keep`` checkpoints (``keep``
    0: all are kept). Leftovers of an earlier process killed while saving or pruning are removed first."""
    clean(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=TMP_PREFIX))
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    trash = _to_trash(final) if final.exists() else None
    tmp.rename(final)
    if trash is not None:
        shutil.rmtree(trash)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(_to_trash(old))
    return final


TMP_PREFIX = ".tmp-step-"
TRASH_PREFIX = ".trash-"


def _to_trash(folder: Path) -> Path:
    """Rename ``folder`` to a hidden ``.trash-*`` name (atomic), so deleting it can be interrupted harmlessly."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}")
    folder.rename(trash)
    return trash


def clean(run_dir: Path) -> list[Path]:
    """Delete what a process killed while writing (``.tmp-step-*``) or deleting (``.trash-*``) a checkpoint left
    in ``run_dir``; return the folders removed. Call it only while no other process saves into ``run_dir``."""
    if not run_dir.is_dir():
        return []
    leftovers = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def missing_files(ckpt: Path) -> list[str]:
    """The checkpoint files ``ckpt`` lacks (empty for a complete checkpoint)."""
    return [f for f in FILES if not (ckpt / f).is_file()]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders of ``run_dir``, oldest first (a ``step-*`` folder missing a file, as an
    interrupted deletion by an older qtrain could leave, is not a checkpoint)."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and not missing_files(p)] \
        if run_dir.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find(path: str, flag: str = "--resume") -> Path:
    """The checkpoint folder ``path`` names: a checkpoint itself, or a run folder (then its latest complete one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {path!r}: no such checkpoint or run folder")
    if (p / "state.pt").exists() or STEP_DIR.match(p.name):
        missing = missing_files(p)
        if missing:
            raise UserError(f"{flag} {path!r}: checkpoint is incomplete (no {', '.join(missing)}); pass its run "
                            f"folder instead, which names its latest complete checkpoint")
        return p
    found = list_checkpoints(p)
    if not found:
        raise UserError(f"{flag} {path!r}: not a checkpoint (step-NNNNNN/ with {', '.join(FILES)}) nor a run "
                        f"folder holding a complete one")
    return found[-1]


def read_config(ckpt: Path) -> dict:
    """The ``config.json`` of checkpoint ``ckpt``; :class:`UserError` if missing or unreadable."""
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} is incomplete or corrupt: cannot read config.json ({e})") from None


def load(ckpt: Path, model: torch.nn.Module) -> dict:
    """Load the weights of ``ckpt`` into ``model`` (strict: same keys and shapes, except that a plain model drops
    a quantized run's per-layer state, ``qtrain.nn.linear.STATE_KEYS``) and return its ``state.pt``.
    A corrupt file or a checkpoint of another architecture raises :class:`UserError`."""
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} is corrupt: cannot read model.safetensors ({e})") from None
    except RuntimeError as e:   # shape mismatch
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {ckpt} is from another model: {first}") from None
    # a quantized run's per-layer state (thresholds, learned steps) means nothing to a plain model: dropped
    unexpected = [k for k in unexpected if k.rsplit(".", 1)[-1] not in STATE_KEYS]
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} is from another model: missing weights {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    try:
        return torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:   # torch raises several types (pickle, zip, runtime) for a damaged file
        raise UserError(f"checkpoint {ckpt} is corrupt: cannot read state.pt ({type(e).__name__})") from None
