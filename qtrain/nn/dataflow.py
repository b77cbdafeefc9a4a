"""Jetfire's INT8 data flow (METHODS.md § Jetfire): transformer blocks whose norms and activations pass INT8
blocks between the linear layers and save them for backward in INT8.

One ``torch.autograd.Function`` per fused sub-block; INT8 tensors never leave it (no dtype disguises):

===================== ==============================================================================================
Function              forward (``r × c``: the recipe's fprop-lhs blocks)
===================== ==============================================================================================
NormLinearFunction    x (residual, float) → INT8 copy ``xq`` → RMSNorm/LayerNorm (``ops.*norm_quantize``: INT8 in,
                      INT8 out) → fprop GEMM (QKV) → float out (for RoPE/attention). Saves ``xq``.
LinearFunction        x (attention's output, float) → INT8 ``xq`` → fprop GEMM → float out (the residual add).
                      Saves ``xq``.
NormMLPFunction       x → ``xq`` → norm → ``yq`` → fprop GEMM (gate/up, fc) → INT8 ``hq`` (the GEMM's
                      ``out='int8_blocks'``) → SwiGLU/GELU (``ops.*_quantize``: INT8 in, INT8 out) → ``aq`` → fprop
                      GEMM (down, proj) → float out. Saves ``xq`` and ``hq``.
===================== ==============================================================================================

What is saved for backward is INT8 (+ fp32 block scales) only, with ``ctx.save_for_backward``; the norm output
``yq`` and the activation output ``aq`` are recomputed in backward from ``xq``/``hq`` by the same ops — bit for
bit the codes the forward used (deterministic RTN) — at the cost of one elementwise pass each, instead of
saving another INT8 copy. Quantized weights are not kept either: backward quantizes ``Wᵀ`` again (for square
blocks that is fprop's quantization, transposed, exactly). The residual stream stays in the input's float
dtype and attention's core (RoPE, SDPA) runs as in the original model (BF16 under autocast).

Backward: each GEMM runs as the recipe says (``dY`` SR in blocks, reused transposed for wgrad when the blocks
are square, quantized for dgrad and wgrad in one pass, ``ops.quantize_blockwise_sr_dual``, when both take 1×c
blocks; the saved INT8 X serves wgrad transposed when its blocks are square, else it is dequantized and
quantized along tokens). A dgrad output that feeds a data-flow op (the norm or activation backward) is
quantized to INT8 SR blocks when the recipe's dgrad ``out`` is ``'int8_blocks'``; the activation backward then
and the norm backward each run as one fused op on the saved INT8 input and the INT8 gradient
(``ops.swiglu_backward``/``gelu_backward``, ``ops.rmsnorm_backward``/``layernorm_backward``).

:class:`LlamaDataflowBlock` and :class:`GPT2DataflowBlock` take over the children of a
:class:`qtrain.models.llama.Block` / :class:`qtrain.models.gpt2.Block` (same Parameters, same ``state_dict``
keys) and run their forward through these Functions; :func:`qtrain.convert` swaps them in for a recipe with
``dataflow=True``. Inside :func:`qtrain.track_errors` a block also records, per linear layer, the quantization
error of its forward (:meth:`_DataflowBlock.linears`, ``stats``; shown by :func:`qtrain.report`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import ops, recipes
from qtrain.models import gpt2 as _gpt2
from qtrain.models import llama as _llama
from qtrain.nn.functional import Operand
from qtrain.nn.plan import LinearPlan, build_plan
from qtrain.quant.core import FLOAT_DTYPES, relative_error, sqnr
from qtrain.quant.dataflow import activation_vjp, norm_vjp


# ------------------------------------------------------------------------------------------------ helpers
def _xblocks(plan: LinearPlan) -> tuple[int, int]:
    """``(r, c)`` of the activations passed between the ops: the fprop lhs blocks."""
    return plan.fprop.blocks[0], plan.fprop.blocks[2]


def _quantize_x(plan: LinearPlan, x: torch.Tensor) -> Operand:
    r, c = _xblocks(plan)
    return Operand("block", *ops.quantize_blockwise(x, r, c), r, c)


def _norm(kind: str, x_op: Operand, w, b, eps: float) -> Operand:
    if kind == "rms":
        q, s = ops.rmsnorm_quantize(x_op.q, x_op.scale, w, eps, x_op.rows, x_op.block_k)
    else:
        q, s = ops.layernorm_quantize(x_op.q, x_op.scale, w, b, eps, x_op.rows, x_op.block_k)
    return Operand("block", q, s, x_op.rows, x_op.block_k)


def _act(kind: str, h_op: Operand) -> Operand:
    fn = ops.swiglu_quantize if kind == "swiglu" else ops.gelu_quantize
    return Operand("block", *fn(h_op.q, h_op.scale, h_op.rows, h_op.block_k), h_op.rows, h_op.block_k)


# Quantize the gate/up projection's h and run the activation in one op (``ops.quantize_swiglu``/``quantize_gelu``:
# h read once) instead of ``quantize_blockwise`` then ``*_quantize`` — the same codes bit for bit. Off until measured
# on the GPU (expected: one read of h fewer, ~0.17 ms a 7B layer; benchmarks/dataflow_ops.py).
FUSED_H_ACT = False


def _quantize_act(act: str, h: torch.Tensor, r: int, c: int) -> tuple[Operand, Operand]:
    """``(h_op, a_op)``: the INT8 blocks of ``h`` and of the activation computed from them."""
    if FUSED_H_ACT and (act != "swiglu" or (h.shape[1] // 2) % c == 0):      # SwiGLU's up half on block bounds
        hq, hs, aq, a_s = (ops.quantize_swiglu if act == "swiglu" else ops.quantize_gelu)(h, r, c)
        return Operand("block", hq, hs, r, c), Operand("block", aq, a_s, r, c)
    h_op = Operand("block", *ops.quantize_blockwise(h, r, c), r, c)
    return h_op, _act(act, h_op)


def _norm_fp32(kind: str, x, w, b, eps: float):
    if kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _act_fp32(kind: str, h):
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def _int8_grad_op(plan: LinearPlan, g: torch.Tensor) -> Operand | torch.Tensor:
    """A dgrad output on its way into a data-flow op's backward: INT8 SR blocks (dgrad ``out='int8_blocks'``,
    in the gradient operand's blocks); unchanged for ``'dequant'``."""
    if plan.dgrad.spec.out != "int8_blocks":
        return g
    r, c = plan.dgrad.blocks[0], plan.dgrad.blocks[2]
    return Operand("block", *ops.quantize_blockwise_sr(g, r, c), r, c)


