"""QuantLinear under FSDP2 (``fully_shard``): 2 CPU processes (gloo) match one process on the whole batch.

The sharded run trains inside ``qtrain.reuse_quantized_weights`` and the single-process reference without it, so
the test also guards weight reuse under FSDP2, which re-gathers each weight every forward without bumping its
version: a reused INT8 weight that missed the optimizer's updates would drift from the reference (only where
the gathered weight lands at the same address again, so not on every run; tests/nn/test_linear.py checks the
invalidation itself deterministically).
FSDP2 must also not see a view as a layer's output (it warns: in-place ops on it would skip its hooks).
The workers refuse DTensor foreach ops (``dtensor_strict``), as the GPU's torch 2.11 lacked some of them, which
the default optimizer, StableAdamW, once used on the DTensor parameters.
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qtrain

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed.fsdp (FSDP2, torch ≥ 2.6)")

from .dtensor_strict import refuse_foreach  # noqa: E402

STEPS = 4


def _model():
    torch.manual_seed(0)
    return qtrain.convert(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(),
                                        nn.Linear(48, 16)), "switchback", filter_fn=lambda m, n: True)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 32, generator=g), torch.randn(8, 5, 16, generator=g)


def _train(model, x, y):
    opt = qtrain.optim.StableAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _worker(rank, world, init_file, out_dir):

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    refuse_foreach()
    model = _model()
    for layer in model:
        if isinstance(layer, qtrain.QuantLinear):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    x, y = _data()
    shard = slice(rank * 4, rank * 4 + 4)
    with warnings.catch_warnings(record=True) as caught, qtrain.reuse_quantized_weights(model):
        warnings.simplefilter("always")
        losses = _train(model, x[shard], y[shard])
    dist.all_reduce(losses)
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"state": state, "losses": losses / world, "warnings": [str(w.message) for w in caught]},
                   os.path.join(out_dir, "fsdp.pt"))
    dist.barrier()                                  # leave together: gloo may abort a peer still saving
    # exit without torch's teardown: destroying the DDP Reducer / gloo group can deadlock on the GIL against
    # gloo's worker thread (seen once in CI, torch 2.13); the results are saved, os._exit is code 0 to mp.spawn
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
def test_fsdp2_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert not [w for w in got["warnings"] if "view" in w], got["warnings"]
    model = _model()
    x, y = _data()
    losses = _train(model, x, y)
    torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6)
    assert got["state"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6)
