"""One Generate request on the model thread: prefill in its mode from the store's KV, the quality
guard's check, then greedy decoding, one token per turn, each sent to the caller as a `Piece`.

The caller (the gRPC handler) iterates the `Generation`; the model worker (services/serving/scheduler.py)
calls `start` once (prefill and the first token) and `step` for each later token, and drops the job
between tokens once `cancel()` was called or its deadline passed.
"""

from __future__ import annotations

import queue
import random
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from blend.cache import ChunkKV
from blend.decode import greedy
from blend.fusor import BlendConfig, compute_kv, prefill
from blend.quality import kl_divergence
from blend.prompt import DEFAULT_SYSTEM, build_layout
from services.serving.errors import Cancelled, DeadlineExceeded, InvalidArgument
from services.settings import GuardConfig

if TYPE_CHECKING:
    from services.serving.engine import Engine


@dataclass
class QualityCheck:
    checked: bool = False
    kl: float = 0.0
    agree: bool = False
    fell_back: bool = False


@dataclass
class Report:
    mode: str
    ratio: float
    chunk_ids: list[str]
    scores: list[float]
    prompt_tokens: int = 0
    chunk_tokens: int = 0
    chunks_hit: dict[str, int] = field(default_factory=dict)
    chunks_missing: int = 0
    missing_tokens: int = 0
    tokens_recomputed: int = 0
    queue_s: float = 0.0
    retrieve_s: float = 0.0
    load_s: float = 0.0
    load_wait_s: float = 0.0
    compute_s: float = 0.0
    missing_compute_s: float = 0.0
    quality: QualityCheck = field(default_factory=QualityCheck)
    degraded_tiers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """One streamed message: its tokens and their text; the first carries TTFT and the report, the
    last the finish."""

    text: str
    token_ids: tuple[int, ...]
    ttft_s: float | None = None
    report: Report | None = None
    finish: Finish | None = None


@dataclass(frozen=True)
class Finish:
    reason: str  # stop, length or context
    tokens: int
    seconds: float


# -- the per-request KV source ------------------------------------------------------------------

class _PrefixedSource:
    """The system prefix (in memory, exact) then the store's chunks; times how long prefill waits."""

    def __init__(self, prefix: ChunkKV, chunks):
        self.prefix = prefix
        self.chunks = chunks
        self.starts = [prefix.start] + (list(chunks.starts) if chunks is not None else [])
        self.wait_s = 0.0

    def layer(self, index: int) -> list[torch.Tensor]:
        started = time.perf_counter()
        blocks = self.chunks.layer(index) if self.chunks is not None else []
        self.wait_s += time.perf_counter() - started
        return [self.prefix.kv[index], *blocks]

    def close(self) -> None:
        if self.chunks is not None:
            self.chunks.close()


# -- one generation: a job on the model thread ---------------------------------------------------

_DONE = object()