def _norm_backward(kind: str, x_op: Operand, w, b, eps: float, plan: LinearPlan, dy: torch.Tensor) -> tuple:
    """fp32 ``(dx, dw, db)`` of the norm: one fused op (``ops.rmsnorm_backward``/``layernorm_backward``: INT8 ``x``
    and INT8 gradient in) where the gradient is INT8 in ``x``'s blocks, else the fp32 VJP on the dequantized
    inputs (``db`` None for RMSNorm or without a bias)."""
    g = _int8_grad_op(plan, dy)
    if isinstance(g, Operand) and (g.rows, g.block_k) == (x_op.rows, x_op.block_k):
        if kind == "rms":
            return (*ops.rmsnorm_backward(x_op.q, x_op.scale, w, g.q, g.scale, eps, x_op.rows, x_op.block_k), None)
        return ops.layernorm_backward(x_op.q, x_op.scale, w, b, g.q, g.scale, eps, x_op.rows, x_op.block_k)
    return norm_vjp(kind, x_op.dequantize(), w, b, eps, g.dequantize() if isinstance(g, Operand) else g)


def _act_backward(act: str, h_op: Operand, plan: LinearPlan, da: torch.Tensor) -> torch.Tensor:
    """``dh`` of the activation: one fused op (``ops.swiglu_backward``/``gelu_backward``: INT8 ``h`` and INT8
    gradient in; ``dh`` in :data:`TO_QUANTIZE` where dgrad and wgrad quantize it next) where the gradient is INT8
    in ``h``'s blocks, else the fp32 VJP on the dequantized inputs."""
    g = _int8_grad_op(plan, da)
    if isinstance(g, Operand) and (g.rows, g.block_k) == (h_op.rows, h_op.block_k):
        fn = ops.swiglu_backward if act == "swiglu" else ops.gelu_backward
        quantized_next = plan.dgrad.path != "hp" and plan.wgrad.path != "hp"
        return fn(h_op.q, h_op.scale, g.q, g.scale, h_op.rows, h_op.block_k,
                  TO_QUANTIZE if quantized_next else torch.float32)
    return activation_vjp(act, h_op.dequantize(), g.dequantize() if isinstance(g, Operand) else g)


