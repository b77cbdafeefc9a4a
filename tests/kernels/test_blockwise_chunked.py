"""The chunked block quantizer (``_blockwise_chunked_kernel``: large tiles read twice in chunks) against the
reference twin bit for bit — row chunks of 128-row weight blocks, column chunks of transposed views, the re-blocking
of saved INT8 codes with NaN/Inf block scales — its stochastic rounding bit for bit the one-pass kernel's (the same
uniforms), the default tiling's choices for jetfire_wide's calls, and bad configs refused."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qtrain import quant  # noqa: E402
from qtrain.kernels import blockwise as kbw  # noqa: E402

from .helpers import assert_same, rows_with_distinct_scales  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transposed,blk,cfg", [
    (False, (128, 256), (128, 4, 16)), (False, (128, 256), (128, 8, 128)), (False, (128, 128), (128, 4, 32)),
    (True, (128, 256), (128, 4, 32)), (True, (128, 128), (128, 4, 8)), (True, (1, 256), (64, 4, 64)),
    (True, (1, 256), (16, 4, 256)), (True, (32, 128), (64, 4, 16))], ids=str)
def test_chunked_matches_twin(transposed, blk, cfg, dtype):
    """Ragged in both dims (partial blocks, masked chunk tails); several chunks per tile."""
    x = rows_with_distinct_scales(300, 520, dtype, DEV, seed=1)
    x[5, 7] = float("nan")                                    # NaN reaches its block's scale, codes 0
    x = x.t().contiguous().t() if transposed else x
    got = kbw._launch(x, *blk, None, config=cfg)
    want = quant.quantize_blockwise(x, *blk)
    assert_same(got[0], want[0], "codes")
    assert_same(got[1], want[1], "scales")


@pytest.mark.parametrize("blk_in,blk,cfg", [((1, 256), (128, 256), (128, 4, 32)), ((1, 256), (1, 256), (128, 4, 64)),
                                             ((1, 64), (128, 256), (128, 4, 16))],    # a scale gather per element
                         ids=str)
def test_chunked_requantize_matches_twin(blk_in, blk, cfg):
    x = rows_with_distinct_scales(600, 520, torch.float32, DEV, seed=2)
    q, s = quant.quantize_blockwise(x, *blk_in)
    s[3, 1], s[-1, -1] = float("nan"), float("inf")
    got = kbw._launch(q.t(), *blk, None, (s.t(), blk_in[1], blk_in[0]), config=cfg)
    want = quant.requantize_blockwise_t(q, s, *blk_in, *blk)
    assert_same(got[0], want[0], "codes")
    assert_same(got[1], want[1], "scales")
    default = kbw.requantize_blockwise_t(q, s, *blk_in, *blk)            # the default tiling: chunked too
    assert_same(default[0], want[0], "default codes")


def test_chunked_sr_is_the_one_pass_kernels():
    """Column chunks of a transposed view draw the same uniforms (``_uniforms_down``: counters by column and
    8-row group) as the one-pass kernel, whatever the tiling: the same codes bit for bit."""
    x = rows_with_distinct_scales(600, 300, torch.bfloat16, DEV, seed=4).t()
    seed = torch.tensor([11], device=DEV)
    one_pass = kbw._launch(x, 1, 256, seed, config=(16, 4))
    for cfg in [(64, 4, 64), (128, 4, 32), (8, 4, 256)]:
        got = kbw._launch(x, 1, 256, seed, config=cfg)
        assert_same(got[0], one_pass[0], f"SR codes {cfg}")
        assert_same(got[1], one_pass[1], f"SR scales {cfg}")
    assert_same(one_pass[1], quant.quantize_blockwise(x, 1, 256)[1], "SR scales are RTN's")


def test_default_tiling_of_jetfire_wide_calls():
    """Weights (128×256 blocks, fp32) in row chunks, their transposes and the re-blocked INT8 X in column chunks,
    dYᵀ's 256-token SR blocks (bf16) with tiles spanning 128 bytes down each column; 1×c row blocks unchanged."""
    gpu = not kbw.interpreting()
    assert kbw.launch_config(22016, 128, 256) == (128, 4, 16 if gpu else 128)
    assert kbw.launch_config(4096, 128, 256, transposed=True) == (128, 4, 32 if gpu else 256)
    assert kbw.launch_config(4096, 128, 256, transposed=True, elem_size=1) == (128, 4, 32 if gpu else 256)
    assert kbw.launch_config(4096, 1, 256, transposed=True, elem_size=2, sr=True) == (64, 4, 64 if gpu else 256)
    assert kbw.launch_config(8192, 1, 256, elem_size=2, sr=True)[2] == 0
    assert kbw.launch_config(8192, 1, 128, transposed=True, elem_size=4)[2] == 0
    assert kbw.launch_config(512, 128, 256, sr=True)[2] == 0              # SR row blocks stay one pass


def test_bad_chunked_config_refused():
    x = torch.zeros(256, 256, device=DEV)
    seed = torch.tensor([1], device=DEV)
    with pytest.raises(ValueError, match="CH a power of two dividing c"):
        kbw._launch(x.t(), 128, 256, None, config=(128, 4, 48))
    with pytest.raises(ValueError, match="row chunks, RTN only"):
        kbw._launch(x, 1, 256, None, config=(64, 4, 16))                  # TM ≠ r
    with pytest.raises(ValueError, match="row chunks, RTN only"):
        kbw._launch(x, 128, 256, seed, config=(128, 4, 16))
