"""Triton kernels, each the twin of the PyTorch reference with the same module and function name in
``qtrain.quant`` (same signature, same contract; tests compare them). ``qtrain.ops`` dispatches to them.

Kernel modules import Triton at import time; import them only where Triton is installed.
"""
