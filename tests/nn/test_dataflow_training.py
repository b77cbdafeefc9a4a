"""Training parity of the Jetfire presets (the gate of tests/nn/test_training_parity.py: 100 steps, same seed and
data, final loss within 2 % of the unquantized run on CPU): qtrain's tiny LLaMA/GPT-2 with both blocks on the
INT8 data flow, and the byte MLP (no transformer block: plain QuantLinear layers with jetfire's GEMMs)."""
import functools

import pytest
import torch

import qtrain
from qtrain import models
from qtrain.nn.functional import reseed

from .test_training_parity import _text, _train


@functools.lru_cache(maxsize=None)
def _train_lm(family: str, recipe: str, steps=100, ctx=32, batch=16, sr_seed=0) -> float:
    """A 2-layer d 64 qtrain LLaMA/GPT-2 on bytes; a data-flow recipe swaps both blocks. ``sr_seed`` seeds the
    stochastic rounding (the model, data and optimizer are the same for every seed)."""
    torch.manual_seed(0)
    reseed(sr_seed)               # SR draws independent of the tests run before
    cfg = models.ModelConfig(family, d_model=64, n_layer=2, n_head=4, ffn_hidden=128 if family == "llama" else 256,
                             max_seq_len=ctx)
    model = models.build_from_config(cfg)
    if recipe != "none":
        qtrain.convert(model, recipe)
        assert all(isinstance(b, qtrain.nn.dataflow.DATAFLOW_BLOCKS) for b in model.blocks())
    opt = qtrain.optim.StableAdamW(model.parameters(), lr=3e-3)
    data = _text()
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        x = torch.stack([data[j:j + ctx + 1] for j in i.tolist()])
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


# jetfire_wide trains as well (llama: 1.8815 vs 1.8952, -0.72 %) but is left to the SQNR tests to keep CI short
@pytest.mark.parametrize("family,recipe", [("llama", "jetfire"), ("gpt2", "jetfire")])
def test_dataflow_model_trains_like_fp32(family, recipe):
    """The mean over three SR seeds: one run's final loss moves by ~1 % with the last bits of an fp32 formula
    (seen: +1.35 % and +2.38 % for two exact forms of the GELU derivative), the gate's own size."""
    ref = _train_lm(family, "none")
    quantized = sum(_train_lm(family, recipe, sr_seed=s) for s in range(3)) / 3
    print(family, recipe, "loss", round(quantized, 4), "vs", round(ref, 4), f"gap {100 * (quantized - ref) / ref:+.2f} %")
    assert ref < 3.2  # it learned something (uniform over bytes is 5.5)
    assert abs(quantized - ref) / ref < 0.02, (recipe, quantized, ref)


def test_jetfire_plain_linears_train_like_bf16():
    ref, quantized = _train("bf16"), _train("jetfire")
    print("bytes MLP jetfire loss", round(quantized, 4), "vs", round(ref, 4), f"gap {100 * (quantized - ref) / ref:+.2f} %")
    assert abs(quantized - ref) / ref < 0.02, (quantized, ref)
