"""INT4 calibration under torch.distributed (2 CPU processes, gloo): refused outside ``qtrain.calibrate``,
compared across processes inside it, and kept through FSDP2 (whose forward once lost the steps it wrote: every
INT4 layer then trained from the −1 placeholder)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qtrain

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed.fsdp (FSDP2, torch ≥ 2.6)")


def _model():
    torch.manual_seed(0)
    return qtrain.convert(nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)), "int4",
                          filter_fn=lambda m, n: True)


def _batch(seed):
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))


def _errors(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return str(e)
    return ""


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {"first_forward": _errors(lambda: _model()(_batch(0))),
           "different_batches": _errors(lambda: qtrain.calibrate(_model(), _batch(rank)))}
    model = _model()
    out["calibrated"] = qtrain.calibrate(model, _batch(0))
    steps = [m.int4_step.detach().clone() for m in model if isinstance(m, qtrain.QuantLinear)]
    _shard(model)
    out["sharded"] = _errors(lambda: qtrain.calibrate(_shard(_model()), _batch(0)))
    opt = qtrain.optim.StableAdamW(model.parameters(), lr=1e-4)
    x = _batch(5)[rank * 8:(rank + 1) * 8]
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    full = {k: v.full_tensor() for k, v in model.state_dict().items() if k.endswith("int4_step")}
    if rank == 0:
        torch.save({**out, "steps": steps, "trained": full}, os.path.join(out_dir, "out.pt"))
    dist.barrier()                                  # leave together: gloo may abort a peer still saving
    os._exit(0)                                     # as tests/distributed/test_fsdp.py: no teardown deadlock


def _shard(model):
    """``model`` under FSDP2: each layer, then the whole."""
    for layer in model:
        if isinstance(layer, qtrain.QuantLinear):
            fsdp.fully_shard(layer)
    return fsdp.fully_shard(model)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
def test_int4_calibration_under_torch_distributed(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "Call qtrain.calibrate(model, batch) with the same batch on every process" in out["first_forward"]
    assert "the processes calibrated differently" in out["different_batches"]
    assert "is sharded (FSDP2 fully_shard): calibrate before sharding" in out["sharded"]
    assert out["calibrated"] == 2
    single = _model()
    qtrain.calibrate(single, _batch(0))               # one process, no process group: the same calibration
    ref = [m.int4_step.detach() for m in single if isinstance(m, qtrain.QuantLinear)]
    for got, want in zip(out["steps"], ref):
        assert torch.equal(got, want)
    for name, trained in out["trained"].items():      # trained on from the calibrated steps, under FSDP2
        want = ref[0] if name.startswith("0.") else ref[1]
        assert torch.all(trained > 0) and torch.allclose(trained, want, rtol=0.05), (name, trained, want)
