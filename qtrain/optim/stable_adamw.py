"""StableAdamW (Wortsman et al. 2023): AdamW with AdaFactor-style update clipping, per parameter tensor.

For step ``t ≥ 1``, gradient ``g``, first/second moments ``m``/``u`` (METHODS.md § StableAdamW)::

    β̂1 = β1·(1 − β1^(t−1)) / (1 − β1^t),   β̂2 = β2·(1 − β2^(t−1)) / (1 − β2^t)
    m ← β̂1·m + (1 − β̂1)·g,                u ← β̂2·u + (1 − β̂2)·g²
    RMS = sqrt(mean(g² / max(u, ε²))),      η = lr / max(1, RMS)
    θ ← θ − lr·λ·θ − η · m / (sqrt(u) + ε)

Weight decay uses the unclipped ``lr``. The clipping replaces gradient-norm clipping.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim import Optimizer


class StableAdamW(Optimizer):
    """StableAdamW with ``foreach`` tensor ops. Defaults: ``betas=(0.9, 0.99)``, ``eps=1e-6``."""

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
                by_step[(state["step"], p.device, p.dtype)].append(p)
            for (t, _, _), params in by_step.items():
                self._update(params, t, lr, beta1, beta2, eps, wd)
        return loss

    def _update(self, params, t, lr, beta1, beta2, eps, wd):
        grads = [p.grad for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        us = [self.state[p]["exp_avg_sq"] for p in params]
        b1, b2 = self._beta_hat(beta1, t), self._beta_hat(beta2, t)
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(us, b2)
        torch._foreach_addcmul_(us, grads, grads, value=1 - b2)

        ratio = torch._foreach_div(torch._foreach_mul(grads, grads), torch._foreach_clamp_min(us, eps * eps))
        mean_ratio = [r.mean() if r.dtype == torch.float64 else r.float().mean() for r in ratio]
        denom = torch._foreach_add(torch._foreach_sqrt(us), eps)
        updates = torch._foreach_div(ms, denom)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        for p, upd, mr in zip(params, updates, mean_ratio):
            eta = lr / torch.clamp_min(mr.sqrt(), 1.0)
            p.sub_(upd * eta.to(upd.dtype))
