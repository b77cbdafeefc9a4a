"""CUDA graphs (``torch.compile(mode="reduce-overhead")``, the e2e suite's ``cudagraphs`` mode): random draws
inside a capture come from the default CUDA generator (:func:`qtrain.quant.core.capture_safe`), so each replay
rounds and samples afresh; whole training steps of the presets run as CUDA graphs without Inductor skipping them.
"""
from __future__ import annotations

import pytest
import torch

from qtrain import ops, recipes
from qtrain.bench import e2e
from qtrain.nn.functional import sr_generator
from qtrain.quant import lss
from qtrain.quant.core import capture_safe, capturing


def test_capture_safe_keeps_the_generator_outside_a_capture():
    g = torch.Generator()
    assert capture_safe(g) is g and capture_safe(None) is None and not capturing(torch.device("cpu"))


def _replays(fn, n: int) -> list[torch.Tensor]:
    """``fn()``'s output over ``n`` replays of one CUDA graph capture (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    outs = []
    for _ in range(n):
        graph.replay()
        outs.append(out.clone())
    return outs


@pytest.mark.gpu
def test_capture_safe_uses_the_default_generator_while_capturing():
    g = sr_generator(torch.device("cuda"))
    seen = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.append(capture_safe(g))
    assert seen == [None]


@pytest.mark.gpu
def test_stochastic_rounding_in_a_cuda_graph_rounds_afresh_on_each_replay():
    """Without capture-safe seeds every replay would repeat the captured rounding (a biased quantizer)."""
    x = torch.randn(256, 512, device="cuda")

    def deq():
        q, s = ops.quantize_blockwise_sr(x, 1, 128)
        return q.float() * s.repeat_interleave(128, 1)

    outs = _replays(deq, 64)
    assert not torch.equal(outs[0], outs[1])
    one = torch.linalg.vector_norm(outs[0] - x)
    mean = torch.linalg.vector_norm(torch.stack(outs).mean(0) - x)
    assert mean < 0.25 * one              # 64 independent draws: ~1/8 of one draw's error, if unbiased


@pytest.mark.gpu
def test_leverage_score_sampling_in_a_cuda_graph_samples_afresh():
    p = torch.full((4096,), 0.5, device="cuda")
    keeps = _replays(lambda: lss.sample_rows(p, sr_generator(p.device)).float(), 8)
    assert not torch.equal(keeps[0], keeps[1])
    assert abs(torch.stack(keeps).mean().item() - 0.5) < 0.02


@pytest.mark.gpu
def test_lss_dgrad_does_not_gather_inside_a_capture(monkeypatch):
    """The gathered LSS GEMM synchronizes with the host (the kept-row count): inside a capture the masked one runs."""
    from qtrain.nn import linear

    monkeypatch.setattr(linear, "LSS_GATHER_MIN_OPS", 0)
    seen = []
    assert linear._lss_gather(torch.device("cuda"), 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.append(linear._lss_gather(torch.device("cuda"), 1))
    assert seen == [False]


SMALL = e2e.Shape("small", d_model=512, ffn_hidden=1536, n_layer=2, n_head=4, batch=2, seq_len=256, vocab_size=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["switchback", "jetfire_wide", "fallback", "int4"])
def test_training_steps_run_as_cuda_graphs(recipe):
    """A whole step (forward, backward; the optimizer eager) of each preset under ``reduce-overhead``: no error
    and no CUDA-graph skip (the e2e row turns a skip into an error)."""
    rows = e2e.run_rows([SMALL], [recipes.get(recipe)], ["cudagraphs"], device="cuda", timer=e2e.CudaTimer(),
                        steps=3, warmup=3, filter_name="all")
    assert [r["error"] for r in rows] == [None, None], rows
    assert rows[1]["step_ms"] > 0 and rows[1]["converted"] == "8/9"
