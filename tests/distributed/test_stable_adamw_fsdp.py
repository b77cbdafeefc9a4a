"""StableAdamW on FSDP2-sharded (DTensor) parameters, as ``qtrain train --fsdp`` runs it: 2 CPU processes (gloo),
the foreach path, against the same optimizer on plain tensors in one process.

The update clipping's RMS is a mean over the whole (global) tensor, not over a process' shard: the shapes shard
unevenly (3 rows → 2 + 1) and into an empty shard (1 row → 1 + 0), the gradients differ in scale from row to
row and grow over the steps, so the clipping engages and a per-shard mean would give other parameters. One
parameter is a replicated DTensor (counted once, not once per process). DTensor's foreach strategies are
dropped in the workers (``dtensor_strict``), as the GPU's torch 2.11 lacked some of them.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qtrain.optim import StableAdamW

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed.fsdp (FSDP2, torch ≥ 2.6)")

from .dtensor_strict import refuse_foreach  # noqa: E402

SHAPES = {"w": (3, 5), "b": (1,), "v": (5,), "m": (4, 6)}
STEPS = 5
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)


def _init() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in {**SHAPES, "r": (2, 3)}.items()}


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    out = {}
    for k, s in {**SHAPES, "r": (2, 3)}.items():
        rows = torch.logspace(0, 2, s[0], dtype=torch.float64).reshape(-1, *[1] * (len(s) - 1))
        out[k] = torch.randn(*s, generator=g, dtype=torch.float64) * rows * (1 + 4 * step) ** 2
    return out


class _Holder(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for k in SHAPES:
            self.register_parameter(k, nn.Parameter(tensors[k].clone()))


def _worker(rank, world, init_file, out_dir):
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    refuse_foreach()
    mesh = init_device_mesh("cpu", (world,))
    init = _init()
    holder = _Holder(init)
    fsdp.fully_shard(holder, mesh=mesh)
    rep = nn.Parameter(distribute_tensor(init["r"], mesh, [Replicate()]))
    params = dict(holder.named_parameters(), r=rep)
    assert params["b"].to_local().numel() == (1 - rank)                # rank 1 holds an empty shard
    opt = StableAdamW(params.values(), **HYPER)
    for step in range(STEPS):
        for k, g in _grads(step).items():
            params[k].grad = distribute_tensor(g, mesh, params[k].placements)
        opt.step()
    full = {k: p.full_tensor() for k, p in params.items()}
    state = {k: {s: opt.state[p][s].full_tensor() for s in ("exp_avg", "exp_avg_sq")} for k, p in params.items()}
    if rank == 0:
        torch.save({"params": full, "state": state}, os.path.join(out_dir, "sharded.pt"))
    dist.barrier()                                  # leave together: gloo may abort a peer still saving
    # exit without torch's teardown: destroying the DDP Reducer / gloo group can deadlock on the GIL against
    # gloo's worker thread (seen once in CI, torch 2.13); the results are saved, os._exit is code 0 to mp.spawn
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
def test_sharded_stable_adamw_matches_unsharded(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "sharded.pt", weights_only=True)
    params = {k: nn.Parameter(t.clone()) for k, t in _init().items()}
    opt = StableAdamW(params.values(), **HYPER)
    clipped = 0
    for step in range(STEPS):
        for k, g in _grads(step).items():
            params[k].grad = g
        if step:
            u = [opt.state[p]["exp_avg_sq"] for p in params.values()]
            b2 = opt._beta_hat(0.99, step + 1)
            clipped += sum(bool((g * g / (b2 * uu + (1 - b2) * g * g).clamp_min(1e-12)).mean() > 1)
                           for g, uu in zip((p.grad for p in params.values()), u))
        opt.step()
    assert clipped > 0                                                    # the update clipping engaged
    for k, p in params.items():
        torch.testing.assert_close(got["params"][k], p.detach(), rtol=1e-12, atol=1e-14, msg=k)
        for s in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["state"][k][s], opt.state[p][s], rtol=1e-12, atol=1e-14, msg=f"{k} {s}")
