"""Test set-up: Triton's interpreter where there is no GPU (set before any kernel module is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import qtrain.ops  # noqa: E402

qtrain.ops.CHECK_ALIASING = True      # every op called through the dispatcher checks its outputs are fresh tensors


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the lent device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
