"""A timing-only checkpoint folder (config + tokenizer + RANDOM_WEIGHTS) loads like any model, with
the same seeded weights every time, so its chunk keys are stable across restarts."""

from __future__ import annotations

import torch
from tests.helpers.model import bpe_tokenizer

from blend.loader import RANDOM_WEIGHTS, load, write_random_checkpoint


def test_a_random_weight_checkpoint_loads_the_same_weights_every_time(tmp_path):
    from transformers import AutoConfig

    tokenizer = bpe_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    folder = write_random_checkpoint(tmp_path / "bench-model", config, tokenizer)
    assert (folder / RANDOM_WEIGHTS).exists() and not list(folder.glob("*.safetensors"))
    first = load(str(folder), tmp_path / "cache")
    second = load(str(folder), tmp_path / "cache")
    assert first.fingerprint == second.fingerprint and first.step.n_layers == 2
    assert torch.equal(first.step.hf.lm_head.weight, second.step.hf.lm_head.weight)
