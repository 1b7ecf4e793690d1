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


def save_tiny_llama(folder: Path, tokenizer, vocab_size: int, max_positions: int) -> Path:
    """A 2-layer random-weight Llama with `tokenizer`, saved as a Hugging Face folder (`--model DIR`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return LlamaStep(tiny_model())


@pytest.fixture(scope="session")
def smol():
    from blend.loader import load

    return load("smollm2-135m", CACHE_DIR)
