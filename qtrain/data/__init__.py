"""Corpora, tokenizers, the on-disk token cache and the batch samplers.

>>> data = load_tokens("stdlib", get_tokenizer("bytes"))    # tokenized once, then memory-mapped from the cache
>>> batches = Batches(data.train, batch_size=8, seq_len=128, seed=0)
>>> x, y = batches.next()                                   # int64 [8, 128] each; y is x shifted by one

**Train/validation split** (fixed, for every corpus): each document's last 5 % goes to validation, cut at the
first line break at or after 95 % of its characters (a document without one there is all training text).
Each document is preceded by the tokenizer's end-of-text id, in both splits.

**Cache**: token arrays are stored under ``$QTRAIN_CACHE`` (default ``$XDG_CACHE_HOME/qtrain``, i.e.
``~/.cache/qtrain``) in a folder named after the corpus, the tokenizer and a hash of every file's path, size
and modification time, so an edited corpus is tokenized again. Delete the folder to clear it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtrain.data.corpora import NAMED_CORPORA, Corpus, get_corpus
from qtrain.data.tokenizers import TOKENIZERS, ByteTokenizer, GPT2Tokenizer, get_tokenizer
from qtrain.errors import UserError

__all__ = ["load_tokens", "get_tokenizer", "get_corpus", "split_document", "cache_dir", "Batches",
           "eval_batches", "TokenData", "Corpus", "NAMED_CORPORA", "TOKENIZERS", "ByteTokenizer",
           "GPT2Tokenizer", "VAL_FRACTION"]

VAL_FRACTION = 0.05
_SPLIT_VERSION = "1"   # bump when the split rule or the layout of the cache changes


def cache_dir() -> Path:
    """Root of qtrain's cache: ``$QTRAIN_CACHE``, else ``$XDG_CACHE_HOME/qtrain``, else ``~/.cache/qtrain``."""
    if os.environ.get("QTRAIN_CACHE"):
        return Path(os.environ["QTRAIN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qtrain"


def split_document(text: str) -> tuple[str, str]:
    """``(train, val)`` parts of one document by the fixed rule in this module's docstring."""
    cut = text.find("\n", int(len(text) * (1 - VAL_FRACTION)))
    if cut < 0:
        return text, ""
    return text[:cut + 1], text[cut + 1:]


@dataclass
class TokenData:
    """The token ids of a corpus' two splits (memory-mapped 1-D arrays) and what was recorded about them."""

    train: np.ndarray
    val: np.ndarray
    meta: dict


def _tokenize(corpus: Corpus, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    parts = [split_document(doc) for doc in corpus.read()]
    eot = np.array([tokenizer.eot], dtype=np.uint16)
    out = []
    for texts in zip(*parts):
        ids = tokenizer.encode_many([t for t in texts if t])
        out.append(np.concatenate([a for ids_doc in ids for a in (eot, ids_doc)] or [eot]))
    return out[0], out[1]


def load_tokens(data: str, tokenizer) -> TokenData:
    """Token ids of corpus ``data`` (see :func:`get_corpus`) under ``tokenizer``, from the cache if present,
    else tokenized now and cached. Raises :class:`UserError` for a bad ``data``."""
    corpus = get_corpus(data)
    key = json.dumps([corpus.name, tokenizer.name, tokenizer.version, _SPLIT_VERSION, corpus.fingerprint()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir() / "tokens" / f"{_slug(corpus.name)}-{tokenizer.name}-{digest}"
    if not (folder / "meta.json").exists():
        train, val = _tokenize(corpus, tokenizer)
        meta = {"data": data, "corpus": corpus.name, "tokenizer": tokenizer.name, "files": len(corpus.files),
                "train_tokens": int(train.size), "val_tokens": int(val.size), **corpus.info}
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)          # atomic: a concurrent run either sees all files or none
        except OSError:                      # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = [np.memmap(folder / f"{s}.bin", dtype=np.uint16, mode="r") if meta[f"{s}_tokens"] else
              np.zeros(0, dtype=np.uint16) for s in ("train", "val")]
    return TokenData(arrays[0], arrays[1], meta)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "corpus"


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if tokens.size < seq_len + 2:
        raise UserError(f"the {split} split has {tokens.size} tokens, too few for --seq-len {seq_len}: use a "
                        f"larger corpus or a shorter --seq-len")


def _slice(tokens: np.ndarray, offsets: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.stack([tokens[o:o + seq_len + 1] for o in offsets]).astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class Batches:
    """Training batches: ``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random offsets, drawn
    from a generator seeded with ``seed``, so every run with the same seed sees the same data in the same order.

    With ``world`` processes, every process draws the same ``batch_size × world`` offsets and keeps slice
    ``rank``: together they see what one process with ``world`` times the batch size sees.

    :meth:`state_dict` (the generator state and the number of batches drawn) restores the position exactly.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world: int = 1):
        _check_length(tokens, seq_len, "training")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 ``[batch_size, seq_len]`` inputs and next-token targets (on the CPU)."""
        self.drawn += 1
        return self._draw(self.generator, self.rank)

    def peek(self, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Process ``rank``'s share of the batch :meth:`next` draws next, without drawing it."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is not in [0, {self.world})")
        return self._draw(torch.Generator().set_state(self.generator.get_state()), rank)

    def _draw(self, generator: torch.Generator, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Process ``rank``'s share of the global batch whose offsets ``generator`` draws."""
        high = self.tokens.size - self.seq_len - 1
        offsets = torch.randint(high, (self.batch_size * self.world,), generator=generator).tolist()
        mine = offsets[rank * self.batch_size:(rank + 1) * self.batch_size]
        return _slice(self.tokens, mine, self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int, rank: int = 0,
                 world: int = 1):
    """The fixed validation set: ``n_batches`` batches of windows at evenly spaced offsets over ``tokens``
    (no randomness, so every evaluation and every recipe sees the same text). Yields ``(x, y)`` like
    :meth:`Batches.next`; with ``world`` processes, batches hold ``batch_size × world`` windows and process
    ``rank`` gets its slice of each, as in training."""
    _check_length(tokens, seq_len, "validation")
    n = n_batches * batch_size * world
    offsets = np.linspace(0, tokens.size - seq_len - 1, n).astype(np.int64).tolist()
    for i in range(n_batches):
        start = (i * world + rank) * batch_size
        yield _slice(tokens, offsets[start:start + batch_size], seq_len)
