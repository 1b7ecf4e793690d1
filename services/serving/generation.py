"""One Generate request on the model thread: the loading plan, prefill in its mode from the store's
KV, the quality guard's check, then decoding (greedy, or sampled as the request asks), one token per turn, each sent to the caller as
a `Piece`.

The caller (the gRPC handler) iterates the `Generation`; the model worker (services/serving/scheduler.py)
calls `start` once (prefill and the first token) and `step` for each later token, and drops the job
between tokens once `cancel()` was called or its deadline passed. A `Generation` receives what it
uses (the model's step and tokenizer, the precompute, the store, the estimates, the counters), never
the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from blend.decode import Decoding, advance, settle
from blend.fusor import BlendConfig, cached_chunks, prefill_layers
from blend.prompt import DEFAULT_SYSTEM, build_chat_layout, build_layout
from blend.quality import kl_divergence
from services.precompute import Precompute
from services.serving.errors import Cancelled, DeadlineExceeded, InvalidArgument
from services.serving.guard import Guard
from services.serving.loading import LoadEstimates
from services.serving.metrics import Metrics
from services.serving.requests import (DocumentReport, Finish, GenerationRequest, Piece, PlanReport, QualityCheck,
                                       Report)
from store.chunks import ChunkStore
from store.source import StoreSource


@dataclass(frozen=True)
class ModelParts:
    """What a generation needs of the served model; all of it belongs to the model thread."""

    precompute: Precompute  # the step, the system prefix, chunk keys and chunk K/V
    tokenizer: object
    stop_ids: frozenset[int]
    decode_graphs: bool = False  # a request decoding alone replays its step as a CUDA graph (CUDA only)


_DONE = object()
# A prefill gives the model back to other requests after about this long (it resumes next turn).
PREFILL_SLICE_S = 0.25


def _timed(layers):
    """Run a `prefill_layers` generator, yielding between layers; returns (its Prefill, the seconds
    spent in it, the GPU's work included), not counting time spent on other requests between slices."""
    busy, began = 0.0, time.perf_counter()
    while True:
        try:
            next(layers)
        except StopIteration as done:
            filled = done.value
            settle(filled.logits)  # the first token waits for the GPU: time its work too (GIL released)
            return filled, busy + time.perf_counter() - began
        busy += time.perf_counter() - began
        yield
        began = time.perf_counter()


class Generation:
    """A Generate request: prefilled and decoded on the model thread, read as an iterator of `Piece`s
    by the caller. `cancel()` (the RPC went away) makes the model thread drop it before its next token."""

    def __init__(self, request: GenerationRequest, model: ModelParts, store: ChunkStore, estimates: LoadEstimates,
                 metrics: Metrics, guard: Guard, degraded_tiers: list[str],
                 pull: Callable[[list[str]], None] | None = None):
        self.request = request
        self.pull = pull  # chunk keys to copy into the CPU tier in the background (the warm-up's offer)
        self.model = model
        self.store = store
        self.estimates = estimates
        self.metrics = metrics
        self.guard = guard
        config = request.config
        self.queued = request.arrived  # set again when it enters the queue
        self.report = Report(mode=config.mode, ratio=config.ratio if config.mode == "blend" else 0.0,
                             chunk_ids=list(request.chunk_ids), scores=list(request.scores),
                             retrieve_s=request.retrieve_s, degraded_tiers=list(degraded_tiers))
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._expired = False
        self._decoding: Decoding | None = None  # after the prefill: the cache, its length, the next logits
        self._pending: int | None = None  # the token just sent, whose forward the next turn runs
        self._ids: list[int] = []
        self._text = TextStream(model.tokenizer)
        self._stops = StopStrings(request.stop)
        self._limit = request.max_new_tokens
        self._clamped = False
        self._filling = None  # the prefill in progress (a generator over layers), between turns
        self._layout = None  # the prompt, once built

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
        deadline = self.request.deadline
        if deadline is not None and time.monotonic() > deadline and not self._cancelled.is_set():
            self._expired = True
            self._cancelled.set()
        return self._cancelled.is_set()

    def fail(self, error: BaseException) -> None:
        if self._expired and isinstance(error, Cancelled):
            error = DeadlineExceeded("the call's deadline passed before the answer was complete")
        if self._filling is not None:  # dropped mid-prefill: close its source (finally blocks run)
            self._filling.close()
            self._filling = None
        self._decoding = None  # its KV buffer goes back now
        cancelled = isinstance(error, Cancelled)
        self.metrics.ended(cancelled=cancelled, failed=not cancelled)
        self._events.put(error)
        self._events.put(_DONE)

    def _prompt(self):
        """The prompt's layout, built once (on the model thread, which owns the tokenizer)."""
        if self._layout is None:
            if self.request.messages:
                try:
                    self._layout = build_chat_layout(self.model.tokenizer, self.request.texts,
                                                     list(self.request.messages), DEFAULT_SYSTEM)
                except ValueError as err:
                    raise InvalidArgument(str(err)) from None
            else:
                self._layout = build_layout(self.model.tokenizer, self.request.texts, self.request.query,
                                            DEFAULT_SYSTEM)
        return self._layout

    def kv_bytes(self) -> int:
        """The KV buffer this request holds while active: prompt plus answer, every layer (the worker's
        admission bound). 0 when the prompt cannot be built: `start` then reports the error."""
        try:
            n = len(self._prompt())
        except Exception:  # noqa: BLE001 - asked under the worker's lock; start() raises it to the caller
            return 0
        step = self.model.precompute.step
        tokens = n + self._limit if not step.max_positions else min(n + self._limit, step.max_positions)
        return step.cache_tokens(tokens) * step.kv_bytes_per_token

    def start(self) -> bool:
        precompute, step = self.model.precompute, self.model.precompute.step
        started = time.perf_counter()
        self.report.queue_s = started - self.queued
        layout = self._prompt()
        if layout.prefix != precompute.prefix_ids:
            raise RuntimeError("the prompt's system prefix is not the one the engine computed")
        n = len(layout)
        chunk_tokens = sum(map(len, layout.chunks))
        limit = step.max_positions
        if limit and n >= limit:
            raise InvalidArgument(
                f"the prompt is {n} tokens (system {len(layout.prefix)}, {len(layout.chunks)} chunks "
                f"{chunk_tokens}, question {len(layout.suffix)}), over the model's context of {limit} "
                "tokens; use fewer chunks or a shorter question")
        if limit and n + self._limit > limit:
            self._limit, self._clamped = limit - n, True
        self.report.prompt_tokens, self.report.chunk_tokens = n, chunk_tokens
        self._filling = self._fill(layout, n + self._limit)
        return self._advance()

    @property
    def decoding(self) -> bool:
        """Its next turn is one decode step, which the worker may batch with other requests' (`decode_together`)."""
        return self._filling is None and self._pending is not None

    def step(self) -> bool:
        if self._filling is not None:
            return self._advance()
        return decode_together([self])[0]

    def _fill(self, layout, capacity: int):
        """The whole prefill phase as a generator over layers: the worker runs it a slice per turn."""
        filled = yield from self._prefill(layout, capacity)
        if self.request.config.mode == "blend" and self.guard.sample():
            filled = yield from self._check(layout, filled, capacity)
        return filled

    def _advance(self) -> bool:
        """Run the prefill for up to one slice of the model's time, then give the turn back (chunked
        prefill: a long prompt never holds the model from other requests, and a cancelled or expired
        request is dropped between slices); the first token once the prefill is done."""
        until = time.perf_counter() + PREFILL_SLICE_S
        while True:
            try:
                next(self._filling)
            except StopIteration as done:
                filled = done.value
                break
            if time.perf_counter() >= until:
                return True
        self._filling = None
        self._decoding = Decoding(filled.cache, filled.length, filled.logits, self.request.sampling.chooser(),
                                  use_graph=self.model.decode_graphs)
        return self._emit(first=True)

    def _prefill(self, layout, capacity: int):
        precompute = self.model.precompute
        step, config, report = precompute.step, self.request.config, self.report
        if config.mode == "full":
            filled = yield from self._full(layout, capacity)
            self._report_sources(layout, ["prefill"] * len(layout.chunks))
            return filled
        chunks = layout.chunks[: cached_chunks(config.mode, len(layout.chunks))]
        keys = [precompute.key(ids, self.request.tenant) for ids in chunks]
        missing_s = [0.0]

        def compute(index: int):
            began = time.perf_counter()
            chunk = precompute.compute(layout.chunks[index - 1])  # segment 0 is the system prefix
            missing_s[0] += time.perf_counter() - began
            return chunk

        began = time.perf_counter()
        source = StoreSource(self.store, [precompute.prefix, *keys], compute, device=step.device,
                             expected=[None, *chunks])
        try:
            skip, config = self._plan(source, config, chunks)
            if chunks and len(skip) == len(chunks):
                # Nothing is worth loading. Blend at ratio 1 would still place the prefix and rank every
                # token at the check layer: full prefill is the same answer without either.
                source.close()
                report.ratio, report.tokens_recomputed = 1.0, sum(len(ids) for ids in chunks)
                filled = yield from self._full(layout, capacity)
                self._report_sources(layout, ["recomputed"] * len(layout.chunks))
                return filled
            source.begin(skip=[1 + index for index in skip])
            build_s = time.perf_counter() - began
            filled, prefill_s = yield from _timed(prefill_layers(step, layout, config, source, capacity,
                                                                 recompute=skip))
        finally:
            source.close()
        stats = source.finish()
        self.estimates.observe_loads(stats)
        computed = stats.computed
        sources = ["prefill"] * len(layout.chunks)
        for index, tier in enumerate(stats.tiers[1:], start=1):
            if index in computed:
                sources[index - 1] = "computed"
            elif index - 1 in skip:
                sources[index - 1] = "recomputed"
            else:
                sources[index - 1] = tier
                report.chunks_hit[tier] = report.chunks_hit.get(tier, 0) + 1
        self._report_sources(layout, sources)
        report.chunks_missing = len(computed)
        report.missing_tokens = sum(len(layout.chunks[i - 1]) for i in computed)
        report.missing_compute_s = missing_s[0]
        report.load_s = sum(stats.read_s.values()) + stats.copy_s
        report.load_stall_s, report.stalled_layers = stats.stall_s, stats.stalled_layers
        report.load_wait_s = max(0.0, build_s - missing_s[0]) + stats.host_wait_s + stats.stall_s
        report.compute_s = max(0.0, prefill_s - stats.host_wait_s - stats.stall_s)
        if config.mode == "blend":
            report.ratio = config.ratio
            report.tokens_recomputed = filled.recomputed
            if not computed and not skip:  # a plain blend (no chunk prefilled in full): its recompute cost
                self.estimates.observe_blend((filled.recomputed + len(layout.suffix)) * step.n_layers,
                                             report.compute_s)
        return filled

    def _full(self, layout, capacity: int):
        step = self.model.precompute.step
        filled, self.report.compute_s = yield from _timed(prefill_layers(step, layout, BlendConfig("full"), None,
                                                                         capacity))
        self.estimates.observe_prefill(len(layout) * step.n_layers, self.report.compute_s)
        return filled

    def _report_sources(self, layout, sources: list[str]) -> None:
        report, reused = self.report, ("prefill", "computed", "recomputed")
        report.chunk_sources = sources
        report.cached_tokens = len(layout.prefix) if self.request.config.mode != "full" else 0
        report.cached_tokens += sum(len(ids) for ids, source in zip(layout.chunks, sources, strict=True)
                                    if source not in reused)
        report.documents = [
            DocumentReport(chunk_ids=tuple(self.request.chunk_ids[i] for i in indexes),
                           hit=all(sources[i] not in reused for i in indexes),
                           chunks_computed=sum(sources[i] == "computed" for i in indexes))
            for indexes in self.request.documents]

    def _plan(self, source: StoreSource, config: BlendConfig, chunks) -> tuple[list[int], BlendConfig]:
        """The loading controller's choice for a blend request: chunks to prefill in full instead of
        loading, and the ratio (never below the request's)."""
        if config.mode != "blend":
            return [], config
        step = self.model.precompute.step
        plan = self.estimates.plan(source.stats.tiers[1:], [len(ids) for ids in chunks], step.kv_bytes_per_token,
                                   config.ratio, step.device.type == "cuda")
        if plan is None:
            self.report.plan = PlanReport(reason="controller off" if not self.estimates.enabled
                                          else "no prefill measured yet")
            return [], config
        # A chunk computed on its own for this request is already in memory: load it, never recompute.
        skip = [index for index in plan.recompute_chunks if 1 + index not in source.stats.computed]
        if skip and self.pull is not None:
            # Recomputed because its tier loads too slowly: pulled into the CPU tier in the background,
            # so the next request that needs it loads it instead.
            self.pull([source.segments[1 + index] for index in skip if isinstance(source.segments[1 + index], str)])
        self.report.plan = PlanReport(planned=True, ratio=plan.ratio,
                                      recompute_chunk_ids=tuple(self.request.chunk_ids[i] for i in skip
                                                                if i < len(self.request.chunk_ids)),
                                      predicted_load_s=plan.load_s, predicted_compute_s=plan.recompute_s,
                                      reason=plan.reason)
        return skip, replace(config, ratio=plan.ratio)

    def _check(self, layout, blended, capacity: int):
        """The quality guard: full prefill's first token against blend's; the full answer if too far."""
        step = self.model.precompute.step
        full, seconds = yield from _timed(prefill_layers(step, layout, BlendConfig(mode="full"), None, capacity))
        kl = kl_divergence(full.logits, blended.logits)
        self.estimates.observe_prefill(len(layout) * step.n_layers, seconds)
        agree = int(full.logits.argmax()) == int(blended.logits.argmax())
        fell_back = not kl <= self.guard.config.max_kl
        self.report.quality = QualityCheck(checked=True, kl=kl, agree=agree, fell_back=fell_back)
        self.guard.record(kl, agree, fell_back)
        return full if fell_back else blended

    def _steps(self) -> bool:
        """Does its turn run a step: unless the tokens already made (sent or not) reach its limit, or its
        KV buffer is full."""
        decoding = self._decoding
        return not decoding.full and len(self._ids) + len(decoding.unread) < self._limit

    def _newest(self) -> int | None:
        """The token its next step is fed: the newest one made (None: on the device, not read), else the one
        just sent."""
        decoding = self._decoding
        if decoding.on_device:
            return None
        return decoding.unread[-1].value() if decoding.unread else self._pending

    def _goes_ahead(self) -> bool:
        """After its step: is its new token on the device, with none older unread (its first step ahead),
        and room for the step that token feeds?"""
        decoding = self._decoding
        return (decoding.on_device and len(decoding.unread) == 1 and not decoding.full
                and len(self._ids) + 1 < self._limit)

    def _emit(self, first: bool) -> bool:
        """Produce the next token as one message; the last message also carries the finish. True while
        more may follow. Never asks for a token past the limit: its forward would be wasted."""
        token = self._decoding.token()
        if token in self.model.stop_ids:
            token = None
        now = time.perf_counter()
        if token is not None:
            self._ids.append(token)
            self.metrics.token()
        # No room for this token's K/V (the context's end), unless a step already took it (one step ahead).
        full = token is not None and not self._decoding.unread and self._decoding.full
        done = token is None or len(self._ids) >= self._limit or full
        text, stopped = self._stops.add(self._text.add(token, final=done), final=done)
        done = done or stopped
        self._pending = None if done else token
        finish = None
        if done:
            reason = "stop" if token is None or stopped else ("context" if self._clamped or full else "length")
            finish = Finish(reason=reason, tokens=len(self._ids), seconds=now - self.request.arrived)
        ttft = now - self.request.arrived if first else None
        if first:
            self.metrics.first_token(ttft)
        ids = (token,) if token is not None else ()
        self._events.put(Piece(text=text, token_ids=ids, ttft_s=ttft,
                               report=self.report if first else None, finish=finish))
        if done:
            self._decoding = None  # its KV buffer goes back now (a KV pool range), not when the call ends
            self.metrics.ended()
            self._events.put(_DONE)
        return not done


def decode_together(jobs: list[Generation]) -> list[bool]:
    """One decode step for several generations at once (each `decoding`): each one's newest token goes
    through the model in one batched step, each against its own cache, then each sends its next token.
    A generation's tokens are the ones it gets alone (tested). True per job while more may follow.

    One step ahead where the decode graphs run it (greedy): a step is fed the token the one before made
    while that token is still on the device, so the GPU computes it while the host reads and sends the
    token; a job starts so with two steps in its first turn. A job ending on a stop token leaves one
    step computed for nothing; one ending at its token limit or the context's end never does."""
    if not jobs:
        return []
    step, began = jobs[0].model.precompute.step, time.perf_counter()
    stepping = [job for job in jobs if job._steps()]
    if stepping:
        advance(step, [job._decoding for job in stepping], [job._newest() for job in stepping])
        ahead = [job for job in stepping if job._goes_ahead()]
        if ahead:
            advance(step, [job._decoding for job in ahead], [None] * len(ahead))
    mores = [job._emit(first=False) for job in jobs]
    jobs[0].metrics.decoded(len(jobs), time.perf_counter() - began)
    return mores


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


class StopStrings:
    """Text in, the text that may be shown out: the answer ends before the first stop string. Text that
    could be the start of a stop string is held back until the next piece says whether it is one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def add(self, text: str, final: bool) -> tuple[str, bool]:
        """(the text to show now, whether a stop string ended the answer)."""
        if not self.stops:
            return text, False
        held = self._held + text
        ends = [at for at in (held.find(stop) for stop in self.stops) if at >= 0]
        if ends:
            self._held = ""
            return held[:min(ends)], True
        if final:
            self._held = ""
            return held, False
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if held.endswith(stop[:n])), default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep], False
