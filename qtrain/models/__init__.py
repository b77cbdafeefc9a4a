"""Reference models (GPT-2, LLaMA) and their named presets.

>>> model = build("llama-tiny", vocab_size=256)          # a preset
>>> model = build_from_config(model.config.to_dict())     # the same architecture from a recorded config
"""
from __future__ import annotations

import dataclasses

from qtrain.errors import UserError
from qtrain.models.base import CausalLM
from qtrain.models.config import PRESETS, ModelConfig
from qtrain.models.gpt2 import GPT2
from qtrain.models.llama import Llama

__all__ = ["build", "build_from_config", "preset_config", "PRESETS", "ModelConfig", "CausalLM", "GPT2", "Llama"]


def preset_config(name: str, vocab_size: int | None = None, max_seq_len: int | None = None,
                  **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name``, with ``vocab_size``/``max_seq_len`` and any other fields
    (e.g. ``n_layer=1``) replaced. Raises :class:`~qtrain.errors.UserError` for an unknown preset."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    return dataclasses.replace(PRESETS[name], **overrides)


def build_from_config(cfg: "ModelConfig | dict") -> CausalLM:
    """A freshly initialized model (under the current default device and RNG) for ``cfg``."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return {"gpt2": GPT2, "llama": Llama}[cfg.family](cfg)


def build(name: str, vocab_size: int | None = None, max_seq_len: int | None = None, **overrides) -> CausalLM:
    """Build preset ``name`` (see :data:`PRESETS`) for a tokenizer of ``vocab_size`` ids (default: the preset's).

    Initialization draws from torch's global RNG: seed it first for a reproducible model. To build a large
    preset without allocating it, call under ``with torch.device("meta"):``.
    """
    return build_from_config(preset_config(name, vocab_size, max_seq_len, **overrides))
