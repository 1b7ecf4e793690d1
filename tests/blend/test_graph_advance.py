"""`advance` with a decoding that asks for the graph step (its body runs eagerly on the CPU) gives the
tokens the eager step gives, alone and when it later joins a batch (both write the same buffer)."""

import torch

from blend.adapter import LlamaStep
from blend.decode import Decoding, advance
from blend.fusor import BlendConfig, prefill
from tests.helpers import model
from tests.helpers.model import random_layout


def _decode(step, layouts, use_graph, n=6, batch_from=3):
    decodings = []
    for layout in layouts:
        filled = prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + n)
        decodings.append(Decoding(filled.cache, filled.length, filled.logits, use_graph=use_graph))
    answers = [[] for _ in layouts]
    for turn in range(n):
        # The first decoding runs alone for the first turns (the graph step), then all go together.
        group = decodings[:1] if turn < batch_from else decodings
        tokens = [d.token() for d in group]
        for index, token in enumerate(tokens):
            answers[index].append(token)
        advance(step, group, tokens)
    return answers[0], decodings[0]


def test_graph_step_alone_then_batched_gives_the_eager_tokens():
    step = LlamaStep(model.tiny_model())
    layouts = [random_layout(seed=11), random_layout(seed=12)]
    with torch.inference_mode():
        eager, plain = _decode(step, layouts, use_graph=False)
        graphed, used = _decode(step, layouts, use_graph=True)
    assert graphed == eager
    assert used.graph is not None and plain.graph is None
    assert (used.logits - plain.logits).abs().max() < 1e-5


def test_bench_service_has_the_decode_graph_pair_and_rejects_unknown_scenarios():
    import pytest

    from services.bench.service_gpu import GpuServiceBenchConfig, scenarios

    pair = scenarios(GpuServiceBenchConfig(model="m", scenarios=("decode-eager", "decode-graphs")))
    assert [s.name for s in pair] == ["decode-eager", "decode-graphs"]
    eager, graphs = (dict(s.server) for s in pair)
    assert eager.pop("decode_graphs") is False and graphs.pop("decode_graphs") is True and eager == graphs
    assert pair[0].rows == pair[1].rows and pair[0].store == pair[1].store
    with pytest.raises(ValueError, match="decode-graph "):
        scenarios(GpuServiceBenchConfig(model="m", scenarios=("decode-graph",)))
