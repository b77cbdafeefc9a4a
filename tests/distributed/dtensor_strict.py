"""Make DTensor refuse the ``_foreach_*`` ops, as the GPU's torch refused some of them.

Which foreach ops DTensor can shard depends on the torch version: torch 2.11 (the lent H100) has no strategy for
``aten._foreach_clamp_min.Scalar`` (``qtrain train --fsdp`` failed with "... does not have a sharding strategy
registered"), while torch 2.13 (CI) finds it by its pointwise tag. StableAdamW runs its foreach math on the
local shards, so it needs none of them; a spawned test process calls :func:`refuse_foreach` before any DTensor
op (sharding decisions are cached), so a DTensor foreach op fails here as on the GPU, whatever torch runs the
test.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def refuse_foreach() -> list:
    """Drop DTensor's sharding strategies for every ``aten._foreach_*`` op in this process; return them."""
    prop = DTensor._op_dispatcher.sharding_propagator
    tables = [getattr(prop, name) for name in ("op_strategy_funcs", "op_single_dim_strategy_funcs", "op_to_rules")
              if isinstance(getattr(prop, name, None), dict)]
    assert tables, "torch's DTensor sharding propagator changed: update tests/distributed/dtensor_strict.py"
    dropped = [op for table in tables for op in list(table)
               if isinstance(op, torch._ops.OpOverload) and op.name().startswith("aten::_foreach_")]
    for table in tables:
        for op in dropped:
            table.pop(op, None)
    for cache in ("propagate_op_sharding", "_propagate_tensor_meta_cached"):
        clear = getattr(getattr(prop, cache, None), "cache_clear", None)
        if clear is not None:
            clear()
    return dropped
