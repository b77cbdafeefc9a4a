"""The fused StableAdamW kernel against the ``foreach`` reference, and the dispatch between them.

Gate (fp32): every element within ``1e-6 · scale`` of the reference — about 8 ulps of the largest value that
entered the quantity: ``scale`` is ``max |θ|`` for θ, the largest ``|g|`` seen so far for m, the largest ``g²``
seen so far for u. The kernel computes the same fp32 operations in the same order; what differs is FMA
contraction (the CPU reference's vectorized ``lerp``/``addcmul`` use FMAs, the interpreter does not), and the
order of the RMS sum (η differs by a few ulps where clipping is active). A per-element relative gate would be
wrong: ``lerp`` cancels (a small m from a large g), so a 1-ulp difference in the large operands is a large
relative difference in the result, and it carries over to the following steps. θ starts at the scale of trained
weights (0.02) so that its update (lr = 1e-2) is not lost below θ's own rounding.
"""
import copy
import functools

import pytest
import torch

from qtrain import ops
from qtrain.optim import StableAdamW, stable_adamw
from qtrain.kernels.stable_adamw import stable_adamw_update

SHAPES = [(37, 29), (300,), (5,), (1,), (3, 0)]     # ragged: non-multiples of the block, one of one element, empty
BLOCK, ITERS = 128, 2                               # small chunks: several per tensor, partial last ones
LR, BETAS, EPS = 1e-2, (0.9, 0.99), 1e-6
# The kernel runs on CUDA tensors where there is a GPU, else on CPU tensors under Triton's interpreter; the
# foreach reference always on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def grads_at(t, shapes, dtype=torch.float32):
    """Even tensors: gradients growing with the step (RMS > 1, clipped); odd ones: shrinking (RMS < 1)."""
    return [torch.randn(s, dtype=dtype) * ((1 + 3 * t) if i % 2 == 0 else 1 / t) for i, s in enumerate(shapes)]


def rms(g, u):
    return (g * g / u.clamp_min(EPS * EPS)).mean().sqrt().item()


