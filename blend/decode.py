"""Decoding from any filled cache, greedy or sampled: the same per-layer step, one position at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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


class Picks:
    """The greedy tokens of one decode step's rows, computed on the device (a whole-step graph's argmax) and
    copied to the host behind the step without waiting for it: read when asked (`value`), which waits for
    that step only, not for steps enqueued after it."""

    def __init__(self, picks: torch.Tensor):
        self._values: list[int] | None = None
        if picks.is_cuda:
            self._host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
            self._host.copy_(picks, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = picks.clone(), None

    def value(self, row: int) -> int:
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()  # the GIL released while it waits
            self._values = self._host.tolist()
        return self._values[row]


@dataclass
class _Next:
    """A token not yet read: a row of a step's `Picks` (on the device until read), or one picked from logits."""

    picks: Picks | None = None
    row: int = 0
    logits: torch.Tensor | None = None
    choose: Callable[[torch.Tensor], int] = _argmax
    in_slot: bool = False  # also held on the device in the request's slot of the decode graphs (`DecodeGraphs`)

    def value(self) -> int:
        if self.picks is not None:
            return self.picks.value(self.row)
        settle(self.logits)
        return self.choose(self.logits)


@dataclass
class Decoding:
    """One answer being decoded: its KV buffer, how many positions are filled, the newest step's logits,
    how a token is picked from them (its own sampler: a batch never shares draws), and the tokens its
    steps made that were not read yet, oldest first (one per step; the prompt's logits give the first).

    A greedy step through the whole-step decode graphs leaves its token on the device: the next step may
    be fed it there (`advance` with None) before the host reads it, so the GPU runs that step while the
    host sends the token (`decode`, the server's `decode_together`: one step ahead)."""

    cache: KVCache
    length: int
    logits: torch.Tensor
    choose: Callable[[torch.Tensor], int] = _argmax
    # Decoding alone, its step runs as one CUDA graph (blend/graphs.py), captured at its first such
    # step; in a batch it takes the eager batched step. Both write the same buffer.
    use_graph: bool = False
    graph: GraphDecoder | None = None
    unread: deque = field(default_factory=deque)  # _Next per step not yet read, oldest first

    def __post_init__(self):
        if not self.unread:
            self.unread.append(_Next(logits=self.logits, choose=self.choose))

    def token(self) -> int:
        """The oldest token not yet read (waiting for the step that made it, not for later ones)."""
        if not self.unread:
            raise RuntimeError("every token this decoding made was read: advance it first")
        return self.unread.popleft().value()

    @property
    def on_device(self) -> bool:
        """Can the next step be fed this decoding's newest token where it is, on the device?"""
        return bool(self.unread) and self.unread[-1].in_slot

    @property
    def full(self) -> bool:
        return self.length >= self.cache.capacity


def advance(step: LlamaStep, decodings: Sequence[Decoding], tokens: Sequence[int | None]) -> None:
    """Feed each decoding its token at its next position, all in one batched step (weights read once
    for every request); each gets its next logits and its next token (unread). A token None is the
    decoding's newest one, fed from the device without reading it (`Decoding.on_device`); where the step
    cannot take it there (no graph for this batch), it is read first."""
    if any(d.full for d in decodings):
        raise ValueError("a decoding's KV buffer is full")
    if any(t is None and not d.on_device for d, t in zip(decodings, tokens)):
        raise ValueError("a token left on the device (None) for a decoding whose newest token is not there")
    graphs = step.decode_graphs
    if graphs is not None:
        logits = graphs.run(list(tokens), [d.length for d in decodings], [d.cache for d in decodings])
        if logits is not None:
            picks = Picks(graphs.last_picks[: len(decodings)])
            for row, (decoding, out) in enumerate(zip(decodings, logits)):
                decoding.logits = out
                greedy_row = decoding.choose is _argmax
                decoding.unread.append(_Next(picks, row, in_slot=True) if greedy_row
                                       else _Next(logits=out, choose=decoding.choose))
                decoding.length += 1
            return
    tokens = [d.unread[-1].value() if t is None else t for d, t in zip(decodings, tokens)]
    if len(decodings) == 1 and decodings[0].use_graph:
        decoding = decodings[0]
        if decoding.graph is None:
            decoding.graph = GraphDecoder(step, decoding.cache)
        decoding.logits = decoding.graph(tokens[0], decoding.length)
        decoding.unread.append(_Next(logits=decoding.logits, choose=decoding.choose))
        decoding.length += 1
        return
    positions = torch.tensor([d.length for d in decodings])  # on the host: forward_each moves it
    logits = step.forward_each(torch.tensor(list(tokens)), positions,
                               [d.cache for d in decodings])
    # Greedy rows' next tokens in one argmax and one read for the batch, not one wait per request.
    greedy_rows = [i for i, d in enumerate(decodings) if d.choose is _argmax]
    picks = Picks(logits[greedy_rows].argmax(-1)) if len(greedy_rows) > 1 else None
    for index, (decoding, row) in enumerate(zip(decodings, logits)):
        decoding.logits = row
        decoding.unread.append(_Next(picks, greedy_rows.index(index)) if picks is not None and index in greedy_rows
                               else _Next(logits=row, choose=decoding.choose))
        decoding.length += 1


def greedy(step: LlamaStep, cache: KVCache, length: int, first_logits: torch.Tensor,
           max_new_tokens: int, stop_ids: set[int]) -> Iterator[int]:
    """Yield greedy tokens; `first_logits` are the last prompt token's, `length` the prompt length."""
    return decode(step, cache, length, first_logits, max_new_tokens, stop_ids, Sampling())


def decode(step: LlamaStep, cache: KVCache, length: int, first_logits: torch.Tensor,
           max_new_tokens: int, stop_ids: set[int], sampling: Sampling) -> Iterator[int]:
    """Yield the answer's tokens, each picked as `sampling` says. Greedy through the decode graphs, one
    step ahead: the step after a token is enqueued, fed from the device, before that token is read."""
    decoding = Decoding(cache, length, first_logits, sampling.chooser())
    emitted = 0
    while True:
        token = decoding.token()
        if token in stop_ids:
            return
        yield token
        emitted += 1
        if emitted >= max_new_tokens:
            return
        if not decoding.unread:  # no step was fed this token yet
            if decoding.full:
                return
            advance(step, [decoding], [token])
        if decoding.on_device and emitted + len(decoding.unread) < max_new_tokens and not decoding.full:
            advance(step, [decoding], [None])
