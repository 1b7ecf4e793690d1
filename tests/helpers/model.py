"""Tiny random-weight models and tokenizers, and random prompt layouts in their vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from blend.prompt import PromptLayout
from tests.helpers.corpus import CORPUS, TOPICS

CACHE_DIR = Path(os.environ.get("KVBLEND_CACHE_DIR", "~/.cache/kvblend")).expanduser()
TINY_VOCAB = 128


def tiny_model(model_type: str = "llama", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
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


def random_layout(seed=0, chunk_lengths=(9, 14, 11)) -> PromptLayout:
    """A prompt of random token ids in the tiny model's vocabulary: a prefix, chunks, a suffix."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: tuple(torch.randint(0, TINY_VOCAB, (n,), generator=g).tolist())  # noqa: E731
    return PromptLayout(prefix=rand(6), chunks=tuple(rand(n) for n in chunk_lengths), suffix=rand(5))


def assert_same_prefill(got, want, tolerance: float = 1e-4) -> None:
    """Two `Prefill`s of one prompt agree: the same tokens recomputed, logits and filled cache within `tolerance`."""
    assert got.recomputed == want.recomputed
    torch.testing.assert_close(got.logits, want.logits, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got.cache.data[:, : want.length], want.cache.data[:, : want.length],
                               rtol=tolerance, atol=tolerance)


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


def bpe_tokenizer():
    """A byte-level BPE of ~400 tokens: CJK and emoji stay split into byte tokens, which is the case
    where a token boundary can fall inside a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS + list(TOPICS.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