# GEMM outputs that the next op quantizes right away — fprop's h before the activation (out 'int8_blocks') and a
# dgrad output on its way into a norm's or activation's backward (quantized there when dgrad's out is
# 'int8_blocks'), the activation's dh (quantized by dgrad and wgrad) — are written in bf16: half of fp32's bytes
# on the largest tensors of a block (h, dh: tokens × 2·ffn). bf16's rounding (≤ 2⁻⁸ relative: up to half an INT8
# step on a block's largest values) cost 0.03–0.25 dB of the INT8 codes' SQNR (1×256 blocks, Gaussian and
# heavy-tailed data, CPU).
TO_QUANTIZE = torch.bfloat16


def _into_int8(plan: LinearPlan) -> torch.dtype:
    """dgrad's output dtype where the next op's backward quantizes it (:data:`TO_QUANTIZE`), else fp32."""
    return TO_QUANTIZE if plan.dgrad.spec.out == "int8_blocks" else torch.float32


def _linear_backward(plan: LinearPlan, dy, x_op: Operand, w, b, needs: tuple[bool, bool, bool],
                     dx_dtype: torch.dtype = torch.float32):
    """``(dX, dW, db)`` of ``y = x·Wᵀ + b`` from the INT8 X of the forward (recipe's dgrad and wgrad); dX in
    ``dx_dtype`` (:data:`TO_QUANTIZE` where the next op quantizes it)."""
    dy = dy.contiguous()
    need_dx, need_dw, need_db = needs
    dx = dw = db = None
    if need_dx or need_dw:
        wg = plan.wgrad
        if need_dx and need_dw and plan.dual_sr_grad:
            g, gt = plan.quantize_grad(dy)                           # dY read once for both GEMMs
        else:
            g, gt = plan.dgrad.quantize(dy, "lhs"), None
        if need_dx:
            dx = plan.dgrad(g, plan.dgrad.quantize(w.t(), "rhs"), dx_dtype)
        if need_dw:
            if gt is None:
                square = wg.spec.lhs == plan.dgrad.spec.lhs and wg.blocks[0] == g.rows == g.block_k
                gt = g.transposed() if square else wg.quantize(dy.t(), "lhs")   # square: the same SR codes
            if wg.blocks[1] == x_op.rows == x_op.block_k == wg.blocks[2]:
                xt = x_op.transposed()                       # the saved INT8 X as it is (Jetfire's reuse)
            else:
                xt = _requantize_t(wg, x_op)
            dw = wg(gt, xt, w.dtype)
    if need_db and b is not None:
        db = dy.float().sum(0).to(b.dtype)
    return dx, dw, db


