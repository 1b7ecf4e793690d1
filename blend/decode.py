"""Greedy decoding from any filled cache: the same per-layer step, one position at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from blend.adapter import LlamaStep
from blend.cache import KVCache


def stop_token_ids(tokenizer, model_config) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        if token is not None:
            ids.add(token)
    return ids


def greedy(step: LlamaStep, cache: KVCache, length: int, first_logits: torch.Tensor,
           max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
    """Yield greedy tokens; `first_logits` are the last prompt token's, `length` the prompt length."""
    logits = first_logits
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop_ids:
            return
        yield token
        if length >= cache.capacity:
            return
        position = torch.tensor([length], device=step.device)
        logits = step.forward(torch.tensor([token], device=step.device), position, cache)[-1]
        length += 1
