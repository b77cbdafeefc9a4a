"""Data-parallel training under ``torchrun``: DDP over every process (NCCL on GPUs, gloo on CPUs).

Each process draws the same global batch (``--batch-size`` × processes sequences per micro-step) from the shared
seed and trains on its own slice, so a run on N processes sees the data of a single-process run with N times the
batch size. Only rank 0 writes the log, checkpoints, plots and sample; every process evaluates its share of the
validation batches.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qtrain.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` set up (once per process); return the world and this process' device
    (``cuda:LOCAL_RANK`` on GPUs)."""
    if not launched():
        return World(), device
    if not dist.is_available():
        raise UserError("this torch has no torch.distributed: run a single process (without torchrun)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index not in (None, local):
            raise UserError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device "
                            "cuda or auto")
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: start at most "
                            "that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local), device


def wrap(model: torch.nn.Module, world: World, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """``model`` in DDP when there are several processes (after ``qtrain.convert``, before ``torch.compile``);
    with ``fsdp``, sharded in place by FSDP2: each transformer block (``model.blocks()``), then the rest."""
    if fsdp:
        if world.size == 1:
            raise UserError("--fsdp shards the model over several processes: launch with torchrun "
                            "--nproc-per-node N (N > 1), or drop --fsdp")
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks():
            fully_shard(block)
        return fully_shard(model)
    if world.size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def broadcast_buffers(buffers: list[torch.Tensor], world: World) -> None:
    """Rank 0's values of ``buffers`` on every process, in place: one broadcast per dtype. DDP does this for the
    model's buffers before each training forward; FSDP2 does not, so without it state a layer updates from its
    process' data (fallback thresholds) would drift apart between processes."""
    if world.size == 1 or not buffers:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault(b.dtype, []).append(b)
    for group in groups.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=0)
        for b, v in zip(group, flat.split([b.numel() for b in group])):
            b.copy_(v.view_as(b))


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj, world: World):
    """Rank 0's ``obj`` on every process."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list | None:
    """Every process' ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def session():
    """Around a command: leave the process group at the end — together after success (a process that tears
    gloo down while a peer still writes the run folder can abort at exit), at once after an error (a peer may
    never reach the barrier)."""
    try:
        yield
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