class Generation:
    """A Generate request: prefilled and decoded on the model thread, read as an iterator of `Piece`s
    by the caller. `cancel()` (the RPC went away) makes the model thread drop it before its next token."""

    def __init__(self, engine: Engine, tenant: str, query: str, texts: list[str], chunk_ids: list[str],
                 scores: list[float], config: BlendConfig, max_new_tokens: int, arrived: float,
                 retrieve_s: float, deadline: float | None):
        self.engine = engine
        self.tenant = tenant
        self.query = query
        self.texts = texts
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.arrived = arrived
        self.deadline = deadline
        self.queued = arrived  # set again when it enters the queue
        self.report = Report(mode=config.mode, ratio=config.ratio if config.mode == "blend" else 0.0,
                             chunk_ids=chunk_ids, scores=scores, retrieve_s=retrieve_s)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._expired = False
        self._tokens: Iterator[int] | None = None
        self._ids: list[int] = []
        self._text = TextStream(engine.model.tokenizer)
        self._limit = max_new_tokens
        self._clamped = False

    # -- the caller's side ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Piece]:
        while True:
            event = self._events.get()
            if event is _DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        self._cancelled.set()
        self._events.put(_DONE)

    # -- the model thread's side (scheduler.Job) --------------------------------------------------

    def cancelled(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline and not self._cancelled.is_set():
            self._expired = True
            self._cancelled.set()
        return self._cancelled.is_set()

    def fail(self, error: BaseException) -> None:
        if self._expired and isinstance(error, Cancelled):
            error = DeadlineExceeded("the call's deadline passed before the answer was complete")
        cancelled = isinstance(error, Cancelled)
        self.engine.metrics.ended(cancelled=cancelled, failed=not cancelled)
        self._events.put(error)
        self._events.put(_DONE)

    def start(self) -> bool:
        engine, step = self.engine, self.engine.model.step
        started = time.perf_counter()
        self.report.queue_s = started - self.queued
        layout = build_layout(engine.model.tokenizer, self.texts, self.query, DEFAULT_SYSTEM)
        if layout.prefix != engine.prefix.token_ids:
            raise RuntimeError("the prompt's system prefix is not the one the engine computed")
        n = len(layout)
        chunk_tokens = sum(map(len, layout.chunks))
        limit = step.max_positions
        if limit and n >= limit:
            raise InvalidArgument(
                f"the prompt is {n} tokens (system {len(layout.prefix)}, {len(layout.chunks)} chunks "
                f"{chunk_tokens}, question {len(layout.suffix)}), over the model's context of {limit} "
                "tokens; use fewer chunks or a shorter question")
        if limit and n + self.max_new_tokens > limit:
            self._limit, self._clamped = limit - n, True
        self.report.prompt_tokens, self.report.chunk_tokens = n, chunk_tokens
        self.report.degraded_tiers = engine.degraded_tiers()
        filled = self._prefill(layout, n + self._limit)
        self.report.tokens_recomputed = filled.recomputed if self.config.mode == "blend" else 0
        if self.config.mode == "blend" and engine.guard.sample():
            filled = self._check(layout, filled, n + self._limit)
        self._tokens = greedy(step, filled.cache, filled.length, filled.logits, self._limit, engine.stop_ids)
        return self._emit(first=True)

    def step(self) -> bool:
        return self._emit(first=False)

    def _prefill(self, layout, capacity: int):
        engine, step = self.engine, self.engine.model.step
        cached = {"full": 0, "prefix": min(1, len(layout.chunks)), "reuse": len(layout.chunks),
                  "blend": len(layout.chunks)}[self.config.mode]
        if self.config.mode == "full":
            started = time.perf_counter()
            filled = prefill(step, layout, self.config, None, capacity)
            self.report.compute_s = time.perf_counter() - started
            return filled
        keys = [engine.kv_key(self.tenant, ids) for ids in layout.chunks[:cached]]
        missing_s = [0.0]

        def compute(index: int) -> ChunkKV:
            began = time.perf_counter()
            chunk = compute_kv(step, layout.chunks[index], behind=engine.prefix)
            missing_s[0] += time.perf_counter() - began
            return chunk

        engine.trace.watch(keys)
        source = None
        try:
            began = time.perf_counter()
            chunks = engine.store.source(keys, compute, device=step.device) if keys else None
            build_s = time.perf_counter() - began
            source = _PrefixedSource(engine.prefix, chunks)
            began = time.perf_counter()
            filled = prefill(step, layout, self.config, source, capacity)
            prefill_s = time.perf_counter() - began
        finally:
            if source is not None:
                source.close()
            tiers, load_s = engine.trace.finish()
        computed = chunks.computed if chunks is not None else {}
        for index, key in enumerate(keys):
            if index in computed:
                continue
            tier = tiers.get(key, "unknown")
            self.report.chunks_hit[tier] = self.report.chunks_hit.get(tier, 0) + 1
        self.report.chunks_missing = len(computed)
        self.report.missing_tokens = sum(len(layout.chunks[i]) for i in computed)
        self.report.missing_compute_s = missing_s[0]
        self.report.load_s = load_s
        self.report.load_wait_s = max(0.0, build_s + source.wait_s - missing_s[0])
        self.report.compute_s = max(0.0, prefill_s - source.wait_s)
        return filled

    def _check(self, layout, blended, capacity: int):
        """The quality guard: full prefill's first token against blend's; the full answer if too far."""
        full = prefill(self.engine.model.step, layout, BlendConfig(mode="full"), None, capacity)
        kl = kl_divergence(full.logits, blended.logits)
        agree = int(full.logits.argmax()) == int(blended.logits.argmax())
        fell_back = not kl <= self.engine.guard.config.max_kl
        self.report.quality = QualityCheck(checked=True, kl=kl, agree=agree, fell_back=fell_back)
        self.engine.guard.record(kl, agree, fell_back)
        return full if fell_back else blended

    def _emit(self, first: bool) -> bool:
        """Produce the next token as one message; the last message also carries the finish. True while
        more may follow. Never asks for a token past the limit: its forward would be wasted."""
        token = next(self._tokens, None)
        now = time.perf_counter()
        if token is not None:
            self._ids.append(token)
            self.engine.metrics.token()
        done = token is None or len(self._ids) >= self._limit
        finish = None
        if done:
            reason = "stop" if token is None else ("context" if self._clamped else "length")
            finish = Finish(reason=reason, tokens=len(self._ids), seconds=now - self.arrived)
        ttft = now - self.arrived if first else None
        if first:
            self.engine.metrics.first_token(ttft)
        ids = (token,) if token is not None else ()
        self._events.put(Piece(text=self._text.add(token, final=done), token_ids=ids, ttft_s=ttft,
                               report=self.report if first else None, finish=finish))
        if done:
            self.engine.metrics.ended()
            self._events.put(_DONE)
        return not done


class TextStream:
    """Token ids in, the text each adds out, concatenating exactly to the decode of all of them.

    Decodes a short window rather than the whole answer each time, and holds back a token that ends
    inside a character until the rest of its bytes arrive (byte-level vocabularies split emoji and CJK).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._window = self._read = 0  # [window, read) was shown; [read, ...) is new

    def add(self, token: int | None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        decode = self.tokenizer.decode
        shown = decode(self.ids[self._window:self._read], skip_special_tokens=True)
        text = decode(self.ids[self._window:], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        self._window, self._read = self._read, len(self.ids)
        # The window starts one piece back, so a token decodes next to its left neighbour (spacing rules).
        return text[len(shown):] if text.startswith(shown) else text


class Guard:
    """Sampling and bookkeeping of the quality guard (see `Generation._check`)."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self.checked = self.fell_back = self.agreed = 0
        self.kls: list[float] = []

    def sample(self) -> bool:
        if self.config.fraction <= 0.0:
            return False
        with self._lock:
            return self._random.random() < self.config.fraction

    def record(self, kl: float, agree: bool, fell_back: bool) -> None:
        with self._lock:
            self.checked += 1
            self.agreed += int(agree)
            self.fell_back += int(fell_back)
            self.kls.append(kl)

    def summary(self) -> dict:
        with self._lock:
            return {"fraction": self.config.fraction, "max_kl": self.config.max_kl, "checked": self.checked,
                    "fell_back": self.fell_back,
                    "mean_kl": statistics.fmean(self.kls) if self.kls else 0.0,
                    "agreement": self.agreed / self.checked if self.checked else 0.0}
