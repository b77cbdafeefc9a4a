import copy
import math

import pytest
import torch

from qtrain.optim import StableAdamW


def transcription(theta, grads, lr, betas, eps, wd):
    """METHODS.md § StableAdamW, literally, one tensor in float64."""
    b1, b2 = betas
    m = torch.zeros_like(theta)
    u = torch.zeros_like(theta)
    out, clipped = [], 0
    for t, g in enumerate(grads, start=1):
        b1h = b1 * (1 - b1 ** (t - 1)) / (1 - b1 ** t)
        b2h = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
        m = b1h * m + (1 - b1h) * g
        u = b2h * u + (1 - b2h) * g * g
        rms = math.sqrt((g * g / torch.clamp(u, min=eps * eps)).mean().item())
        eta = lr / max(1.0, rms)
        clipped += rms > 1
        theta = theta - lr * wd * theta - eta * m / (u.sqrt() + eps)
        out.append(theta.clone())
    return out, clipped


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_formula(wd):
    torch.manual_seed(0)
    shapes = [(7, 5), (13,)]
    thetas = [torch.randn(s, dtype=torch.float64) for s in shapes]
    # growing gradient scale: later steps trigger the update clipping (RMS > 1)
    grads = [[torch.randn(s, dtype=torch.float64) * (1 + 3 * t) for t in range(6)] for s in shapes]
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    opt = StableAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    results = [transcription(t, g, 1e-2, (0.9, 0.99), 1e-6, wd) for t, g in zip(thetas, grads)]
    expected = [r[0] for r in results]
    assert all(r[1] > 0 for r in results)  # the update clipping was exercised
    for step in range(6):
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e[step], rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    make = lambda: torch.nn.Linear(8, 4)  # noqa: E731
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    oa = StableAdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(16, 8)
    for _ in range(3):
        oa.zero_grad()
        a(x).pow(2).mean().backward()
        oa.step()
    b.load_state_dict(a.state_dict())
    ob = StableAdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        StableAdamW([torch.nn.Parameter(torch.zeros(1))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="eps"):
        StableAdamW([torch.nn.Parameter(torch.zeros(1))], eps=0)
