"""Decode of one request as one CUDA graph: the per-layer step, captured once per KV buffer, replayed
per token, so a token costs one launch instead of ~40 per layer (issue 16; the eager step is the
reference and what runs on CPU).

The graph's body is the same per-layer step on a fixed shape: one token at a position held in a device
tensor, attending to the whole buffer with a mask from that position (keys past it are hidden, so the
shape never changes while the answer grows). On CPU `__call__` runs the body eagerly: it is the code
the graph records, and what the CPU tests check against `LlamaStep.forward_each`.
"""

from __future__ import annotations

import time

import torch

from blend.adapter import LlamaStep
from blend.cache import KVCache


class GraphDecoder:
    """Next-token logits for one request whose KV buffer is `cache`, one token at a time."""

    def __init__(self, step: LlamaStep, cache: KVCache, warmup: int = 2):
        self.step = step
        self.cache = cache
        device = step.device
        self._token = torch.zeros(1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._keys = torch.arange(cache.capacity, device=device)
        self._logits: torch.Tensor | None = None
        self.graph = None
        self.capture_s = 0.0
        if device.type == "cuda":
            self._capture(warmup)

    def _body(self) -> torch.Tensor:
        step, cache, position = self.step, self.cache, self._position
        mask = torch.zeros(cache.capacity, dtype=step.dtype, device=position.device)
        mask = mask.masked_fill(self._keys > position, float("-inf"))[None, None, None, :]
        h, rope = step.embed(self._token), step.cos_sin(position)
        for layer in range(step.n_layers):
            q, k, v = step.qkv(layer, h, position, rope)
            cache.write(layer, position, k, v)
            h = step._project(layer, h, step.attention(q, *cache.keys_values(layer, cache.capacity), mask))
        return step.logits(h)[0]

    def _capture(self, warmup: int) -> None:
        start = time.perf_counter()
        # The position the warm-up runs write to is the buffer's last: never a filled one (a request's
        # prompt and answer end before it, or the buffer is full and decode has stopped).
        self._position.fill_(self.cache.capacity - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._logits = self._body()
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start

    def __call__(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Feed `token` at `position` (its K/V written there) and return the next token's logits [vocab]."""
        if not 0 <= position < self.cache.capacity:
            raise ValueError(f"position {position} is outside the KV buffer of {self.cache.capacity} tokens")
        self._token.fill_(int(token))
        self._position.fill_(position)
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self._logits.clone()
