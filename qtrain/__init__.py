"""qtrain: train transformers with their matrix multiplications in INT8 and INT4."""
from qtrain import ops, optim, quant, recipes
from qtrain.nn import QuantLinear, calibrate, convert, fallback_stats, report, reuse_quantized_weights, track_errors
from qtrain.recipes import GemmSpec, OperandSpec, Recipe

__version__ = "0.1.0"
__all__ = ["convert", "calibrate", "report", "fallback_stats", "track_errors", "reuse_quantized_weights", "QuantLinear", "Recipe", "GemmSpec",
           "OperandSpec", "recipes", "quant", "ops", "optim"]
