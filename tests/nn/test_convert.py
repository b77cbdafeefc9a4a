import importlib
import logging

import pytest
import torch
from torch import nn

import qtrain
from qtrain.nn import QuantLinear


class TinyLM(nn.Module):
    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight  # tied

    def forward(self, idx):
        h = self.emb(idx)
        return self.lm_head(h + self.fc2(torch.relu(self.fc1(h))))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's transposed linear: weight [nx, nf], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_convert_keeps_parameters_state_dict_and_ties(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    params = {n: p for n, p in model.named_parameters()}
    sd_before = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="qtrain"):
        qtrain.convert(model, "switchback")
    assert "converted 2 linear layers, skipped 1" in caplog.text and "lm_head: output head" in caplog.text
    assert isinstance(model.fc1, QuantLinear) and isinstance(model.fc2, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.lm_head.weight is model.emb.weight
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == sd_before
    loss = model(torch.randint(0, 64, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    w0 = model.fc1.weight.detach().clone()
    opt.step()  # the optimizer built before conversion updates the converted layer
    assert not torch.equal(w0, model.fc1.weight)


def test_state_dict_moves_between_converted_and_plain():
    torch.manual_seed(0)
    plain, conv = TinyLM(), qtrain.convert(TinyLM(), "switchback")
    conv.load_state_dict(plain.state_dict())
    for (n, a), (_, b) in zip(plain.state_dict().items(), conv.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        conv.fc1.weight.add_(1.0)
    plain.load_state_dict(conv.state_dict())
    assert torch.equal(plain.fc1.weight, conv.fc1.weight)


def test_hf_conv1d_is_converted():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 64))
    x = torch.randn(2, 5, 64)
    ref = model(x)
    w = model[0].weight
    qtrain.convert(model, "switchback", filter_fn=lambda m, n: True)
    assert isinstance(model[0], QuantLinear) and model[0].weight is w and w.shape == (64, 48)
    y = model(x)
    assert qtrain.quant.sqnr(ref, y) > 35
    y.sum().backward()
    assert w.grad.shape == (64, 48)
    assert torch.allclose(w.grad, x.reshape(-1, 64).t() @ torch.ones(10, 48), rtol=1e-5)


def test_filter_fn_and_nothing_converted():
    model = TinyLM()
    qtrain.convert(model, "switchback", filter_fn=lambda m, name: name == "fc1")
    assert isinstance(model.fc1, QuantLinear) and isinstance(model.fc2, nn.Linear)
    with pytest.raises(ValueError, match="no linear layer to convert"):
        qtrain.convert(nn.Sequential(nn.ReLU()), "switchback")
    with pytest.raises(ValueError, match="unknown recipe 'fp4'.*valid recipes"):
        qtrain.convert(TinyLM(), "fp4")


def test_unsupported_weight_dtype_raises():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.float64))
    with pytest.raises(TypeError, match="float64.*accepted: float32, bfloat16, float16"):
        qtrain.convert(model, "switchback", filter_fn=lambda m, n: True)


def test_report_lists_layers_and_errors():
    model = qtrain.convert(TinyLM(), "switchback")
    assert "-" in qtrain.report(model)
    with qtrain.track_errors(model):
        model(torch.randint(0, 64, (2, 8)))
    rep = qtrain.report(model)
    assert "fc1" in rep and "switchback" in rep and "y SQNR dB" in rep
    assert not model.fc1.track_errors
    assert qtrain.report(TinyLM()).startswith("no QuantLinear")


def test_default_filter_skipping_everything_warns_and_returns_the_model(monkeypatch, caplog):
    convert_mod = importlib.import_module("qtrain.nn.convert")
    monkeypatch.setattr(convert_mod, "skip_reason", lambda m, name, tied: "smaller than 2048 features")
    model = TinyLM()
    with caplog.at_level("WARNING", logger="qtrain"):
        assert qtrain.convert(model, "switchback") is model
    assert "no layer converted" in caplog.text and "fc1 (smaller than 2048 features)" in caplog.text
    assert isinstance(model.fc1, nn.Linear)
    with pytest.raises(ValueError, match="no linear layer to convert"):          # an explicit filter: an error
        qtrain.convert(TinyLM(), "switchback", filter_fn=lambda m, n: False)


def test_converting_twice_says_so_and_0d_input_is_refused():
    model = qtrain.convert(TinyLM(), "switchback")
    with pytest.raises(ValueError, match="already converted.*2 QuantLinear.*'switchback'"):
        qtrain.convert(model, "fallback")
    with pytest.raises(ValueError, match="0-D"):
        model.fc1(torch.tensor(1.0))
