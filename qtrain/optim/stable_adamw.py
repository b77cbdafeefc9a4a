"""StableAdamW (Wortsman et al. 2023): AdamW with AdaFactor-style update clipping, per parameter tensor.

For step ``t ≥ 1``, gradient ``g``, first/second moments ``m``/``u`` (METHODS.md § StableAdamW)::

    β̂1 = β1·(1 − β1^(t−1)) / (1 − β1^t),   β̂2 = β2·(1 − β2^(t−1)) / (1 − β2^t)
    m ← β̂1·m + (1 − β̂1)·g,                u ← β̂2·u + (1 − β̂2)·g²
    RMS = sqrt(mean(g² / max(u, ε²))),      η = lr / max(1, RMS)
    θ ← θ − lr·λ·θ − η · m / (sqrt(u) + ε)

Weight decay uses the unclipped ``lr``. The clipping replaces gradient-norm clipping.

Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism) are updated on their local shards,
with plain ``foreach`` ops (DTensor has no sharding strategy for some of them, e.g. ``_foreach_clamp_min`` in
torch 2.11); the RMS stays the mean over the whole tensor: each process sums its shard, one all-reduce per group
of parameters sharded alike adds the sums over the mesh dimensions they are sharded on, and the sum is divided by
the global element count.

Plain CUDA parameters of dtype fp32, bf16 or fp16 take the fused Triton update
(:func:`qtrain.kernels.stable_adamw.stable_adamw_update`: three launches per group of parameters, ~2 passes over
each tensor's θ, g, m, u instead of ~13) unless qtrain's backend is ``reference`` (``qtrain.ops``); see
:func:`fused_kernel`. Everything else — CPU, DTensors, fp64, non-contiguous or unaligned tensors — takes the
``foreach`` path, which is also the fused kernel's reference twin: for fp32 the two agree to a few ulps; for
bf16/fp16 the kernel rounds once per stored value where the ``foreach`` path rounds after every op. The fused path
never synchronizes with the host.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim import Optimizer

from qtrain import ops

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a torch without torch.distributed (or older than 2.5): no sharded parameters to meet
    DTensor = None


class StableAdamW(Optimizer):
    """StableAdamW: a fused kernel for plain CUDA parameters, ``foreach`` tensor ops otherwise (module docstring).
    Defaults: ``betas=(0.9, 0.99)``, ``eps=1e-6``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"lr must be ≥ 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _beta_hat(beta: float, t: int) -> float:
        return beta * (1 - beta ** (t - 1)) / (1 - beta ** t)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            by_step: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step[(state["step"], p.device, p.dtype, _sharding(p))].append(p)
            for (t, _, _, sharding), params in by_step.items():
                self._update(params, sharding, t, lr, beta1, beta2, eps, wd)
        return loss

    def _update(self, params, sharding, t, lr, beta1, beta2, eps, wd):
        """One step for ``params`` (same step, device, dtype and sharding): the fused kernel where it serves them,
        the ``foreach`` path for the rest."""
        b1, b2 = self._beta_hat(beta1, t), self._beta_hat(beta2, t)
        kernel = fused_kernel(params[0].device, params[0].dtype, sharding)
        if kernel is not None:
            lists, rest = ([], [], [], []), []
            for p in params:
                tensors = (p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"])
                if fusable(*tensors):
                    for ts, x in zip(lists, tensors):
                        ts.append(x)
                else:
                    rest.append(p)
            if lists[0]:
                kernel(*lists, lr=lr, beta1_hat=b1, beta2_hat=b2, eps=eps, weight_decay=wd)
            params = rest
        if params:
            self._update_foreach(params, sharding, b1, b2, lr, eps, wd)

    def _update_foreach(self, params, sharding, b1, b2, lr, eps, wd):
        """The reference: ``foreach`` ops on plain (local) tensors, any device, dtype and sharding."""
        ps = [_local(p) for p in params]
        grads = [_local_grad(p) for p in params]
        ms = [_local(self.state[p]["exp_avg"]) for p in params]
        us = [_local(self.state[p]["exp_avg_sq"]) for p in params]
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(us, b2)
        torch._foreach_addcmul_(us, grads, grads, value=1 - b2)

        # RMS² = mean(g² / max(u, ε²)) over each whole tensor: the ratio is ≥ 0, so its sum is its L1 norm
        ratio = torch._foreach_mul(grads, grads)
        torch._foreach_div_(ratio, torch._foreach_clamp_min(us, eps * eps))
        acc = torch.float64 if ps[0].dtype == torch.float64 else torch.float32
        sums = torch.stack(torch._foreach_norm(ratio, 1, dtype=acc))
        del ratio
        if sharding is not None and any(pl.is_shard() for pl in sharding[1]):
            mesh, placements = sharding
            sums = DTensor.from_local(sums, mesh, [Partial("sum") if pl.is_shard() else Replicate()
                                                   for pl in placements], run_check=False).full_tensor()
        numel = torch.tensor([p.numel() for p in params], dtype=acc, device=sums.device)
        etas = lr / torch.clamp_min((sums / numel).sqrt(), 1.0)

        denom = torch._foreach_sqrt(us)
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(ms, denom)
        del denom
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_mul_(updates, list(etas.to(updates[0].dtype).unbind()))
        torch._foreach_sub_(ps, updates)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_triton = None


def fused_kernel(device: torch.device, dtype: torch.dtype, sharding):
    """The fused update (``qtrain.kernels.stable_adamw.stable_adamw_update``) for parameters on ``device`` of
    ``dtype`` and ``sharding`` (None: plain tensors), or None where the ``foreach`` path serves them: backend
    ``reference``, a device other than CUDA (backend ``triton`` included: the optimizer never runs the
    interpreter), sharded parameters, a dtype other than fp32/bf16/fp16, or no Triton."""
    global _triton
    if device.type != "cuda" or sharding is not None or dtype not in _FUSED_DTYPES:
        return None
    if ops.get_backend() == "reference":
        return None
    if _triton is None:
        _triton = ops.triton_available()
    if not _triton:
        return None
    from qtrain.kernels.stable_adamw import stable_adamw_update
    return stable_adamw_update


def fusable(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether the fused kernel takes this parameter (its gradient and moments): same dtype, all contiguous and
    16-byte aligned (its vector loads), plain tensors."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == p.dtype and t.is_contiguous()
               and t.data_ptr() % 16 == 0 for t in (p, g, m, u))


def _sharding(p: torch.Tensor):
    """``(mesh, placements)`` of a DTensor parameter, None for a plain tensor."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError(f"StableAdamW: a parameter with a partial placement {p.placements} (sum it first)")
    return p.device_mesh, tuple(p.placements)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process' shard of a DTensor (its storage: in-place ops update the DTensor), a plain tensor as is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``'s local shard, laid out like ``p``'s (a gradient sharded otherwise is redistributed)."""
    g = p.grad
    if DTensor is None or not isinstance(p, DTensor):
        return g
    if not isinstance(g, DTensor):
        raise RuntimeError("StableAdamW: a DTensor parameter with a plain-tensor gradient")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()
