"""``QuantLinear``: a drop-in ``nn.Linear`` whose three GEMMs run as a :class:`~qtrain.recipes.Recipe` says."""
from __future__ import annotations

import contextlib
import itertools
import math
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from qtrain import ops, recipes
from qtrain.nn.functional import Operand, emulate
from qtrain.quant import hadamard as _hadamard, lsq as _lsq, lss as _lss
from qtrain.nn.plan import GEMMS, build_plan
from qtrain.quant.fallback import fallback_ratio
from qtrain.quant.core import FLOAT_DTYPES, capturing, relative_error, sqnr


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Any torch optimizer's step invalidates every reused INT8 weight (see QuantLinear).
register_optimizer_step_post_hook(_count_optimizer_step)


def _slot(t: torch.Tensor | None, gemm: str) -> torch.Tensor | None:
    """The one-element view of a per-GEMM ``[3]`` state tensor (fallback threshold or ratio)."""
    if t is None:
        return None
    i = GEMMS.index(gemm)
    return t[i:i + 1]


class QuantLinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b`` for 2-D ``x [M, K]``, ``W [N, K]`` (``[K, N]`` when ``w_kn``), as ``plan`` says.

    Saves for backward: fprop's quantized ``Wᵀ`` when dgrad reuses it (``plan.reuse_wt``); the INT8 X and its
    row scales when the recipe saves the INT8 input, else X in the compute dtype (what ``F.linear`` saves).
    ``wquant``: a reused ``(W, Wᵀ)`` quantization or None. ``tau``/``ratio``: the layer's per-GEMM fallback
    thresholds and last fallback shares (``[3]`` fp32, updated in place when ``update``), or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, plan, w_kn, out_dtype, wquant, tau, ratio, update):
        w = weight.t() if w_kn else weight
        fp = plan.fprop
        x_op = fp.quantize(x, "lhs", _slot(tau, "fprop"), update)
        w_op, wt_op = wquant if wquant is not None else plan.quantize_weight(w)
        y = fp(x_op, w_op, out_dtype, bias)
        _record_ratio(ratio, "fprop", x_op)

        if plan.recipe.save_int8_input:
            x_saved, xs_saved = x_op.q, x_op.scale
        else:
            x_saved, xs_saved = x.to(out_dtype), None
        ctx.save_for_backward(x_saved, xs_saved, weight, bias,
                              wt_op.q if wt_op is not None else None, wt_op.scale if wt_op is not None else None)
        ctx.plan, ctx.w_kn, ctx.out_dtype, ctx.x_dtype = plan, w_kn, out_dtype, x.dtype
        ctx.tau, ctx.ratio, ctx.update = tau, ratio, update
        ctx.wt_meta = (wt_op.path, wt_op.rows, wt_op.block_k) if wt_op is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_saved, xs_saved, weight, bias, wtq, wts = ctx.saved_tensors
        plan, cd = ctx.plan, ctx.out_dtype
        dy = dy.contiguous()
        dx = dw = db = None
        g = gt = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and plan.dual_sr_grad:
            g, gt = plan.quantize_grad(dy)                               # dY read once for both GEMMs
        if ctx.needs_input_grad[0]:
            dg = plan.dgrad
            if wtq is not None:
                wt = Operand(ctx.wt_meta[0], wtq, wts, ctx.wt_meta[1], ctx.wt_meta[2])
            else:
                wt = dg.quantize(weight if ctx.w_kn else weight.t(), "rhs")
            a = g if g is not None else dg.quantize(dy, "lhs", _slot(ctx.tau, "dgrad"), ctx.update)
            _record_ratio(ctx.ratio, "dgrad", a)
            dx = dg(a, wt, ctx.x_dtype if dg.spec.quantized else cd).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            wg = plan.wgrad
            x = Operand("int8", x_saved, xs_saved).dequantize(cd) if xs_saved is not None else x_saved
            a = gt if gt is not None else wg.quantize(dy.t(), "lhs", _slot(ctx.tau, "wgrad"), ctx.update)
            _record_ratio(ctx.ratio, "wgrad", a)
            dw = wg(a, wg.quantize(x.t(), "rhs"), weight.dtype if wg.spec.quantized else cd).to(weight.dtype)
            if ctx.w_kn:
                dw = dw.t()
        if bias is not None and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(bias.dtype)
        return dx, dw, db, None, None, None, None, None, None, None


