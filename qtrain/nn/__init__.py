"""Quantized layers and model conversion (the only package that knows about autograd)."""
from qtrain.nn.convert import (calibrate, convert, fallback_stats, quant_layers, quantized_linear_names, report,
                               reuse_quantized_weights, track_errors)
from qtrain.nn.linear import QuantLinear, QuantLinearFunction

__all__ = ["QuantLinear", "QuantLinearFunction", "calibrate", "convert", "report", "track_errors", "quant_layers",
           "quantized_linear_names", "reuse_quantized_weights", "fallback_stats"]
