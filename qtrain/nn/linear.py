"""``QuantLinear``: a drop-in ``nn.Linear`` whose three GEMMs run as a :class:`~qtrain.recipes.Recipe` says."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from qtrain import ops, recipes
from qtrain.nn.functional import Int8Operand, emulate, fast_int8, gemm, quantize_int8
from qtrain.quant.core import FLOAT_DTYPES, relative_error, sqnr


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Any torch optimizer's step invalidates every reused INT8 weight (see QuantLinear).
register_optimizer_step_post_hook(_count_optimizer_step)


def _tensorwise_reusable(recipe: recipes.Recipe) -> bool:
    """fprop's W is tensor-wise INT8 on the fast path, so one pass yields W and Wᵀ, and dgrad reuses Wᵀ."""
    return (fast_int8(recipe.fprop.lhs) and fast_int8(recipe.fprop.rhs)
            and recipe.fprop.rhs.granularity.kind == "tensor")


class QuantLinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b`` for 2-D ``x [M, K]``, ``W [N, K]`` (``[K, N]`` when ``w_kn``), recipe-driven.

    Saves for backward: the INT8 Wᵀ and its scale when dgrad reuses fprop's tensor-wise W; the INT8 X and its
    row scales when ``recipe.save_int8_input``, else X in the compute dtype (what ``F.linear`` saves).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, w_kn, out_dtype, wquant):
        w = weight.t() if w_kn else weight
        fp = recipe.fprop
        wt_op = None
        if fast_int8(fp.lhs) and fast_int8(fp.rhs):
            x_op = quantize_int8(x, fp.lhs)
            if fp.rhs.granularity.kind == "tensor":
                wq, wqt, ws = wquant if wquant is not None else ops.quantize_tensorwise(w)
                w_op, wt_op = Int8Operand(wq, ws), Int8Operand(wqt, ws)
            else:
                w_op = quantize_int8(w, fp.rhs)
        else:
            x_op, w_op = x, w
        y = gemm(fp, x_op, w_op, out_dtype, bias)

        reuse_wt = wt_op is not None and recipe.dgrad.rhs == fp.rhs and fast_int8(recipe.dgrad.lhs)
        if recipe.save_int8_input:
            if not isinstance(x_op, Int8Operand):
                raise ValueError(f"recipe {recipe.name!r} saves the INT8 input but its fprop lhs {fp.lhs} is "
                                 "not an INT8 tensor/row operand")
            x_saved, xs_saved = x_op.q, x_op.scale
        else:
            x_saved, xs_saved = x.to(out_dtype), None
        ctx.save_for_backward(x_saved, xs_saved, weight, bias,
                              wt_op.q if reuse_wt else None, wt_op.scale if reuse_wt else None)
        ctx.recipe, ctx.w_kn, ctx.out_dtype, ctx.x_dtype = recipe, w_kn, out_dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_saved, xs_saved, weight, bias, wqt, ws = ctx.saved_tensors
        recipe, cd = ctx.recipe, ctx.out_dtype
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wt = Int8Operand(wqt, ws) if wqt is not None else (weight if ctx.w_kn else weight.t())
            dx_dtype = ctx.x_dtype if recipe.dgrad.quantized else cd
            dx = gemm(recipe.dgrad, dy, wt, dx_dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x = Int8Operand(x_saved, xs_saved).dequantize(cd) if xs_saved is not None else x_saved
            dw_dtype = weight.dtype if recipe.wgrad.quantized else cd
            dw = gemm(recipe.wgrad, dy.t(), x.t(), dw_dtype).to(weight.dtype)
            if ctx.w_kn:
                dw = dw.t()
        if bias is not None and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(bias.dtype)
        return dx, dw, db, None, None, None, None


class QuantLinear(nn.Module):
    """A linear layer ``y = x·Wᵀ + b`` whose GEMMs run as ``recipe`` says.

    Behaves like the ``nn.Linear`` it replaces: same ``weight``/``bias`` Parameters and ``state_dict``; under
    autocast it returns what ``F.linear`` would (the autocast dtype); the weight gradient has the weight's dtype;
    ``eval()`` and ``no_grad`` run the same quantized forward. ``weight_layout='kn'`` stores ``weight`` as
    ``[in, out]`` (Hugging Face's GPT-2 ``Conv1D``).

    Inside :func:`qtrain.reuse_quantized_weights` (``reuse_weight`` set) the tensor-wise INT8 weight is
    quantized once and reused while ``weight`` is unchanged: same version counter and storage, and no optimizer
    step since (FSDP2 re-gathers weights without bumping their version, so the version alone is not enough).
    Outside it nothing is kept between forwards.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe="switchback",
                 device=None, dtype=None, weight_layout: str = "nk"):
        super().__init__()
        if weight_layout not in ("nk", "kn"):
            raise ValueError(f"weight_layout must be 'nk' ([out, in], nn.Linear) or 'kn' ([in, out], Conv1D), "
                             f"got {weight_layout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.recipe = recipes.get(recipe)
        self.weight_layout = weight_layout
        shape = (out_features, in_features) if weight_layout == "nk" else (in_features, out_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.track_errors = False
        self.stats: dict[str, float] = {}
        self.reuse_weight = False
        self._wcache = None
        self.reset_parameters()

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
        q.train(module.training)
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe.name}"
                + (", weight_layout=kn" if self.weight_layout == "kn" else ""))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"QuantLinear input must be float32, bfloat16 or float16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"QuantLinear input is on {x.device} but its weight is on {self.weight.device}; "
                             "move the input or the module so they match")

    def _weight(self) -> torch.Tensor:
        return self.weight.t() if self.weight_layout == "kn" else self.weight

    def _quantized_weight(self):
        """Cached ``(q, qt, scale)`` of the tensor-wise INT8 weight, or None where it does not apply."""
        if torch.compiler.is_compiling() or not self.reuse_weight or not _tensorwise_reusable(self.recipe):
            return None
        w = self.weight
        key = (_optimizer_steps, w._version, w.data_ptr(), w.device, w.dtype)
        if self._wcache is None or self._wcache[0] != key:
            self._wcache = None                                    # free the old one before quantizing anew
            with torch.no_grad():
                self._wcache = (key, ops.quantize_tensorwise(self._weight()))
        return self._wcache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.recipe.quantized:
            return F.linear(x, self._weight(), self.bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features)
        with torch.autocast(dev, enabled=False):
            y = QuantLinearFunction.apply(x2, self.weight, self.bias, self.recipe, self.weight_layout == "kn",
                                          out_dtype, self._quantized_weight())
            if self.track_errors:
                self._record_errors(x2.detach(), y.detach())
        if x.dim() == 2:
            return y
        # Like F.linear (aten matmul), fold the batch dims back without making the output an autograd view:
        # FSDP2 cannot hook in-place ops on a view output (it warns), and nn.Linear's output is no view either.
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))

    @torch.no_grad()
    def _record_errors(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Quantization error of the forward: relative error of X̂ and Ŵ, SQNR of Y against fp32."""
        w = self._weight()
        ref = F.linear(x.float(), w.float(), None if self.bias is None else self.bias.float())
        self.stats = {
            "x_rel_err": relative_error(x, emulate(x, self.recipe.fprop.lhs)),
            "w_rel_err": relative_error(w, emulate(w, self.recipe.fprop.rhs)),
            "y_sqnr_db": sqnr(ref, y.float()),
        }


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear), by duck typing."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")
            and getattr(module.weight, "dim", lambda: 0)() == 2 and module.weight.shape[1] == module.nf)
