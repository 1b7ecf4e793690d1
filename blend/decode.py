"""Greedy decoding from any filled cache: the same per-layer step, one position at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass
class Decoding:
    """One answer being decoded: its KV buffer, how many positions are filled, the next token's logits."""

    cache: KVCache
    length: int
    logits: torch.Tensor

    def token(self) -> int:
        return int(self.logits.argmax())

    @property
    def full(self) -> bool:
        return self.length >= self.cache.capacity


def advance(step: LlamaStep, decodings: Sequence[Decoding], tokens: Sequence[int]) -> None:
    """Feed each decoding its token at its next position, all in one batched step (weights read once
    for every request); each gets its next logits."""
    if any(d.full for d in decodings):
        raise ValueError("a decoding's KV buffer is full")
    positions = torch.tensor([d.length for d in decodings], device=step.device)
    logits = step.forward_each(torch.tensor(list(tokens), device=step.device), positions,
                               [d.cache for d in decodings])
    for decoding, row in zip(decodings, logits):
        decoding.logits = row
        decoding.length += 1


def greedy(step: LlamaStep, cache: KVCache, length: int, first_logits: torch.Tensor,
           max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
    """Yield greedy tokens; `first_logits` are the last prompt token's, `length` the prompt length."""
    decoding = Decoding(cache, length, first_logits)
    for _ in range(max_new_tokens):
        token = decoding.token()
        if token in stop_ids:
            return
        yield token
        if decoding.full:
            return
        advance(step, [decoding], [token])