def _requantize_t(wg, x_op: Operand) -> Operand:
    """wgrad's ``Xᵀ`` operand from the saved INT8 X when its blocks do not transpose: re-blocked from the codes
    (RTN block rhs: one kernel, no float copy), else dequantized and quantized as the plan says."""
    if wg.path == "block" and wg.spec.rhs.rounding == "nearest" and x_op.path == "block":
        rows, c = wg.blocks[1], wg.blocks[2]
        q, s = ops.requantize_blockwise_t(x_op.q, x_op.scale, x_op.rows, x_op.block_k, rows, c)
        return Operand("block", q, s, rows, c)
    return wg.quantize(x_op.dequantize().t(), "rhs")


def _save_op(op: Operand) -> tuple[torch.Tensor, torch.Tensor]:
    return op.q, op.scale


# ------------------------------------------------------------------------------------------- the Functions
class NormLinearFunction(torch.autograd.Function):
    """``norm(x) · Wᵀ + b`` for ``x [M, K]`` (the residual stream), INT8 in between; saves only INT8 ``x``."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, w, b, plan, kind, eps, out_dtype):
        x_op = _quantize_x(plan, x)
        y_op = _norm(kind, x_op, norm_w, norm_b, eps)
        out = plan.fprop(y_op, plan.fprop.quantize(w, "rhs"), out_dtype, b)
        ctx.save_for_backward(*_save_op(x_op), norm_w, norm_b, w, b)
        ctx.plan, ctx.kind, ctx.eps, ctx.x_dtype, ctx.blocks = plan, kind, eps, x.dtype, (x_op.rows, x_op.block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        xq, xs, norm_w, norm_b, w, b = ctx.saved_tensors
        plan, kind, eps = ctx.plan, ctx.kind, ctx.eps
        x_op = Operand("block", xq, xs, *ctx.blocks)
        y_op = _norm(kind, x_op, norm_w, norm_b, eps)              # the forward's codes, recomputed
        need = ctx.needs_input_grad
        dy, dw, db = _linear_backward(plan, dout, y_op, w, b, (any(need[:3]), need[3], need[4]), _into_int8(plan))
        dx = dnw = dnb = None
        if dy is not None:
            dx, dnw, dnb = _norm_backward(kind, x_op, norm_w, norm_b, eps, plan, dy)
        return (_cast(dx, ctx.x_dtype), _cast(dnw, norm_w), _cast(dnb, norm_b), dw, db,
                None, None, None, None)


class LinearFunction(torch.autograd.Function):
    """``x · Wᵀ + b`` saving the fprop-quantized INT8 ``x`` for wgrad (attention's output projection)."""

    @staticmethod
    def forward(ctx, x, w, b, plan, out_dtype):
        x_op = _quantize_x(plan, x)
        out = plan.fprop(x_op, plan.fprop.quantize(w, "rhs"), out_dtype, b)
        ctx.save_for_backward(*_save_op(x_op), w, b)
        ctx.plan, ctx.x_dtype, ctx.blocks = plan, x.dtype, (x_op.rows, x_op.block_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        xq, xs, w, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx_dtype = ctx.x_dtype if ctx.x_dtype in (torch.bfloat16, torch.float16) else torch.float32
        dx, dw, db = _linear_backward(ctx.plan, dout, Operand("block", xq, xs, *ctx.blocks), w, b, need[:3],
                                      dx_dtype)         # 16-bit x: its gradient straight from the GEMM
        return _cast(dx, ctx.x_dtype), dw, db, None, None


class NormMLPFunction(torch.autograd.Function):
    """``act(norm(x) · W1ᵀ + b1) · W2ᵀ + b2`` with INT8 between every op; saves INT8 ``x`` and ``h``."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, w1, b1, w2, b2, plan, kind, act, eps, out_dtype):
        r, c = _xblocks(plan)
        x_op = _quantize_x(plan, x)
        y_op = _norm(kind, x_op, norm_w, norm_b, eps)
        h = plan.fprop(y_op, plan.fprop.quantize(w1, "rhs"), TO_QUANTIZE, b1)
        h_op, a_op = _quantize_act(act, h, r, c)                                   # fprop out='int8_blocks'
        del h
        out = plan.fprop(a_op, plan.fprop.quantize(w2, "rhs"), out_dtype, b2)
        ctx.save_for_backward(*_save_op(x_op), *_save_op(h_op), norm_w, norm_b, w1, b1, w2, b2)
        ctx.plan, ctx.kind, ctx.act, ctx.eps, ctx.x_dtype, ctx.blocks = plan, kind, act, eps, x.dtype, (r, c)
        return out

    @staticmethod
    def backward(ctx, dout):
        xq, xs, hq, hs, norm_w, norm_b, w1, b1, w2, b2 = ctx.saved_tensors
        plan, kind, act, eps = ctx.plan, ctx.kind, ctx.act, ctx.eps
        need = ctx.needs_input_grad
        h_op = Operand("block", hq, hs, *ctx.blocks)
        a_op = _act(act, h_op)                                                    # the forward's codes
        up = any(need[:5])
        da, dw2, db2 = _linear_backward(plan, dout, a_op, w2, b2, (up, need[5], need[6]), _into_int8(plan))
        del a_op
        dx = dnw = dnb = dw1 = db1 = None
        if up:
            dh = _act_backward(act, h_op, plan, da)
            del da
            x_op = Operand("block", xq, xs, *ctx.blocks)
            y_op = _norm(kind, x_op, norm_w, norm_b, eps)
            dy, dw1, db1 = _linear_backward(plan, dh, y_op, w1, b1, (any(need[:3]), need[3], need[4]),
                                            _into_int8(plan))
            if dy is not None:
                dx, dnw, dnb = _norm_backward(kind, x_op, norm_w, norm_b, eps, plan, dy)
        return (_cast(dx, ctx.x_dtype), _cast(dnw, norm_w), _cast(dnb, norm_b), dw1, db1, dw2, db2,
                None, None, None, None, None)


def _cast(g, like):
    if g is None or like is None:
        return None
    return g.to(like if isinstance(like, torch.dtype) else like.dtype)


# --------------------------------------------------------------------------------------------- the blocks
LLAMA_LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")    # in the order they run
GPT2_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class _DataflowBlock(nn.Module):
    """Common part: the recipe, its plan, running a Function outside autocast with F.linear's out dtype, and the
    error telemetry.

    With ``track_errors`` set (by :func:`qtrain.track_errors`), each forward records into ``stats[name]`` (``name``
    relative, as :meth:`linears` gives it) the errors of each linear's fprop, as :class:`~qtrain.QuantLinear` does:
    ``x_rel_err`` ‖x − x̂‖/‖x‖ of the INT8 operand the GEMM consumes against its float counterpart (QKV and
    gate/up, fc: the fp32 norm of the float residual input against the INT8 norm output; the output projection:
    attention's output against its INT8 blocks; down, proj: the fp32 activation of the GEMM's fp32 ``h`` against
    the INT8 activation output), ``w_rel_err`` of the quantized weight, ``y_sqnr_db`` of the linear's output (for
    gate/up, fc: its INT8 blocks ``hq``) against an fp32 linear on the float input. Recording recomputes the
    forward's (deterministic, RTN) INT8 operands under ``no_grad`` outside the Functions: gradients and the
    stochastic-rounding generators are untouched.
    """

    LINEARS: tuple[str, ...] = ()

    def _setup(self, recipe) -> None:
        self.recipe = recipes.get(recipe)
        self.plan = build_plan(self.recipe)
        if not self.recipe.dataflow:
            raise ValueError(f"recipe {self.recipe.name!r} has dataflow=False; a data-flow block needs a recipe "
                             "with dataflow=True (e.g. 'jetfire')")
        self.track_errors = False
        self.stats: dict[str, dict[str, float]] = {}

    def linears(self) -> list[tuple[str, nn.Linear]]:
        """The block's four linear layers (relative names) in the order they run."""
        return [(n, self.get_submodule(n)) for n in self.LINEARS]

    @torch.compiler.disable
    @torch.no_grad()
    def _record_norm_linear(self, name: str, x, norm: nn.Module, kind: str, out) -> None:
        """Errors of a :class:`NormLinearFunction` given its residual input ``x`` and output ``out``."""
        x = x.detach().reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            y_ref, y_op = self._norms(x, norm, kind)
            self._store(name, y_ref, y_op.dequantize(), out)

    @torch.compiler.disable
    @torch.no_grad()
    def _record_linear(self, name: str, x, out) -> None:
        """Errors of a :class:`LinearFunction` given its input ``x`` and output ``out``."""
        x = x.detach().reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            self._store(name, x.float(), _quantize_x(self.plan, x).dequantize(), out)

    @torch.compiler.disable
    @torch.no_grad()
    def _record_mlp(self, names: tuple[str, str], x, norm: nn.Module, kind: str, act: str, out) -> None:
        """Errors of both linears of a :class:`NormMLPFunction` given its residual input ``x`` and output ``out``."""
        plan, (r, c) = self.plan, _xblocks(self.plan)
        x = x.detach().reshape(-1, x.shape[-1])
        w1 = self.get_submodule(names[0])
        with torch.autocast(x.device.type, enabled=False):
            y_ref, y_op = self._norms(x, norm, kind)
            h = plan.fprop(y_op, plan.fprop.quantize(w1.weight, "rhs"), torch.float32, w1.bias)
            h_op = Operand("block", *ops.quantize_blockwise(h, r, c), r, c)
            self._store(names[0], y_ref, y_op.dequantize(), h_op.dequantize())
            self._store(names[1], _act_fp32(act, h), _act(act, h_op).dequantize(), out)

    def _norms(self, x, norm: nn.Module, kind: str) -> tuple[torch.Tensor, Operand]:
        """The fp32 norm of ``x`` and the forward's INT8 norm output."""
        b = getattr(norm, "bias", None)
        ref = _norm_fp32(kind, x.float(), norm.weight.float(), None if b is None else b.float(), norm.eps)
        return ref, _norm(kind, _quantize_x(self.plan, x), norm.weight, b, norm.eps)

    def _store(self, name: str, x_ref, x_hat, y) -> None:
        lin = self.get_submodule(name)
        w = lin.weight
        ref = F.linear(x_ref, w.float(), None if lin.bias is None else lin.bias.float())
        self.stats[name] = {"x_rel_err": relative_error(x_ref, x_hat),
                            "w_rel_err": relative_error(w, self.plan.fprop.quantize(w, "rhs").dequantize()),
                            "y_sqnr_db": sqnr(ref, y.reshape(ref.shape).float())}

    def _run(self, fn, x: torch.Tensor, *args) -> torch.Tensor:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__} input must be float32, bfloat16 or float16, got {x.dtype}")
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        lead = x.shape[:-1]
        with torch.autocast(dev, enabled=False):
            y = fn.apply(x.reshape(-1, x.shape[-1]), *args, out_dtype)
        return y.view(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}"