def assert_within(out, ref, scale, what):
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 1e-6 * scale, f"{what}: max |fused − reference| = {err:.3g} > 1e-6 · {scale:.3g}"


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_kernel_matches_foreach_reference(wd):
    torch.manual_seed(0)
    thetas = [0.02 * torch.randn(s) for s in SHAPES]
    ref = [torch.nn.Parameter(t.clone()) for t in thetas]
    opt = StableAdamW(ref, lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)      # CPU: the foreach path
    ps = [t.to(DEV) for t in thetas]
    ms, us = [torch.zeros_like(t) for t in ps], [torch.zeros_like(t) for t in ps]
    gmax = [0.0] * len(SHAPES)
    clipped = unclipped = 0
    for t in range(1, 6):
        grads = grads_at(t, SHAPES)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        stable_adamw_update(ps, [g.to(DEV) for g in grads], ms, us, lr=LR,
                            beta1_hat=StableAdamW._beta_hat(BETAS[0], t), beta2_hat=StableAdamW._beta_hat(BETAS[1], t),
                            eps=EPS, weight_decay=wd, block=BLOCK, iters=ITERS)
        for i, (r, p, m, u, g) in enumerate(zip(ref, *([x.cpu() for x in xs] for xs in (ps, ms, us)), grads)):
            if g.numel() == 0:
                continue
            state = opt.state[r]
            gmax[i] = max(gmax[i], g.abs().max().item())
            assert_within(m, state["exp_avg"], gmax[i], f"step {t} tensor {i} m")
            assert_within(u, state["exp_avg_sq"], gmax[i] ** 2, f"step {t} tensor {i} u")
            assert_within(p, r.detach(), r.detach().abs().max().item(), f"step {t} tensor {i} θ")
            if g.numel() > 1:
                clipped += rms(g, state["exp_avg_sq"]) > 1.001
                unclipped += rms(g, state["exp_avg_sq"]) < 0.999
    assert clipped and unclipped       # both sides of the update clipping were exercised


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_16bit_rounds_once(dtype):
    """bf16/fp16: one step from a random state. m and u are the fp32 reference's, rounded once; θ is the formula
    (in fp64) from the stored 16-bit m and u (as the kernel reads them back), rounded once — to within one ulp
    of the dtype, since an fp32 ulp of difference can land on the other side of a rounding."""
    torch.manual_seed(1)
    shapes, t, wd = [(37, 29), (300,)], 5, 0.1
    thetas = [(0.02 * torch.randn(s)).to(dtype) for s in shapes]
    grads = [g.to(dtype) for g in grads_at(t, shapes)]
    ms = [(0.5 * torch.randn(s)).to(dtype) for s in shapes]
    us = [torch.rand(s).to(dtype) for s in shapes]
    ref = [torch.nn.Parameter(x.float()) for x in thetas]
    opt = StableAdamW(ref, lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
    for r, g, m, u in zip(ref, grads, ms, us):
        r.grad = g.float()
        opt.state[r] = {"step": t - 1, "exp_avg": m.float(), "exp_avg_sq": u.float()}
    opt.step()
    theta0 = [x.double() for x in thetas]
    thetas, grads, ms, us = ([x.to(DEV) for x in xs] for xs in (thetas, grads, ms, us))
    stable_adamw_update(thetas, grads, ms, us, lr=LR, beta1_hat=StableAdamW._beta_hat(BETAS[0], t),
                        beta2_hat=StableAdamW._beta_hat(BETAS[1], t), eps=EPS, weight_decay=wd,
                        block=BLOCK, iters=ITERS)
    rel = torch.finfo(dtype).eps
    thetas, grads, ms, us = ([x.cpu() for x in xs] for xs in (thetas, grads, ms, us))
    for r, p, m, u, g, p0 in zip(ref, thetas, ms, us, grads, theta0):
        assert p.dtype == m.dtype == u.dtype == dtype
        assert torch.equal(m, opt.state[r]["exp_avg"].to(dtype))
        assert torch.equal(u, opt.state[r]["exp_avg_sq"].to(dtype))
        g, m, u = g.double(), m.double(), u.double()
        eta = LR / max(1.0, (g * g / u.clamp_min(EPS * EPS)).mean().sqrt().item())
        expected = (p0 * (1 - LR * wd) - eta * m / (u.sqrt() + EPS)).to(dtype)
        torch.testing.assert_close(p.float(), expected.float(), rtol=rel, atol=0.0)


def test_kernel_rejects_mixed_or_strided_tensors():
    a, b = torch.zeros(8, device=DEV), torch.zeros(8, dtype=torch.float64, device=DEV)
    kw = dict(lr=LR, beta1_hat=0.0, beta2_hat=0.0, eps=EPS, weight_decay=0.0)
    with pytest.raises(ValueError, match="dtype"):
        stable_adamw_update([a], [a.clone()], [a.clone()], [b], **kw)
    strided = torch.zeros(8, 2, device=DEV)[:, 0]
    with pytest.raises(ValueError, match="contiguous"):
        stable_adamw_update([strided], [a.clone()], [a.clone()], [a.clone()], **kw)


def test_dispatch():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert stable_adamw.fused_kernel(cuda, torch.float32, None) is stable_adamw_update
    assert stable_adamw.fused_kernel(cuda, torch.bfloat16, None) is stable_adamw_update
    assert stable_adamw.fused_kernel(cpu, torch.float32, None) is None
    assert stable_adamw.fused_kernel(cuda, torch.float64, None) is None
    assert stable_adamw.fused_kernel(cuda, torch.float32, ("mesh", ("Shard(0)",))) is None    # a DTensor's
    for backend in ("reference", "triton"):
        with ops.use_backend(backend):
            assert stable_adamw.fused_kernel(cpu, torch.float32, None) is None
            assert (stable_adamw.fused_kernel(cuda, torch.float32, None) is None) == (backend == "reference")
    x = torch.zeros(64)
    assert stable_adamw.fusable(x, x.clone(), x.clone(), x.clone())
    assert not stable_adamw.fusable(x, x.clone(), x.clone(), x.double())
    assert not stable_adamw.fusable(x, torch.zeros(64, 2)[:, 0], x.clone(), x.clone())           # strided
    assert not stable_adamw.fusable(x, x.clone(), x.clone(), torch.zeros(65)[1:])                  # 4-byte offset


def transposed(x):
    """A copy of 2-D ``x`` laid out column-major (not contiguous)."""
    return torch.empty(x.shape[::-1]).t().copy_(x)


def test_optimizer_fused_path_splits_and_matches(monkeypatch):
    """StableAdamW through the fused path (forced, on DEV): fusable parameters go to the kernel, one launch set
    per group; a strided one stays on the foreach path; results match the all-foreach optimizer (on the CPU)."""
    calls = []

    def kernel(*lists, **kw):
        calls.append(len(lists[0]))
        stable_adamw_update(*lists, **kw, block=BLOCK, iters=ITERS)

    torch.manual_seed(2)
    shapes = [(37, 29), (300,), (6, 4)]
    thetas = [0.02 * torch.randn(s) for s in shapes]
    make = lambda d: [torch.nn.Parameter(thetas[0].to(d)), torch.nn.Parameter(thetas[1].to(d)),  # noqa: E731
                      torch.nn.Parameter(transposed(thetas[2]).to(d))]
    ref, fused = make("cpu"), make(DEV)
    assert not fused[2].is_contiguous()
    opt_ref = StableAdamW(ref, lr=LR, weight_decay=0.1)
    opt = StableAdamW(fused, lr=LR, weight_decay=0.1)
    for t in range(1, 4):
        grads = grads_at(t, shapes)
        for params in (ref, fused):
            for p, g in zip(params, grads):
                p.grad = (g.clone() if p.is_contiguous() else transposed(g)).to(p.device)
        opt_ref.step()
        with monkeypatch.context() as mp:
            mp.setattr(stable_adamw, "fused_kernel", lambda *a: kernel)
            opt.step()
        for r, p in zip(ref, fused):
            assert_within(p.detach().cpu(), r.detach(), r.detach().abs().max().item(), f"step {t}")
    assert calls == [2, 2, 2]


# ------------------------------------------------------------------------------------------------ on the GPU
def _run(params_like, grads, backend, steps, wd=0.1):
    params = [torch.nn.Parameter(p.clone()) for p in params_like]
    opt = StableAdamW(params, lr=LR, weight_decay=wd)
    with ops.use_backend(backend):
        for t in range(steps):
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()
    return params, opt


@pytest.mark.gpu
def test_gpu_fused_matches_foreach(monkeypatch):
    from qtrain.kernels import stable_adamw as kernels

    torch.manual_seed(0)
    shapes = [(4096, 1000), (11008,), (37, 29), (1,)]
    thetas = [0.02 * torch.randn(s, device="cuda") for s in shapes]
    grads = [[g.cuda() for g in grads_at(t, shapes)] for t in range(1, 6)]
    calls = []
    monkeypatch.setattr(kernels, "stable_adamw_update",
                        functools.wraps(stable_adamw_update)(lambda *a, **k: calls.append(1) or
                                                             stable_adamw_update(*a, **k)))
    ref, opt_ref = _run(thetas, grads, "reference", 5)
    assert not calls
    out, opt = _run(thetas, grads, "auto", 5)
    assert len(calls) == 5
    for i, (r, p) in enumerate(zip(ref, out)):
        gmax = max(g[i].abs().max().item() for g in grads)
        assert_within(opt.state[p]["exp_avg"], opt_ref.state[r]["exp_avg"], gmax, f"tensor {i} m")
        assert_within(opt.state[p]["exp_avg_sq"], opt_ref.state[r]["exp_avg_sq"], gmax ** 2, f"tensor {i} u")
        assert_within(p.detach(), r.detach(), r.detach().abs().max().item(), f"tensor {i} θ")


@pytest.mark.gpu
def test_gpu_fused_step_does_not_synchronize():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(512, 384), (1000,)]]
    opt = StableAdamW(params, lr=LR, weight_decay=0.1)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)       # new gradient tensors: the address table is uploaded again
        torch.cuda.set_sync_debug_mode("error" if step else 0)
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.gpu
def test_gpu_compiled_model_trains_alike():
    """A torch.compile'd model: the (eager) optimizer step on its gradients, fused against foreach."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(64, 256, device="cuda")
    results = {}
    for backend in ("reference", "auto"):
        model = copy.deepcopy(base)
        compiled = torch.compile(model)
        opt = StableAdamW(model.parameters(), lr=LR, weight_decay=0.1)
        with ops.use_backend(backend):
            for _ in range(3):
                opt.zero_grad()
                compiled(x).pow(2).mean().backward()
                opt.step()
        results[backend] = [p.detach().clone() for p in model.parameters()]
    for r, p in zip(results["reference"], results["auto"]):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
