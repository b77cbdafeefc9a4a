"""Reference models: every preset builds and runs forward/backward; causality, GQA, RoPE and tying behave."""
import pytest
import torch

import qtrain
from qtrain.errors import UserError
from qtrain.models import PRESETS, build, preset_config
from qtrain.models.llama import apply_rope, rope_tables

SMALL = ("gpt2-tiny", "llama-tiny")
LARGE = [n for n in PRESETS if n not in SMALL]


def _fwd_bwd(model, vocab, T=16, device="cpu"):
    x = torch.randint(0, vocab, (2, T), device=device) if device != "meta" else torch.zeros(2, T, dtype=torch.long,
                                                                                              device="meta")
    logits, loss = model(x, x.roll(1, dims=1))
    assert logits.shape == (2, T, vocab)
    loss.backward()
    return loss


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_train_step(name):
    torch.manual_seed(0)
    model = build(name, vocab_size=256)
    assert 2e6 < model.num_params() < 5e6
    loss = _fwd_bwd(model, 256)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 1.0   # near uniform at init
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", LARGE)
def test_large_presets_full_size_on_meta(name):
    with torch.device("meta"):
        model = build(name)
    _fwd_bwd(model, model.config.vocab_size, T=32, device="meta")
    expected = {"gpt2-small": 124e6, "llama-60m": 58e6, "llama-125m": 134e6, "llama-350m": 374e6,
                "llama-1b": 1.1e9}[name]
    assert abs(model.num_params() - expected) / expected < 0.05


@pytest.mark.parametrize("name", LARGE)
def test_large_presets_one_layer_on_cpu(name):
    if name == "llama-1b":   # its layer is 63M parameters: shrink the MLP, keep width and GQA heads
        model = build(name, vocab_size=256, n_layer=1, ffn_hidden=256)
    else:
        model = build(name, vocab_size=256, n_layer=1)
    _fwd_bwd(model, 256, T=8)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="llama-tiny"):
        build("llama-7b")


@pytest.mark.parametrize("name", SMALL)
def test_causal(name):
    torch.manual_seed(0)
    model = build(name, vocab_size=256).eval()
    x = torch.randint(0, 256, (1, 24))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 256
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = build("llama-tiny", n_head=4, n_kv_head=2)
    mha = build("llama-tiny", n_head=4)
    sd = gqa.state_dict()
    D, H, KV, C = 64, 4, 2, 256
    for i in range(gqa.config.n_layer):
        w = sd[f"layers.{i}.attn.wqkv.weight"]
        q, k, v = w.split([H * D, KV * D, KV * D])
        rep = lambda t: t.view(KV, D, C).repeat_interleave(H // KV, dim=0).reshape(H * D, C)  # noqa: E731
        sd[f"layers.{i}.attn.wqkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x)[0], mha(x)[0], rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 8), cos[i], sin[i])
        kj = apply_rope(k.view(1, 1, 1, 8), cos[j], sin[j])
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))


def test_gpt2_head_tied():
    model = build("gpt2-tiny")
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name,expected", [("gpt2-tiny", 16), ("llama-tiny", 16)])
def test_convert_skips_head_only(name, expected):
    model = build(name)
    qtrain.convert(model, "switchback")
    converted = [n for n, _ in qtrain.nn.quant_layers(model)]
    assert len(converted) == expected and not any("lm_head" in n for n in converted)
    _fwd_bwd(model, 256)


def test_seq_len_limit():
    model = build("llama-tiny", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert preset_config("gpt2-small").max_seq_len == 1024


def test_generate_appends_tokens():
    torch.manual_seed(0)
    model = build("llama-tiny")
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and out[0, :3].tolist() == [0, 0, 0]
