"""Shared fixtures: tiny random-weight models for unit tests, the real SmolLM2 for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from blend.adapter import LlamaStep

CACHE_DIR = Path(os.environ.get("KVBLEND_CACHE_DIR", "~/.cache/kvblend")).expanduser()


def tiny_model(model_type: str = "llama", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False,
    )
    if model_type == "mistral":
        settings["sliding_window"] = None
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    # Random init gives near-uniform attention; larger weights make positional mistakes visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tiny():
    return LlamaStep(tiny_model())


@pytest.fixture(scope="session")
def smol():
    from blend.loader import load

    return load("smollm2-135m", CACHE_DIR)
