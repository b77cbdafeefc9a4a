"""qtrain.convert on Hugging Face models built from tiny configs (nothing downloaded)."""
import pytest
import torch

import qtrain

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers; CI installs it)")


def _train_step(model, vocab):
    x = torch.randint(0, vocab, (2, 12))
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_convert_hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    qtrain.convert(model, "switchback")
    layers = qtrain.nn.quant_layers(model)
    # q, k, v, o, gate, up, down per layer; lm_head left alone
    assert len(layers) == 7 * 2
    assert not any("lm_head" in n for n, _ in layers)
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys
    _train_step(model, 128)


def test_convert_hf_gpt2_conv1d():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    keys = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    qtrain.convert(model, "switchback")
    layers = qtrain.nn.quant_layers(model)
    # Conv1D c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per layer; the tied lm_head left alone
    assert len(layers) == 4 * 2
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys
    _train_step(model, 128)
