"""Decoding from any filled cache, greedy or sampled: the same per-layer step, one position at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from blend.adapter import LlamaStep
from blend.cache import KVCache
from blend.graphs import GraphDecoder


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


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy at temperature 0; else sampled from the softmax at that
    temperature, within the smallest set of tokens whose probability reaches top_p. A seed makes the
    draws, and so the answer, the same every time."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature {self.temperature} is outside 0..2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} is outside (0, 1]")

    def chooser(self) -> Callable[[torch.Tensor], int]:
        if self.temperature == 0.0:
            return _argmax
        generator = torch.Generator()  # on the CPU: the same draws whatever the device
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)

        def choose(logits: torch.Tensor) -> int:
            probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
            if self.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep each token whose preceding mass is still under top_p (the first always).
                keep = (sorted_probs.cumsum(-1) - sorted_probs) < self.top_p
                probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
            return int(torch.multinomial(probs, 1, generator=generator))

        return choose


def _argmax(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def settle(tensor: torch.Tensor) -> None:
    """Wait for the GPU work that produces `tensor` with the GIL released: `.item()` and `.tolist()`
    hold it while they wait, so a server's other threads (streaming the tokens already made) would
    stall behind every step instead of running while the GPU computes. Nothing on CPU."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()


@dataclass
class Decoding:
    """One answer being decoded: its KV buffer, how many positions are filled, the next token's logits,
    and how a token is picked from them (its own sampler: a batch never shares draws)."""

    cache: KVCache
    length: int
    logits: torch.Tensor
    choose: Callable[[torch.Tensor], int] = _argmax
    # Decoding alone, its step runs as one CUDA graph (blend/graphs.py), captured at its first such
    # step; in a batch it takes the eager batched step. Both write the same buffer.
    use_graph: bool = False
    graph: GraphDecoder | None = None
    # The greedy pick of `logits`, where a batched step read every row's in one go (None: not yet).
    picked: int | None = None

    def token(self) -> int:
        if self.picked is not None and self.choose is _argmax:
            return self.picked
        settle(self.logits)
        return self.choose(self.logits)

    @property
    def full(self) -> bool:
        return self.length >= self.cache.capacity


def advance(step: LlamaStep, decodings: Sequence[Decoding], tokens: Sequence[int]) -> None:
    """Feed each decoding its token at its next position, all in one batched step (weights read once
    for every request); each gets its next logits."""
    if any(d.full for d in decodings):
        raise ValueError("a decoding's KV buffer is full")
    if len(decodings) == 1 and decodings[0].use_graph:
        decoding = decodings[0]
        if decoding.graph is None:
            decoding.graph = GraphDecoder(step, decoding.cache)
        decoding.logits = decoding.graph(tokens[0], decoding.length)
        decoding.picked = None
        decoding.length += 1
        return
    positions = torch.tensor([d.length for d in decodings])  # on the host: forward_each moves it
    logits = step.forward_each(torch.tensor(list(tokens)), positions,
                               [d.cache for d in decodings])
    # Greedy rows' next tokens in one argmax and one read for the batch, not one wait per request.
    greedy_rows = [i for i, d in enumerate(decodings) if d.choose is _argmax]
    picks = {}
    if len(greedy_rows) > 1:
        rows = logits[greedy_rows].argmax(-1)
        settle(rows)
        picks = dict(zip(greedy_rows, rows.tolist()))
    for index, (decoding, row) in enumerate(zip(decodings, logits)):
        decoding.logits = row
        decoding.picked = picks.get(index)
        decoding.length += 1


def greedy(step: LlamaStep, cache: KVCache, length: int, first_logits: torch.Tensor,
           max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
    """Yield greedy tokens; `first_logits` are the last prompt token's, `length` the prompt length."""
    return decode(step, cache, length, first_logits, max_new_tokens, stop_ids, Sampling())


def decode(step: LlamaStep, cache: KVCache, length: int, first_logits: torch.Tensor,
           max_new_tokens: int, stop_ids: set[int], sampling: Sampling) -> Iterator[int]:
    """Yield the answer's tokens, each picked as `sampling` says."""
    decoding = Decoding(cache, length, first_logits, sampling.chooser())
    for _ in range(max_new_tokens):
        token = decoding.token()
        if token in stop_ids:
            return
        yield token
        if decoding.full:
            return
        advance(step, [decoding], [token])