@torch.no_grad()
def _record_ratio(ratio: torch.Tensor | None, gemm: str, op) -> None:
    if ratio is not None and isinstance(op, Operand) and op.flags is not None:
        _slot(ratio, gemm).copy_(fallback_ratio(op.flags))


# On an accelerator, dgrad's LSS GEMM runs over the kept rows only (a host synchronization for their count) from
# this size of the stacked GEMM, 2M·N·K (half of its work saved at the default budget); smaller ones run over all
# 2M rows with zero scales on the dropped ones: static shapes, no synchronization (small layers are launch-bound).
# On the CPU (nothing to synchronize with) it always gathers.
LSS_GATHER_MIN_OPS = 1 << 38


def _lss_gather(device: torch.device, ops_count: int) -> bool:
    """Whether dgrad's LSS GEMM of ``ops_count`` (2M·N·K) gathers the kept rows (see LSS_GATHER_MIN_OPS); never
    under torch.compile or inside a CUDA graph capture (its host synchronization cannot be captured)."""
    if torch.compiler.is_compiling() or capturing(device):
        return False
    return device.type == "cpu" or ops_count >= LSS_GATHER_MIN_OPS


class Int4LinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b`` on the INT4 paths (``plan.int4``; METHODS.md § INT4 training) for 2-D ``x [M, K]``.

    fprop (``hq_int4``): ``Q(XH)``, ``Q(WH)`` with the block-diagonal Hadamard ``H`` of order ``block`` and the
    per-tensor steps ``step = [s_X, s_W]`` (LSQ) → ``ops.int4_gemm``. Saves what ``F.linear`` keeps (``x``,
    the weight; no copies) and no INT4 codes: the backward recomputes the codes with the same fused kernel, and
    each LSQ backward recomputes ``XH`` or ``WH`` where it runs (the step gradients need the unrounded ``XH/s``,
    ``WH/s``, which INT4 codes cannot give back; the transform is exact, :mod:`qtrain.quant.hadamard`, so clip
    masks and codes agree bit for bit). Between the GEMMs the backward holds INT8 codes, not fp32 transforms.

    dgrad/wgrad (``bitsplit_lss``; or ``hp``: ``dY`` unquantized against the same quantized operands, in 16-bit
    GEMMs where ``dY`` is 16-bit (:func:`_hp_mm`), the ablation of the gradient quantization): ``dY`` split into
    INT4 ``hi``/``lo`` (:func:`qtrain.quant.lss.split_stacked`), the ``2M`` stacked rows sampled by leverage score (each GEMM its own sample, both drawn in one call where their
    :class:`~qtrain.recipes.BitSplit` agree) from the stochastic-rounding generator; ``∂L/∂X̂h = dY·Ŵh`` on
    ``ops.int4_gemm`` (over the kept rows on the CPU and from :data:`LSS_GATHER_MIN_OPS`, else over all rows with
    zero scales), ``∂L/∂Ŵh = dYᵀ·X̂h`` in fp32. Then the quantizer's backward
    (:func:`qtrain.quant.lsq.lsq_backward`: the clip-masked straight-through estimator and the step gradient) and
    the inverse transform ``·Hᵀ`` (``H`` is symmetric). On an accelerator below :data:`LSS_GATHER_MIN_OPS` a
    training step reads nothing back to the host.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, step, plan, w_kn, out_dtype, block):
        y, used = _int4_forward(x, weight, bias, step, plan, w_kn, out_dtype, block)
        ctx.save_for_backward(x, weight, bias, step, used)
        ctx.plan, ctx.w_kn, ctx.block = plan, w_kn, block
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, step, used = ctx.saved_tensors
        # Autocast off, as in the forward: a compiled backward is traced under the caller's autocast (which made
        # wgrad's fp32 GEMM bf16 under torch.compile only).
        with torch.autocast(dy.device.type, enabled=False):
            dx, dw, db, dstep = _int4_backward(dy, x, weight, bias, step, used, ctx.plan, ctx.w_kn, ctx.block,
                                               ctx.needs_input_grad[:4])
        return dx, dw, db, dstep, None, None, None, None


