"""A tiny model trained 100 steps with each quantized preset ends within 2 % of the unquantized loss (same
seed/data); the int4 preset within 3 % (its METHODS.md/issue target)."""
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

import qtrain


class BytesMLP(nn.Module):
    """Next-byte prediction from the previous ``ctx`` bytes: embedding → 2 hidden layers → head."""

    def __init__(self, ctx=16, d=32, hidden=256):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.fc1 = nn.Linear(ctx * d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, 256)

    def forward(self, idx):
        h = self.emb(idx).flatten(1)
        return self.lm_head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _text() -> torch.Tensor:
    data = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes()[:200_000]
    return torch.tensor(list(data), dtype=torch.long)


def _train(recipe: str, steps=100, ctx=16, batch=128) -> float:
    torch.manual_seed(0)
    model = BytesMLP(ctx)
    if recipe != "none":
        qtrain.convert(model, recipe)
    opt = qtrain.optim.StableAdamW(model.parameters(), lr=3e-3)
    data = _text()
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        x = torch.stack([data[j:j + ctx] for j in i.tolist()])
        y = data[i + ctx]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.parametrize("recipe", ["switchback", "switchback_m", "fallback", "int4"])
def test_preset_trains_like_bf16(recipe):
    ref, quantized = _train("bf16"), _train(recipe)
    assert ref < 3.5  # it learned something (uniform over bytes is 5.5)
    # int4: METHODS.md/issue 9 target 3 % (measured +1.4 % here: 2.018 vs 1.991; INT4 GEMMs with LSS gradients)
    tol = 0.03 if recipe == "int4" else 0.02
    assert abs(quantized - ref) / ref < tol, (recipe, quantized, ref)
