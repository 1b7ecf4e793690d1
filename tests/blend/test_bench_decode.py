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
