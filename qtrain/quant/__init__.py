"""Reference numerics (pure PyTorch): the contract the Triton kernels in ``qtrain.kernels`` are tested against."""
from qtrain.quant.core import (dequantize, expand_scale, fake_quantize, pack_int4, quantize, relative_error,
                               sqnr, unpack_int4)
from qtrain.quant.block_gemm import block_int8_gemm
from qtrain.quant.blockwise import (quantize_blockwise, quantize_blockwise_sr, quantize_blockwise_sr_dual,
                                   requantize_blockwise_t)
from qtrain.quant import dataflow
from qtrain.quant.dataflow import gelu_quantize, layernorm_quantize, rmsnorm_quantize, swiglu_quantize
from qtrain.quant.fallback import fallback_block_gemm, quantize_fallback, quantize_fallback_sr
from qtrain.quant.int8_gemm import int8_gemm, int_mm_exact
from qtrain.quant.rowwise import quantize_rowwise
from qtrain.quant.tensorwise import quantize_tensorwise
from qtrain.quant.transpose import transpose_int8
from qtrain.quant import hadamard, lsq, lss  # noqa: F401  (the INT4 recipe's numerics)

__all__ = ["quantize", "dequantize", "fake_quantize", "expand_scale", "pack_int4", "unpack_int4", "sqnr",
           "relative_error", "quantize_rowwise", "quantize_tensorwise", "quantize_blockwise", "quantize_blockwise_sr",
           "quantize_blockwise_sr_dual", "requantize_blockwise_t",
           "int8_gemm", "int_mm_exact", "block_int8_gemm", "quantize_fallback", "quantize_fallback_sr",
           "fallback_block_gemm",
           "rmsnorm_quantize", "layernorm_quantize", "swiglu_quantize", "gelu_quantize", "transpose_int8"]
