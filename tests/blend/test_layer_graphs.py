"""The per-layer graphs (blend/graphs.py LayerGraphs) wrap the step's row-wise parts on bucket-sized
buffers; their bodies run eagerly on the CPU, so here they must give what the plain step gives, in every
mode and in batched decode, with buckets small enough that every step runs padded rows (stale rows of
earlier steps among them). On CUDA the captured graphs are checked against eager (skipped without)."""

import pytest
import torch

from blend.adapter import LlamaStep
from blend.decode import Decoding, advance
from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
from blend.graphs import LayerGraphs
from tests.helpers import model
from tests.helpers.model import random_layout

MODES = [BlendConfig(mode="full"), BlendConfig(mode="prefix"), BlendConfig(mode="reuse"),
         BlendConfig(mode="blend", ratio=0.3), BlendConfig(mode="blend", ratio=0.3, selector="k"),
         BlendConfig(mode="blend", ratio=0.5, gradual_layers=3)]


def _run(step, layouts, config, steps=5):
    """Prefill each layout, decode all of them together, then the first alone for one more token:
    (first-token logits, last logits, tokens)."""
    with torch.inference_mode():
        decodings, firsts = [], []
        for layout in layouts:
            prefix = compute_kv(step, layout.prefix)
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            source = MemorySource(cached_entries(config.mode, prefix, chunks, layout))
            filled = prefill(step, layout, config, source if config.mode != "full" else None, len(layout) + steps + 1)
            firsts.append(filled.logits)
            decodings.append(Decoding(filled.cache, filled.length, filled.logits))
        tokens = []
        for _ in range(steps):
            picked = [d.token() for d in decodings]
            tokens.append(picked)
            advance(step, decodings, picked)
        advance(step, decodings[:1], [decodings[0].token()])  # and one request decoding alone
    return torch.stack(firsts), torch.stack([d.logits for d in decodings]), tokens


@pytest.mark.parametrize("config", MODES, ids=lambda c: c.label)
def test_layer_graph_bodies_equal_the_plain_step(config):
    plain = LlamaStep(model.tiny_model())
    graphed = LlamaStep(model.tiny_model())
    graphed.graphs = LayerGraphs(graphed, buckets=(2, 4, 16, 32))
    graphed.batched_attention = True  # the decode batch's attention in one call, as on CUDA
    for step in (plain, graphed):
        step.attention_buckets = (8, 16)  # padded attention rows too, as on CUDA
    layouts = [random_layout(seed=5), random_layout(seed=6, chunk_lengths=(7, 12))]
    want = _run(plain, layouts, config)
    got = _run(graphed, layouts, config)
    assert (got[0] - want[0]).abs().max() < 1e-5
    assert (got[1] - want[1]).abs().max() < 1e-5
    assert got[2] == want[2]
    assert set(graphed.graphs._sets) >= {2, 16}  # the decode batch and the prompt's steps ran in buckets


def test_bucket_choice():
    graphs = LayerGraphs(LlamaStep(model.tiny_model()), buckets=(1, 4, 64))
    assert [graphs.bucket(n) for n in (1, 2, 4, 5, 64, 65)] == [1, 4, 4, 64, 64, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("config", MODES, ids=lambda c: c.label)
def test_captured_layer_graphs_equal_eager_on_cuda(config):
    hf = model.tiny_model().to("cuda", torch.bfloat16)
    eager, graphed = LlamaStep(hf), LlamaStep(hf)
    graphed.graphs = LayerGraphs(graphed, buckets=(2, 4, 16, 32, 64))
    assert graphed.graphs.capture_all() > 0
    layouts = [random_layout(seed=5), random_layout(seed=6, chunk_lengths=(7, 12))]
    want = _run(eager, layouts, config)
    got = _run(graphed, layouts, config)
    # bf16: the same kernels on the same shapes, so equal up to split-K order (the gate's tolerance).
    scale = want[0].abs().max()
    assert (got[0] - want[0]).abs().max() <= 2e-2 * scale
    assert (got[1] - want[1]).abs().max() <= 2e-2 * scale
