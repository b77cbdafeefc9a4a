"""Optimizers."""
from qtrain.optim.stable_adamw import StableAdamW

__all__ = ["StableAdamW"]
