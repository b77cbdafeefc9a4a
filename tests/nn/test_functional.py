"""The stochastic-rounding generators: one per device, whatever the device is called, and ``reseed`` resets the
generator the ops draw from."""
from __future__ import annotations

import pytest
import torch

from qtrain import ops
from qtrain.nn import functional


def test_generator_key_gives_cuda_its_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert functional._generator_key("cuda") == torch.device("cuda", 3)
    assert functional._generator_key(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert functional._generator_key("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_reseed_resets_what_the_ops_draw(device):
    saved = dict(functional._SR_GENERATORS)
    try:
        x = torch.randn(64, 256, device=device)
        draws = []
        for _ in range(2):
            functional.reseed(7)
            draws.append(ops.quantize_blockwise_sr(x, 1, 128)[0])
        assert torch.equal(draws[0], draws[1])
        assert functional.sr_generator(device) is functional.sr_generator(x.device)
    finally:
        functional._SR_GENERATORS.clear()
        functional._SR_GENERATORS.update(saved)
