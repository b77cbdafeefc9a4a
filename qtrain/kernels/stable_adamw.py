"""Fused StableAdamW update (twin of the ``foreach`` path of :mod:`qtrain.optim.stable_adamw`).

``stable_adamw_update(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1_hat, beta2_hat, eps, weight_decay)``
updates every tensor of the lists in place, with the optimizer's math (per tensor, bias-corrected betas given)::

    m ← lerp(m, g, 1 − β̂1),   u ← β̂2·u + (1 − β̂2)·g²
    RMS = sqrt(Σ g² / max(u, ε²) / numel),   η = lr / max(1, RMS)
    θ ← θ·(1 − lr·λ) − η · m / (sqrt(u) + ε)

Contract: four lists of equally long, equally shaped tensors, all contiguous, of one dtype (fp32, bf16 or fp16)
on one device, each data pointer 16-byte aligned; empty tensors are skipped. Arithmetic is fp32 with IEEE
division and square root (``div_rn``/``sqrt_rn``), rounded once per stored value: for fp32 that is the
``foreach`` path's arithmetic up to FMA contraction and the order of the RMS sum (a few ulps); for bf16/fp16 it
is more precise than the ``foreach`` path, which rounds to the parameter dtype after every op (and rounds η to
it), so the two differ by a few ulps of that dtype per step.

Design: one launch per kernel for all tensors of the lists, through a table of their addresses. Each tensor is
cut into chunks of ``block · iters`` elements; the chunk table (which tensor, cached per list of sizes) and the
address table (cached per list of addresses) are uploaded without blocking, so a step never synchronizes with
the host.

1. ``_moments_kernel`` (one program per chunk): reads g, m, u; writes m, u; writes the chunk's partial sum of
   ``g² / max(u, ε²)`` (the stored u) to a buffer — no atomics, so the sum is deterministic.
2. ``_eta_kernel`` (one program per tensor): sums the tensor's partials in a fixed order (fp64), η to a buffer.
3. ``_update_kernel`` (one program per chunk): reads θ, m, u and η; writes θ.

Traffic: 5 accesses per element in kernel 1 and 4 in kernel 3 (the ``foreach`` path makes ~13 passes). On an
H200 at 1.07B fp32 parameters: 10.0 ms a step against 36.5 ms for ``foreach`` (``benchmarks/optimizer.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtrain.kernels._common import TL_OUT, check_device, round_to_bf16

BLOCK = 1024          # elements per inner step of a program
ITERS = 8             # inner steps per program: a chunk is BLOCK · ITERS elements
NUM_WARPS = 8         # 4 elements per thread per inner step: the fastest in fp32 and bf16 (benchmarks/optimizer.py)
SUM_BLOCK = 1024      # partials summed per step of the η kernel
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_SIZE = 16      # entries kept in each table cache

_layouts: dict[tuple, tuple[torch.Tensor, int, int]] = {}
_addresses: dict[tuple, torch.Tensor] = {}


@triton.jit
def _to_dtype(x, DTYPE: tl.constexpr):
    """fp32 → ``DTYPE`` rounded to nearest even (bf16 explicitly: Triton's interpreter truncates that cast)."""
    if DTYPE == tl.bfloat16:
        x = round_to_bf16(x)
    return x.to(DTYPE)


@triton.jit
def _chunk(layout_ptr, n_tensors, CHUNK: tl.constexpr):
    """Tensor index, its element count and the chunk's first element for this program (layout: see ``_layout``)."""
    pid = tl.program_id(0)
    ti = tl.load(layout_ptr + 2 * n_tensors + 1 + pid)
    first = tl.load(layout_ptr + ti)
    numel = tl.load(layout_ptr + n_tensors + 1 + ti)
    return pid, ti, numel, (pid - first) * CHUNK


@triton.jit
def _address(addr_ptr, n_tensors, which: tl.constexpr, ti, DTYPE: tl.constexpr):
    """The data pointer of tensor ``ti`` of list ``which`` (0 θ, 1 g, 2 m, 3 u), 16-byte aligned."""
    return tl.multiple_of(tl.load(addr_ptr + which * n_tensors + ti), 16).to(tl.pointer_type(DTYPE))


@triton.jit
def _moments_kernel(addr_ptr, layout_ptr, partial_ptr, n_tensors, w1, beta2, c2, eps2,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid, ti, numel, start = _chunk(layout_ptr, n_tensors, BLOCK * ITERS)
    g_ptr = _address(addr_ptr, n_tensors, 1, ti, DTYPE)
    m_ptr = _address(addr_ptr, n_tensors, 2, ti, DTYPE)
    u_ptr = _address(addr_ptr, n_tensors, 3, ti, DTYPE)
    acc = tl.zeros([BLOCK], tl.float32)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # torch.lerp's two forms (weight below 0.5 or not), as the foreach path computes it
        m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
        g2 = g * g
        u = u * beta2 + c2 * g2
        m_out = _to_dtype(m, DTYPE)
        u_out = _to_dtype(u, DTYPE)
        tl.store(m_ptr + offs, m_out, mask=mask)
        tl.store(u_ptr + offs, u_out, mask=mask)
        u = u_out.to(tl.float32)
        ratio = tl.math.div_rn(g2, tl.where(u < eps2, eps2, u))   # max(u, ε²), NaN propagated as clamp_min does
        acc += tl.where(mask, ratio, 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _eta_kernel(layout_ptr, partial_ptr, eta_ptr, n_tensors, lr, SUM_BLOCK: tl.constexpr, SUM_ITERS: tl.constexpr):
    """``SUM_ITERS · SUM_BLOCK`` ≥ the most chunks of one tensor (a power of two: few recompilations)."""
    ti = tl.program_id(0)
    first = tl.load(layout_ptr + ti)
    last = tl.load(layout_ptr + ti + 1)
    numel = tl.load(layout_ptr + n_tensors + 1 + ti)
    acc = tl.zeros([SUM_BLOCK], tl.float64)
    for k in range(SUM_ITERS):
        idx = first + k * SUM_BLOCK + tl.arange(0, SUM_BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < last, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0).to(tl.float32)
    rms = tl.sqrt_rn(tl.math.div_rn(total, numel.to(tl.float32)))
    clipped = tl.where(rms < 1.0, 1.0, rms)                         # clamp_min(RMS, 1), NaN propagated
    one = tl.full(clipped.shape, 1.0, tl.float32)
    tl.store(eta_ptr + ti, tl.math.div_rn(one, clipped) * lr)        # lr / x as torch computes it: (1 / x) · lr


@triton.jit
def _update_kernel(addr_ptr, layout_ptr, eta_ptr, n_tensors, decay, eps,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid, ti, numel, start = _chunk(layout_ptr, n_tensors, BLOCK * ITERS)
    p_ptr = _address(addr_ptr, n_tensors, 0, ti, DTYPE)
    m_ptr = _address(addr_ptr, n_tensors, 2, ti, DTYPE)
    u_ptr = _address(addr_ptr, n_tensors, 3, ti, DTYPE)
    eta = tl.load(eta_ptr + ti)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        update = tl.math.div_rn(m, tl.sqrt_rn(u) + eps)
        tl.store(p_ptr + offs, _to_dtype(p * decay - eta * update, DTYPE), mask=mask)


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device``, copied from pinned memory without blocking the host on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def _remember(cache: dict, key, value):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _layout(numels: tuple[int, ...], chunk: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """``(table, n_chunks, max_chunks)``: int64 ``[first chunk of each tensor (T + 1) | numel (T) | tensor of each
    chunk]``, the number of chunks and the most chunks of one tensor."""
    key = (device, chunk, numels)
    hit = _layouts.get(key)
    if hit is not None:
        return hit
    firsts, owner = [0], []
    for i, n in enumerate(numels):
        c = -(-n // chunk)
        owner += [i] * c
        firsts.append(firsts[-1] + c)
    most = max(b - a for a, b in zip(firsts, firsts[1:]))
    return _remember(_layouts, key, (_upload(firsts + list(numels) + owner, device), len(owner), most))


def _address_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 ``[θ addresses | g | m | u]`` on ``device``."""
    key = (device, addresses)
    hit = _addresses.get(key)
    return hit if hit is not None else _remember(_addresses, key, _upload(list(addresses), device))


def _checked_addresses(lists) -> tuple[int, ...]:
    """The data pointers of ``lists`` in table order, after checking the contract."""
    first = lists[0][0]
    dtype, device = first.dtype, first.device
    if dtype not in DTYPES:
        raise TypeError(f"stable_adamw_update takes {', '.join(map(str, DTYPES))} tensors, got {dtype}")
    check_device(first)
    addresses = []
    for ts in lists:
        for i, (t, p) in enumerate(zip(ts, lists[0])):
            if t.dtype != dtype or t.device != device or t.shape != p.shape:
                raise ValueError(f"stable_adamw_update: tensor {i}: every tensor must have dtype {dtype}, "
                                 f"device {device} and the parameter's shape {tuple(p.shape)}")
            address = t.data_ptr()
            if address % 16 or not t.is_contiguous():
                raise ValueError(f"stable_adamw_update: tensor {i} is not contiguous and 16-byte aligned")
            addresses.append(address)
    return tuple(addresses)


@torch.compiler.disable
def stable_adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1_hat: float, beta2_hat: float,
                        eps: float, weight_decay: float, block: int = BLOCK, iters: int = ITERS,
                        num_warps: int = NUM_WARPS) -> None:
    """One StableAdamW step for every tensor of the lists, in place (see the module docstring for the contract).
    ``block`` (a power of two), ``iters`` and ``num_warps`` configure the programs of kernels 1 and 3."""
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError("stable_adamw_update: the four lists differ in length")
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    lists = [[ts[i] for i in keep] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    checked = _checked_addresses(lists)
    device, dtype, n = lists[0][0].device, lists[0][0].dtype, len(keep)
    layout, n_chunks, max_chunks = _layout(tuple(p.numel() for p in lists[0]), block * iters, device)
    addresses = _address_table(checked, device)
    partials = torch.empty(n_chunks, dtype=torch.float32, device=device)
    eta = torch.empty(n, dtype=torch.float32, device=device)
    tl_dtype = TL_OUT[dtype]
    _moments_kernel[(n_chunks,)](addresses, layout, partials, n, 1.0 - beta1_hat, beta2_hat, 1.0 - beta2_hat,
                                 eps * eps, DTYPE=tl_dtype, BLOCK=block, ITERS=iters, num_warps=num_warps)
    _eta_kernel[(n,)](layout, partials, eta, n, lr, SUM_BLOCK=SUM_BLOCK,
                      SUM_ITERS=triton.next_power_of_2(triton.cdiv(max_chunks, SUM_BLOCK)), num_warps=4)
    _update_kernel[(n_chunks,)](addresses, layout, eta, n, 1.0 - lr * weight_decay, eps, DTYPE=tl_dtype,
                                BLOCK=block, ITERS=iters, num_warps=num_warps)
