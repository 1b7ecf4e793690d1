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


def test_a_variant_row_is_compared_with_the_row_it_varies_and_other_rows_with_none():
    from services.bench.gpu import _paired, variant_base

    labels = {"full", "blend@0.05/cpu", "blend@0.05/cpu+poolgraphs", "blend@0.05/cpu+poolgraphs/first2",
              "blend@0.05/cpu/qattn+sink4+nofirst", "blend@0.05/gpu+poolgraphs", "reuse+poolgraphs"}
    assert variant_base("blend@0.05/cpu+poolgraphs/first2", labels) == "blend@0.05/cpu+poolgraphs"
    assert variant_base("blend@0.05/cpu/qattn+sink4+nofirst", labels) == "blend@0.05/cpu"
    for label in ("full", "blend@0.05/cpu", "blend@0.05/gpu+poolgraphs", "reuse+poolgraphs"):
        assert variant_base(label, labels) is None  # ("blend@0.05" ran as no row)
    # Per round: the variant's time against its base's in the same round, the median of those ratios.
    assert _paired([10.0, 20.0, 12.0], [8.0, 25.0, 10.0]) == 1.2
