"""`kvblend bench`'s decode row (our step against Hugging Face `generate`), run on the CPU on a tiny
random Llama in float32: both pick the same greedy tokens and both figures are measured."""

import torch

from blend.adapter import LlamaStep
from services.bench.gpu import time_decode
from tests.helpers import model
from tests.helpers.model import random_layout


def test_decode_row_times_both_and_they_agree():
    hf = model.tiny_model()
    step = LlamaStep(hf)
    with torch.inference_mode():
        row = time_decode(step, hf, random_layout(seed=7), steps=6, repeats=2)
    assert row["same_tokens"] is True
    assert row["steps"] == 6 and row["context_tokens"] == len(random_layout(seed=7))
    assert row["ours_ms_per_token"] > 0 and row["ours_min_ms_per_token"] <= row["ours_ms_per_token"]
    assert row["hf_generate_ms_per_token"] != 0 and row["speedup_vs_hf_generate"] != 0


def test_batch_decode_row_times_both_attention_paths_and_they_agree():
    from blend.graphs import LayerGraphs
    from services.bench.gpu import time_batch_decode

    step = LlamaStep(model.tiny_model())
    with torch.inference_mode():
        row = time_batch_decode(step, random_layout(seed=7), LayerGraphs(step, buckets=(4,)), batch=3, steps=4,
                                repeats=2)
    assert row["same_tokens"] is True and row["batch"] == 3 and row["layer_graphs"] is True
    assert row["per_request_attention_ms_per_step"] > 0 and row["batched_attention_ms_per_step"] > 0
    assert step.graphs is None and step.batched_attention is False  # the step is left as it was