class LlamaDataflowBlock(_DataflowBlock):
    """A :class:`qtrain.models.llama.Block` (pre-RMSNorm attention + SwiGLU MLP) on Jetfire's INT8 data flow."""

    LINEARS = LLAMA_LINEARS

    def __init__(self, block: "_llama.Block", recipe="jetfire"):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = block.attn_norm, block.attn, block.mlp_norm, block.mlp
        self._setup(recipe)
        self.train(block.training)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        at, mlp, plan = self.attn, self.mlp, self.plan
        B, T, C = x.shape
        H, KV, D = at.n_head, at.n_kv_head, at.head_dim
        qkv = self._run(NormLinearFunction, x, self.attn_norm.weight, None, at.wqkv.weight, at.wqkv.bias, plan,
                        "rms", self.attn_norm.eps)
        if self.track_errors:
            self._record_norm_linear("attn.wqkv", x, self.attn_norm, "rms", qkv)
        q, k, v = qkv.split([H * D, KV * D, KV * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, KV, D).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
        q, k = _llama.apply_rope(q, cos, sin), _llama.apply_rope(k, cos, sin)
        if KV != H:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        o = self._run(LinearFunction, y, at.wo.weight, at.wo.bias, plan)
        if self.track_errors:
            self._record_linear("attn.wo", y, o)
        x = x + o
        m = self._run(NormMLPFunction, x, self.mlp_norm.weight, None, mlp.w_gate_up.weight, mlp.w_gate_up.bias,
                      mlp.w_down.weight, mlp.w_down.bias, plan, "rms", "swiglu", self.mlp_norm.eps)
        if self.track_errors:
            self._record_mlp(("mlp.w_gate_up", "mlp.w_down"), x, self.mlp_norm, "rms", "swiglu", m)
        return x + m


class GPT2DataflowBlock(_DataflowBlock):
    """A :class:`qtrain.models.gpt2.Block` (pre-LayerNorm attention + GELU MLP) on Jetfire's INT8 data flow."""

    LINEARS = GPT2_LINEARS

    def __init__(self, block: "_gpt2.Block", recipe="jetfire"):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = block.ln_1, block.attn, block.ln_2, block.mlp
        self._setup(recipe)
        self.train(block.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        at, mlp, plan = self.attn, self.mlp, self.plan
        B, T, C = x.shape
        qkv = self._run(NormLinearFunction, x, self.ln_1.weight, self.ln_1.bias, at.c_attn.weight, at.c_attn.bias,
                        plan, "ln", self.ln_1.eps)
        if self.track_errors:
            self._record_norm_linear("attn.c_attn", x, self.ln_1, "ln", qkv)
        q, k, v = (t.view(B, T, at.n_head, C // at.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        o = self._run(LinearFunction, y, at.c_proj.weight, at.c_proj.bias, plan)
        if self.track_errors:
            self._record_linear("attn.c_proj", y, o)
        x = x + o
        m = self._run(NormMLPFunction, x, self.ln_2.weight, self.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias,
                      mlp.c_proj.weight, mlp.c_proj.bias, plan, "ln", "gelu", self.ln_2.eps)
        if self.track_errors:
            self._record_mlp(("mlp.c_fc", "mlp.c_proj"), x, self.ln_2, "ln", "gelu", m)
        return x + m


DATAFLOW_BLOCKS = (LlamaDataflowBlock, GPT2DataflowBlock)


def block_linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers of a supported block (relative names), or [] if ``block`` is not one."""
    if isinstance(block, _llama.Block):
        names = LLAMA_LINEARS
    elif isinstance(block, _gpt2.Block):
        names = GPT2_LINEARS
    else:
        return []
    return [(n, block.get_submodule(n)) for n in names]


def unsupported_reason(block: nn.Module) -> str | None:
    """Why a qtrain LLaMA/GPT-2 block cannot take the data flow (None: it can)."""
    if isinstance(block, _gpt2.Block):
        for ln in (block.ln_1, block.ln_2):
            if type(ln) is not nn.LayerNorm or not ln.elementwise_affine or len(ln.normalized_shape) != 1:
                return "its norms are not affine 1-D nn.LayerNorm"
    for _, lin in block_linears(block):
        if type(lin) is not nn.Linear:
            return f"a linear layer is a {type(lin).__name__}, not nn.Linear"
    return None


def to_dataflow(block: nn.Module, recipe) -> nn.Module:
    """The data-flow version of a qtrain LLaMA or GPT-2 block, sharing its modules and Parameters."""
    if isinstance(block, _llama.Block):
        return LlamaDataflowBlock(block, recipe)
    if isinstance(block, _gpt2.Block):
        return GPT2DataflowBlock(block, recipe)
    raise TypeError(f"no data-flow version of {type(block).__name__}; supported: qtrain.models.llama.Block, "
                    "qtrain.models.gpt2.Block")
