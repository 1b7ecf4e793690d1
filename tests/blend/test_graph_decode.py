"""The CUDA-graph decode's body (blend/graphs.py) is the per-layer step on a fixed shape: run eagerly
on the CPU it gives the logits the eager batched step gives, token after token, and the same greedy
answer. On CUDA the captured graph is checked against the eager step (skipped without CUDA)."""

import pytest
import torch

from blend.adapter import LlamaStep
from blend.fusor import BlendConfig, prefill
from blend.graphs import GraphDecoder
from tests.helpers import model
from tests.helpers.model import random_layout


def _filled(step, layout, extra=8):
    return prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + extra)


def _eager_answer(step, filled, n):
    tokens, logits = [], filled.logits
    cache = filled.cache
    for offset in range(n):
        tokens.append(int(logits.argmax()))
        logits = step.forward_each(torch.tensor([tokens[-1]]), torch.tensor([filled.length + offset]), [cache])[0]
    return tokens, logits


def _graph_answer(step, filled, n):
    decoder = GraphDecoder(step, filled.cache)
    tokens, logits = [], filled.logits
    for offset in range(n):
        tokens.append(int(logits.argmax()))
        logits = decoder(tokens[-1], filled.length + offset)
    return tokens, logits


def test_graph_body_equals_the_eager_step_on_cpu():
    step = LlamaStep(model.tiny_model())
    layout = random_layout(seed=9)
    with torch.inference_mode():
        want, want_logits = _eager_answer(step, _filled(step, layout), 6)
        got, got_logits = _graph_answer(step, _filled(step, layout), 6)
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-5


def test_graph_decoder_rejects_a_position_outside_the_buffer():
    step = LlamaStep(model.tiny_model())
    with torch.inference_mode():
        filled = _filled(step, random_layout(seed=9), extra=2)
        decoder = GraphDecoder(step, filled.cache)
        with pytest.raises(ValueError, match=f"position {filled.cache.capacity}"):
            decoder(1, filled.cache.capacity)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graph_equals_eager_on_cuda():
    hf = model.tiny_model().to("cuda", torch.bfloat16)
    step = LlamaStep(hf)
    layout = random_layout(seed=9)
    with torch.inference_mode():
        want, want_logits = _eager_answer(step, _filled(step, layout, 24), 16)
        got, got_logits = _graph_answer(step, _filled(step, layout, 24), 16)
    assert got == want
    assert (got_logits - want_logits).abs().max() < 0.05 * want_logits.abs().max()