def _rms(t: torch.Tensor, b: int) -> torch.Tensor:
    """fp32 ``[1]``: the RMS of ``block_hadamard(t, b)`` for ``t [R, K]`` (``H`` orthonormal: ``‖t‖`` over
    ``R·⌈K/b⌉·b`` values, the zero padding included); 1 where that is 0 or not finite (a step stays positive and
    finite; the non-finite elements then quantize as with any step: NaN → 0, ±Inf → ±7)."""
    n = t.shape[0] * (-(-t.shape[1] // b) * b)
    r = torch.linalg.vector_norm(t.detach().float()).reshape(1) / math.sqrt(max(n, 1))
    return torch.where((r > 0) & torch.isfinite(r), r, torch.ones_like(r))


def _step_unit(t: torch.Tensor, op, b: int) -> torch.Tensor:
    """fp32 ``[1]``: what the Parameter of operand ``t``'s step (spec ``op``) is in units of — the operand's
    :func:`_rms` where its :class:`~qtrain.recipes.LearnedStep` is ``relative``, else 1."""
    return _rms(t, b) if op.step.relative else torch.ones(1, device=t.device)


def _int4_steps(step: torch.Tensor, x: torch.Tensor, w: torch.Tensor, plan, b: int) -> torch.Tensor:
    """fp32 ``[2]``: the steps ``(s_X, s_W)`` the quantizers of ``x [M, K]`` and ``w [N, K]`` use — the
    Parameter's values times their :func:`_step_unit`."""
    fp = plan.fprop.spec
    return step.detach().float() * torch.cat([_step_unit(x, fp.lhs, b), _step_unit(w, fp.rhs, b)])


def _int4_forward(x, weight, bias, step, plan, w_kn, out_dtype, block
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`Int4LinearFunction`'s forward: ``(y, the steps used [2])``."""
    w = weight.t() if w_kn else weight
    used = _int4_steps(step, x, w, plan, block)
    sx, sw = used[0:1], used[1:2]
    qx = ops.hadamard_quantize_int4(x, block, sx)
    qw = ops.hadamard_quantize_int4(w, block, sw)
    return ops.int4_gemm(qx, qw, sx.expand(qx.shape[0]), sw.reshape(()), bias, out_dtype), used


def _hp_mm(g: torch.Tensor, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fp32 ``g @ (codes·step)`` for the ``hp`` gradient paths (the ablation of the gradient quantization): in
    ``g``'s dtype where that is 16-bit (the dequantized operand rounded to it once, fp32 accumulation — what BF16
    training's backward GEMMs do; fp32 GEMMs made these runs several times slower on the GPU), else in fp32."""
    deq = codes.float() * step
    if g.dtype in (torch.bfloat16, torch.float16):
        return (g @ deq.to(g.dtype)).float()
    return g.float() @ deq


def _int4_backward(dy, x, weight, bias, step, used, plan, w_kn, b, need):
    """:class:`Int4LinearFunction`'s backward: ``(dx, dw, db, dstep)``, each None where ``need`` (whether x,
    weight, bias, step need a gradient) says so. ``used``: the forward's steps (:func:`_int4_steps`); the
    gradient of a relative step is LSQ's times the operand's RMS (``used / step``)."""
    w = weight.t() if w_kn else weight
    sx, sw = used[0:1], used[1:2]
    M, K = x.shape
    N = w.shape[0]
    need_dx, need_dw, need_step = need[0], need[1], need[3]
    fp = plan.fprop.spec
    learn_x, learn_w = need_step and fp.lhs.step.learn, need_step and fp.rhs.step.learn
    run_dgrad, run_wgrad = need_dx or learn_x, need_dw or learn_w
    dx = dw = db = dstep = dsx = dsw = None
    split = plan.dgrad.path == "bitsplit_lss"          # else "hp": dY unquantized (the ablation of the split)
    if run_dgrad or run_wgrad:
        # The fprop's INT4 codes (int8), bit for bit, from the fused kernel: no fp32 transform or LSQ residual is
        # held across the GEMMs; each LSQ backward recomputes its transform where it runs (peak memory).
        qx = ops.hadamard_quantize_int4(x, b, sx, after=dy)          # after=dy: recomputed here under compile
        qw = ops.hadamard_quantize_int4(w, b, sw, after=dy)
        if split:
            codes, s, norms = ops.bit_split(dy.contiguous(), plan.dgrad.spec.lhs.granularity.kind == "row")
            scale = _lss_scales(plan, norms, s, qx, run_dgrad, run_wgrad)
    if run_dgrad:
        if split:
            gather = plan.dgrad.spec.lhs.split.sampling and _lss_gather(x.device, 2 * M * N * qx.shape[1])
            gx = _lss.lss_dgrad(codes, scale["dgrad"], qw.t().contiguous(), sw.reshape(()), ops.int4_gemm, gather)
        else:
            gx = _hp_mm(dy, qw, sw)
        dxh, dsx = _lsq_backward(x, sx, gx, b, learn_x, fp.lhs.step.scaled)
        if need_dx:
            dx = ops.block_hadamard(dxh, b)[:, :K].to(x.dtype)
    if run_wgrad:
        if split:
            gw = _lss.lss_wgrad(codes, scale["wgrad"], qx, sx.reshape(()))
        else:
            gw = _hp_mm(dy.t(), qx, sx)
        dwh, dsw = _lsq_backward(w, sw, gw, b, learn_w, fp.rhs.step.scaled)
        if need_dw:
            dw = ops.block_hadamard(dwh, b)[:, :K].to(weight.dtype)
            if w_kn:
                dw = dw.t()
    if need_step:
        ds = [d if d is not None else step.new_zeros(()) for d in (dsx, dsw)]      # a fixed step: 0
        dstep = (torch.stack(ds) * (used / step.detach().float())).to(step.dtype)
    if bias is not None and need[2]:
        db = dy.float().sum(0).to(bias.dtype)
    return dx, dw, db, dstep


def _lsq_backward(t: torch.Tensor, step: torch.Tensor, grad: torch.Tensor, b: int, learn: bool, scaled: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`qtrain.quant.lsq.lsq_backward` of the Hadamard quantizer of ``t [R, K]`` with ``grad = ∂L/∂Q(tH)``:
    ``(∂L/∂(tH) fp32 [R, Kp], ∂L/∂step or None)`` — ``tH`` recomputed here (exact, so the clip mask and residual
    are the forward's), the step gradient only where the step is learned."""
    th = ops.block_hadamard(t, b, after=grad)
    _, inside, r = _lsq.lsq_quantize(th, step, residual=learn)
    return _lsq.lsq_backward(th, step, grad, numel=t.numel(), parts=(inside, r), scaled=scaled)


def _lss_scales(plan, norms: torch.Tensor, s: torch.Tensor, qx: torch.Tensor, dgrad: bool, wgrad: bool
                ) -> dict[str, torch.Tensor]:
    """The :func:`~qtrain.quant.lss.stacked_scales` of each GEMM run (``'dgrad'``, ``'wgrad'``) over the ``2M``
    stacked rows of norms ``norms``: sampled by the scores ``‖row‖`` and ``‖row‖·‖X̂h_token‖`` (``qx``: X̂h's
    INT4 codes), both in one draw where their BitSplit agree."""
    M = norms.shape[0] // 2
    scores = {}
    if dgrad:
        scores["dgrad"] = norms
    if wgrad:
        scores["wgrad"] = (norms.view(2, M) * qx.float().norm(dim=1)).view(-1)
    splits = {g: getattr(plan, g).spec.lhs.split for g in scores}
    if len(set(splits.values())) == 1:
        split = next(iter(splits.values()))
        p, keep = ops.lss_sample(torch.stack(list(scores.values())), split.budget * M, split.sampling)
        return dict(zip(scores, _lss.stacked_scales(p, keep, s)))
    return {g: _lss.stacked_scales(*ops.lss_sample(c, splits[g].budget * M, splits[g].sampling), s)
            for g, c in scores.items()}


# An INT4 layer's first forward under torch.compile. Its calibration chooses the Hadamard block from the data (a
# host read), and the block is a Python int the graph specializes on: it cannot be traced. Nor can it break the
# graph: inside a model's loop over its blocks, Dynamo cannot resume after a graph break and skips the loop's
# frame for good, so every block and layer would compile on its own from then on (and recompile per layer). So
# that forward and its backward run the eager code inside two opaque ops (the same numbers and random draws),
# which find their layer by ``QuantLinear._int4_id``; the next call finds the layer ready (a guard fails once)
# and compiles it with the others into one graph.
_INT4_LAYERS: "weakref.WeakValueDictionary[int, QuantLinear]" = weakref.WeakValueDictionary()
_int4_ids = itertools.count()
_calibrating = 0            # > 0 inside qtrain.calibrate: a first forward may calibrate under torch.distributed


@contextlib.contextmanager
def calibrating():
    """Within the block INT4 layers calibrate on their first forward even where torch.distributed is
    initialized (:func:`qtrain.nn.convert.calibrate` runs the forward; it checks that the processes agree)."""
    global _calibrating
    _calibrating += 1
    try:
        yield
    finally:
        _calibrating -= 1


class _Int4FirstLinear(torch.autograd.Function):
    """:class:`Int4LinearFunction` for a layer not calibrated yet, under ``torch.compile`` (see above)."""

    @staticmethod
    def forward(ctx, x, weight, bias, step, layer, w_kn, out_dtype):
        ctx.save_for_backward(x, weight, bias, step)
        ctx.layer = layer
        return _int4_first_forward(x, weight, bias, step, layer, w_kn, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, step = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, dstep = _int4_first_backward(dy, x, weight, step, ctx.layer, [need[0], need[1], need[3]])
        db = dy.float().sum(0).to(bias.dtype) if bias is not None and need[2] else None
        return dx if need[0] else None, dw if need[1] else None, db, dstep if need[3] else None, None, None, None


@ops.custom_op("int4_first_forward")
def _int4_first_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, step: torch.Tensor,
                        layer: int, w_kn: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The layer's calibration (once), then :class:`Int4LinearFunction`'s forward."""
    q = _INT4_LAYERS[layer]
    with torch.autocast(x.device.type, enabled=False):
        if not q._int4_ready:
            q._int4_calibrate(x)                                        # sets ``step`` (q.int4_step) in place
        y = _int4_forward(x, weight, bias, step, q.plan, w_kn, out_dtype, q._hq_b)[0]
        if q.track_errors:
            q._record_errors(x, y)
    return y


@_int4_first_forward.register_fake
def _(x, weight, bias, step, layer, w_kn, out_dtype):
    return x.new_empty((x.shape[0], weight.shape[1] if w_kn else weight.shape[0]), dtype=out_dtype)


@ops.custom_op("int4_first_backward")
def _int4_first_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, step: torch.Tensor, layer: int,
                         need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, dstep)`` as :class:`Int4LinearFunction` gives them (zeros where ``need`` says none)."""
    q = _INT4_LAYERS[layer]
    w_kn, b = q.weight_layout == "kn", q._hq_b
    with torch.autocast(dy.device.type, enabled=False):
        used = _int4_steps(step, x, weight.t() if w_kn else weight, q.plan, b)
        dx, dw, _, dstep = _int4_backward(dy, x, weight, None, step, used, q.plan, w_kn, b,
                                          (need[0], need[1], False, need[2]))
    return tuple(g if g is not None else torch.zeros_like(t) for g, t in ((dx, x), (dw, weight), (dstep, step)))


@_int4_first_backward.register_fake
def _(dy, x, weight, step, layer, need):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(step)


# Per-layer quantizer state a QuantLinear may add to ``state_dict`` (a plain model loading such a checkpoint
# drops it: qtrain.train.checkpoint.load).
STATE_KEYS = ("fallback_tau", "int4_step", "hq_block")


class QuantLinear(nn.Module):
    """A linear layer ``y = x·Wᵀ + b`` whose GEMMs run as ``recipe`` says.

    Behaves like the ``nn.Linear`` it replaces: same ``weight``/``bias`` Parameters and ``state_dict``; under
    autocast it returns what ``F.linear`` would (the autocast dtype); the weight gradient has the weight's dtype;
    ``eval()`` and ``no_grad`` run the same quantized forward. ``weight_layout='kn'`` stores ``weight`` as
    ``[in, out]`` (Hugging Face's GPT-2 ``Conv1D``).

    The recipe becomes a :class:`~qtrain.nn.plan.LinearPlan` when the layer is built (a spec no path runs is
    an error then). Inside :func:`qtrain.reuse_quantized_weights` (``reuse_weight`` set) the quantized weight
    is made once and reused while ``weight`` is unchanged: same version counter and storage, and no optimizer
    step since (FSDP2 re-gathers weights without bumping their version, so the version alone is not enough).
    Outside it nothing is kept between forwards.

    A recipe with fallback adds per-layer state: the buffer ``fallback_tau`` ``[3]`` (the threshold of fprop,
    dgrad, wgrad; −1 until the first training step sets it) is in ``state_dict`` (a checkpoint without it
    loads, and τ starts afresh); ``fallback_ratio`` ``[3]`` holds each GEMM's last share of fallen-back tiles.

    The ``int4`` recipe (``plan.int4``) adds per-layer state, in ``state_dict`` (a plain checkpoint without it
    loads and keeps the layer's current state): the Parameter ``int4_step`` ``[2]`` fp32 — the LSQ steps of X
    and W, learned by an optimizer built after :func:`qtrain.convert` (one built before does not hold them:
    they stay at their data init) — and the buffer ``hq_block`` (the Hadamard block in use). Both are set on
    the layer's first forward (training or not) from that batch: ``hq_block`` the block of least fprop
    reconstruction error among 16 … ``Hadamard.block`` (``Hadamard.search``; else the recipe's block), the steps
    ``2·mean|·|/√7`` of XH and WH. Where torch.distributed is initialized that first forward must run inside
    :func:`qtrain.calibrate` (the same batch on every process, before DDP or ``fully_shard`` wraps the model),
    else it raises: each process would calibrate on its own data (DDP replicas would differ) and under FSDP2 the
    steps written into the unsharded parameter would be lost. Under ``torch.compile`` that first forward and its
    backward run as opaque ops (:class:`_Int4FirstLinear`: no graph break) and the next call recompiles once: a
    model compiled before its first step is one graph from its second step on.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe="switchback",
                 device=None, dtype=None, weight_layout: str = "nk"):
        super().__init__()
        if weight_layout not in ("nk", "kn"):
            raise ValueError(f"weight_layout must be 'nk' ([out, in], nn.Linear) or 'kn' ([in, out], Conv1D), "
                             f"got {weight_layout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.recipe = recipes.get(recipe)
        self.plan = build_plan(self.recipe)
        self.weight_layout = weight_layout
        shape = (out_features, in_features) if weight_layout == "nk" else (in_features, out_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.track_errors = False
        self.stats: dict[str, float] = {}
        self.reuse_weight = False
        self._wcache = None
        if self.plan.fallback_gemms:
            fixed = [getattr(self.recipe, g).lhs.fallback.threshold if g in self.plan.fallback_gemms else None
                     for g in GEMMS]
            buf_device = None if device == "meta" else device        # from_module moves them to the weight
            self.register_buffer("fallback_tau", torch.tensor([-1.0 if t is None else float(t) for t in fixed],
                                                              device=buf_device))
            self.register_buffer("fallback_ratio", torch.full((3,), float("nan"), device=buf_device),
                                 persistent=False)
        else:
            self.fallback_tau = self.fallback_ratio = None
        self._int4_ready, self._hq_b = False, 0
        if self.plan.int4:
            fp = self.recipe.fprop
            buf_device = None if device == "meta" else device
            self.int4_step = nn.Parameter(torch.full((2,), -1.0, device=buf_device),
                                          requires_grad=fp.lhs.step.learn or fp.rhs.step.learn)
            self._hq_b = 0 if fp.lhs.transform.search else fp.lhs.transform.block
            self.register_buffer("hq_block", torch.tensor(self._hq_b, dtype=torch.int64, device=buf_device))
            self._register_int4()
        else:
            self.int4_step = self.hq_block = None
        self.reset_parameters()

    def _register_int4(self) -> None:
        """A fresh ``_int4_id``: the key of this layer in ``_INT4_LAYERS`` (see :class:`_Int4FirstLinear`)."""
        self._int4_id = next(_int4_ids)
        _INT4_LAYERS[self._int4_id] = self

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self.plan.int4:                                  # a copy (deepcopy, pickle) is a layer of its own
            self._register_int4()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(cls, module: nn.Module, recipe) -> "QuantLinear":
        """A QuantLinear sharing ``module``'s Parameters (an ``nn.Linear`` or an HF ``Conv1D``)."""
        if isinstance(module, nn.Linear):
            in_f, out_f, layout = module.in_features, module.out_features, "nk"
        elif is_hf_conv1d(module):
            (in_f, out_f), layout = module.weight.shape, "kn"
        else:
            raise TypeError(f"can only convert nn.Linear or transformers Conv1D, got {type(module).__name__}")
        q = cls(in_f, out_f, bias=module.bias is not None, recipe=recipe, device="meta", weight_layout=layout)
        q.weight = module.weight
        q.bias = module.bias
        if q.fallback_tau is not None:
            q.fallback_tau = q.fallback_tau.to(module.weight.device)
            q.fallback_ratio = q.fallback_ratio.to(module.weight.device)
        if q.int4_step is not None:
            q.int4_step = nn.Parameter(q.int4_step.detach().to(module.weight.device),
                                       requires_grad=q.int4_step.requires_grad)
            q.hq_block = q.hq_block.to(module.weight.device)
        q.train(module.training)
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.name}"
                + (", weight_layout=kn" if self.weight_layout == "kn" else ""))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "fallback_tau" in missing_keys:                    # a plain model's checkpoint: τ afresh
            missing_keys.remove(prefix + "fallback_tau")
        if self.int4_step is not None:
            if prefix + "int4_step" in state_dict and prefix + "hq_block" in state_dict:
                self._hq_b = int(self.hq_block)
                # calibrated unless still the constructor's −1 sentinel: a learned step may have crossed zero
                # (the quantizer is odd in the step) and must load as trained, not be re-calibrated
                self._int4_ready = not bool((self.int4_step == -1.0).all()) and self._hq_b > 0
            for key in ("int4_step", "hq_block"):                       # a plain checkpoint: state kept
                if prefix + key in missing_keys:
                    missing_keys.remove(prefix + key)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0:
            raise ValueError(f"QuantLinear expects input [..., {self.in_features}], got a 0-D tensor")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"QuantLinear input must be float32, bfloat16 or float16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"QuantLinear input is on {x.device} but its weight is on {self.weight.device}; "
                             "move the input or the module so they match")

    @property
    def needs_calibration(self) -> bool:
        """Whether the layer calibrates on its next forward (an INT4 layer before its first input)."""
        return self.int4_step is not None and not self._int4_ready

    def _weight(self) -> torch.Tensor:
        return self.weight.t() if self.weight_layout == "kn" else self.weight

    def _quantized_weight(self):
        """The reused ``(W, Wᵀ)`` operands of :meth:`LinearPlan.quantize_weight`, or None where none applies."""
        if torch.compiler.is_compiling() or not self.reuse_weight or not self.plan.weight_quantized:
            return None
        w = self.weight
        key = (_optimizer_steps, w._version, w.data_ptr(), w.device, w.dtype)
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = None                                    # free the old one before quantizing anew
            with torch.no_grad():
                self._wcache = (key, self.plan.quantize_weight(self._weight()))
        return self._wcache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.recipe.quantized:
            return F.linear(x, self._weight(), self.bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self.plan.int4:
            with torch.autocast(dev, enabled=False):
                if not self._int4_ready and torch.compiler.is_compiling():
                    y = _Int4FirstLinear.apply(x2, self.weight, self.bias, self.int4_step, self._int4_id,
                                               self.weight_layout == "kn", out_dtype)
                else:
                    if not self._int4_ready:
                        self._int4_calibrate(x2)
                    y = Int4LinearFunction.apply(x2, self.weight, self.bias, self.int4_step, self.plan,
                                                 self.weight_layout == "kn", out_dtype, self._hq_b)
                    if self.track_errors:
                        self._record_errors(x2.detach(), y.detach())
            return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))
        with torch.autocast(dev, enabled=False):
            update = self.training and torch.is_grad_enabled()
            y = QuantLinearFunction.apply(x2, self.weight, self.bias, self.plan, self.weight_layout == "kn",
                                          out_dtype, self._quantized_weight(), self.fallback_tau,
                                          self.fallback_ratio, update)
            if self.track_errors:
                self._record_errors(x2.detach(), y.detach())
        if x.dim() == 2:
            return y
        # Like F.linear (aten matmul), fold the batch dims back without making the output an autograd view:
        # FSDP2 cannot hook in-place ops on a view output (it warns), and nn.Linear's output is no view either.
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))

    @torch.compiler.disable
    @torch.no_grad()
    def _int4_calibrate(self, x: torch.Tensor) -> None:
        """The INT4 layer's first forward: choose the Hadamard block (``Hadamard.search``: least relative error
        of the fprop product over the first 4096 rows, among 16 … ``block`` up to K's power of two) and set the
        LSQ steps to ``2·mean|·|/√7`` of XH and WH (:func:`qtrain.quant.lsq.hq_search`: every candidate from one
        shared transform, in PyTorch, so no kernel is compiled for a block not chosen; one host read-back), or with
        ``init='mse'`` to :func:`qtrain.quant.lsq.mse_step` of XH and WH at the chosen block (a few more reads);
        a relative step stores the step over the operand's RMS."""
        if not _calibrating and dist.is_available() and dist.is_initialized():
            raise RuntimeError(
                "QuantLinear (int4) calibrates its Hadamard block and INT4 steps on its first input, and "
                "torch.distributed is initialized: each process would calibrate on its own data (DDP replicas "
                "would differ; under FSDP2 the steps would be lost with the unsharded parameter). Call "
                "qtrain.calibrate(model, batch) with the same batch on every process before wrapping the model "
                "in DDP or fully_shard (or load a calibrated checkpoint)")
        t = self.recipe.fprop.lhs.transform
        if t.search:
            top = min(t.block, max(16, 1 << max(0, (self.in_features - 1).bit_length())))
            blocks = [b for b in _hadamard.HADAMARD_BLOCKS if b <= top]
        else:
            blocks = [t.block]
        w = self._weight()
        steps, errors = _lsq.hq_search(x, w, blocks)
        i = int(torch.argmin(errors)) if errors is not None else 0
        fp, b = self.plan.fprop.spec, blocks[i]
        chosen = steps[i].clone()
        for j, (t, op) in enumerate(((x, fp.lhs), (w, fp.rhs))):
            if op.step.init == "mse":
                chosen[j] = _lsq.mse_step(ops.block_hadamard(t, b).float()).to(chosen.device)
        unit = torch.cat([_step_unit(x, fp.lhs, b), _step_unit(w, fp.rhs, b)]).to(chosen.device)
        self.int4_step.data.copy_((chosen / unit).to(self.int4_step.device))
        self.hq_block.fill_(blocks[i])
        self._hq_b, self._int4_ready = blocks[i], True

    @torch.no_grad()
    def int4_weight_stats(self) -> dict[str, float] | None:
        """The INT4 weight quantizer now (no forward needed): its step over the transformed weight's RMS and the
        share (%) of the weight beyond ±7 steps; None before calibration, for other recipes, or for a sharded
        (FSDP2) weight."""
        if not (self.plan.int4 and self._int4_ready) or hasattr(self.weight, "full_tensor"):
            return None
        w = self._weight()
        wh = ops.block_hadamard(w, self._hq_b).float()
        sw = self.int4_step.detach().float()[1:2] * _step_unit(w, self.plan.fprop.spec.rhs, self._hq_b)
        return dict(zip(("w_step_rms", "w_clipped_pct"), _step_stats(wh, sw)))

    @torch.no_grad()
    def _record_errors(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Quantization error of the forward: relative error of X̂ and Ŵ, SQNR of Y against fp32."""
        w = self._weight()
        ref = F.linear(x.float(), w.float(), None if self.bias is None else self.bias.float())
        if self.plan.int4:                      # errors in the transformed domain (H is orthonormal: the same)
            self.stats = {"y_sqnr_db": sqnr(ref, y.float())}
            used = _int4_steps(self.int4_step, x, w, self.plan, self._hq_b)
            for side, t, st in (("x", x, used[0:1]), ("w", w, used[1:2])):
                th = ops.block_hadamard(t, self._hq_b).float()
                self.stats[f"{side}_rel_err"] = relative_error(th, _hadamard.quantize_step(th, st).float() * st)
                self.stats[f"{side}_step_rms"], self.stats[f"{side}_clipped_pct"] = _step_stats(th, st)
            return
        fp = self.plan.fprop
        self.stats = {"x_rel_err": relative_error(x, _fake_quantized(fp, x, "lhs", _slot(self.fallback_tau, "fprop"))),
                      "w_rel_err": relative_error(w, _fake_quantized(fp, w, "rhs")),
                      "y_sqnr_db": sqnr(ref, y.float())}
        if fp.path == "fallback":              # the same X in 1×c blocks without the residual term
            self.stats["x_rel_err_no_fallback"] = relative_error(x, _fake_quantized(fp, x, "lhs", no_fallback=True))


def _step_stats(th: torch.Tensor, step: torch.Tensor) -> tuple[float, float]:
    """``(step / RMS of th, % of th beyond ±7 steps)`` for a transformed INT4 operand ``th`` (fp32) and its step
    ``[1]`` — the report's and the training log's view of a step."""
    return ((step.abs() / th.pow(2).mean().sqrt()).item(),
            100 * ((th / step).abs() > _hadamard.QMAX4).float().mean().item())


def _fake_quantized(plan, t, side, tau=None, no_fallback=False) -> torch.Tensor:
    """fp32 ``t`` as the GEMM ``plan`` sees it (its quantize-dequantize; τ is not updated)."""
    if no_fallback:
        return Operand("block", *ops.quantize_blockwise(t, 1, plan.blocks[2]), 1, plan.blocks[2]).dequantize()
    op = plan.quantize(t, side, tau)
    return op.dequantize() if isinstance(op, Operand) else emulate(t, getattr(plan.spec, side))


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear), by duck typing."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")
            and getattr(module.weight, "dim", lambda: 0)() == 2 and module.weight.shape[1] == module.nf)
