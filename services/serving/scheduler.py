"""The model's one thread: a bounded queue of requests in front of it, and token-level interleaving.

Only this thread runs the model (and its tokenizer), so the per-layer step never sees two callers.
Up to `max_active` generations are in flight: the worker starts (prefills) a waiting one as soon as
there is room, and otherwise runs one decode step of the next active one in turn, so a long answer
never holds a short one's first token hostage. A cancelled job is dropped at its next turn: between
tokens, never mid-step.

Turns are shared between tenants, not requests: each turn goes to the tenant whose last turn is the
oldest (one that never had one first), and within that tenant to its next job (a waiting one when there
is room, else its next active one). A tenant with ten requests in flight gets the same share of the
model's turns as one with a single request, and a free active place goes to the tenant that waited
longest for a turn, not to the oldest request.

Decode steps are batched: when the turn goes to a job whose next turn is one decode step (`decoding`),
every other active job in the same state takes that step with it, in one call of the `batch` function
(one forward over all their new tokens), so N answers in flight cost about one step's weight reads, not
N. Prefill turns still come between decode steps, so a long answer never holds a new request's first
token. Without a `batch` function each job takes its own decode turn.

Active requests' KV buffers are bounded too (`max_kv_bytes`, 0 = no bound beyond `max_active`): a waiting
job is started only when its buffer (`kv_bytes()`) fits beside the active ones', first come first served
(a job that does not fit holds back the ones behind it, so a large one is never starved by small ones),
except that a job is always started when nothing else is active. Until then it waits in the queue, and a
full queue is `RESOURCE_EXHAUSTED` as always: the server does not run out of device memory under load.

Ingest is bounded like generation, so it can never hold every RPC thread: a caller takes one of a fixed
number of places (`ingest_place`) before its first `call`, and is refused at once (Overloaded) when all
are held or the queue is full; a caller holding a place queues one call at a time, outside the
`max_waiting` places, so ingest never crowds out generation.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Protocol

import torch

from services.serving.errors import Cancelled, Overloaded, ServiceError, Unavailable

log = logging.getLogger(__name__)


class Job(Protocol):
    def start(self) -> bool:
        """First turn (e.g. prefill and the first token); True if it wants more turns."""
        ...

    def step(self) -> bool:
        """A later turn (one decode step); True if it wants more turns."""
        ...

    def cancelled(self) -> bool: ...

    def fail(self, error: BaseException) -> None:
        """The job raised in a turn, or was dropped (cancelled, or the worker stopped)."""
        ...


def tenant_of(job: Job) -> str:
    """Whom a job works for: a generation's request's tenant, a call's own; "" for the server's own work."""
    request = getattr(job, "request", None)
    return getattr(request, "tenant", None) or getattr(job, "tenant", "")


class _Call:
    """A plain function run once on the model thread (e.g. one chunk's KV at ingest)."""

    def __init__(self, fn: Callable[[], object], withdrawn: Callable[[], bool] | None = None, tenant: str = ""):
        self.fn = fn
        self.withdrawn = withdrawn  # the caller went away: drop the call if it has not started
        self.tenant = tenant
        self.future: Future = Future()

    def start(self) -> bool:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                self.future.set_exception(err)
        return False

    def step(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return self.future.cancelled() or (self.withdrawn is not None and self.withdrawn())

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _kv_bytes(job: Job) -> int:
    """The KV buffer a job will hold while active (0 for plain calls, which hold none between turns)."""
    size = getattr(job, "kv_bytes", None)
    return size() if size is not None else 0


class ModelWorker:
    def __init__(self, max_waiting: int, max_active: int, name: str = "model",
                 batch: Callable[[list[Job]], list[bool]] | None = None, max_kv_bytes: int = 0):
        self.max_waiting = max_waiting
        self.max_active = max_active
        self.max_kv_bytes = max_kv_bytes
        self._kv: dict[int, int] = {}  # id(job) -> KV bytes, for every started job that has not ended
        self._kv_blocked = 0  # waiting jobs that did not fit beside the started ones, at the last pick
        self.batch = batch  # one decode step for several `decoding` jobs at once; per job, True for more
        self._waiting: deque[Job] = deque()
        self._active: deque[Job] = deque()
        self._running = 0  # the job taking its turn now is in neither queue, but is active
        self._ingesting = 0  # callers holding an ingest place
        self._turn = 0  # turns taken so far
        self._last_turn: dict[str, int] = {}  # tenant -> the number of its last turn
        self._cond = threading.Condition()
        self._closed = False
        self._aborted: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; Overloaded when `max_waiting` jobs already wait, Unavailable while draining."""
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down and takes no new requests")
            if self._queued_jobs() >= self.max_waiting:
                raise Overloaded(f"the request queue is full ({self._queued_jobs()} waiting, the limit "
                                 f"server.max_waiting = {self.max_waiting}; {len(self._active)} generating); "
                                 "retry later")
            self._waiting.append(job)
            self._cond.notify()

    @contextmanager
    def ingest_place(self, limit: int) -> Iterator[None]:
        """Hold one of `limit` ingest places for a sequence of `call`s. Overloaded at once, never a wait,
        when `limit` callers hold one or the queue is full: a waiting ingest would hold an RPC thread."""
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down and takes no new work")
            if self._ingesting >= limit:
                raise Overloaded(f"{self._ingesting} ingest calls are in progress, the limit "
                                 f"(server.max_ingest_calls = {limit}); retry later")
            if self._queued_jobs() >= self.max_waiting:
                raise Overloaded(f"the request queue is full ({self._queued_jobs()} waiting, the limit "
                                 f"server.max_waiting = {self.max_waiting}); retry the ingest later")
            self._ingesting += 1
        try:
            yield
        finally:
            with self._cond:
                self._ingesting -= 1

    def call(self, fn: Callable[[], object], withdrawn: Callable[[], bool] | None = None, tenant: str = ""):
        """Run `fn` on the model thread and return its result. Its place in the queue is not one of the
        `max_waiting`: the caller holds an ingest place (or is the engine starting), so calls never take
        generation's places and at most `limit` of them wait. Cancelled, without running `fn`, when
        `withdrawn()` turns true before its turn. Its turn is `tenant`'s (turns are shared by tenant)."""
        call = _Call(fn, withdrawn, tenant)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down and takes no new work")
            self._waiting.append(call)
            self._cond.notify_all()
        return call.future.result()

    def _queued_jobs(self) -> int:
        """Waiting jobs other than calls: what `max_waiting` bounds. Under the lock."""
        return sum(not isinstance(job, _Call) for job in self._waiting)

    def kv_bytes(self) -> tuple[int, int]:
        """(KV bytes the started jobs hold, jobs that waited for KV room at the last pick). Read from any
        thread: it never sizes a job (that tokenizes its prompt, which only the model thread does)."""
        with self._cond:
            return sum(self._kv.values()), self._kv_blocked

    def depth(self) -> tuple[int, int]:
        """(waiting, active): queued jobs not started yet, and started ones (the one running included)."""
        with self._cond:
            return len(self._waiting), len(self._active) + self._running

    def close(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Take no new jobs, finish the queued and active ones; True when the worker has stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def abort_all(self, error: BaseException) -> None:
        """Drop every queued and active job (after a drain ran out of time)."""
        with self._cond:
            jobs = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
            self._kv.clear()
            self._kv_blocked = 0
            self._closed = True
            self._aborted = error  # the job taking its turn now is dropped when the turn ends
            self._cond.notify_all()
        for job in jobs:
            job.fail(error)

    # -- the thread -------------------------------------------------------------------------------

    def _next(self) -> tuple[Job, bool] | None:
        with self._cond:
            while True:
                # Drop cancelled jobs first, so they free their slot at once.
                for queue in (self._waiting, self._active):
                    for job in [j for j in queue if j.cancelled()]:
                        queue.remove(job)
                        self._kv.pop(id(job), None)
                        job.fail(Cancelled())
                picked = self._pick()
                if picked is not None:
                    self._running = 1
                    return picked
                if self._closed:
                    return None
                self._cond.wait()

    def _pick(self) -> tuple[Job, bool] | None:
        """The next turn, shared by tenant (see the module's doc), or None when no job wants one. Under the
        lock; removes the job from its queue."""
        room = len(self._active) < self.max_active
        admissible = self._admissible() if room else []
        if room:
            self._kv_blocked = len(self._waiting) - len(admissible)
        candidates = list(self._active) + admissible
        if not candidates:
            return None
        order = {}  # tenant -> position of its first job: ties go to the longest-waiting
        for position, job in enumerate(candidates):
            order.setdefault(tenant_of(job), position)
        tenant = min(order, key=lambda t: (self._last_turn.get(t, -1), order[t]))
        self._turn += 1
        self._last_turn[tenant] = self._turn
        if len(self._last_turn) > 4 * len(order) + 64:  # forget tenants with nothing queued
            self._last_turn = {t: n for t, n in self._last_turn.items() if t in order}
        if room:
            job = next((j for j in admissible if tenant_of(j) == tenant), None)
            if job is not None:
                self._waiting.remove(job)
                if self.max_kv_bytes:
                    self._kv[id(job)] = _kv_bytes(job)
                return job, True
        job = next(j for j in self._active if tenant_of(j) == tenant)
        self._active.remove(job)
        return job, False

    def _companions(self, job: Job, new: bool) -> list[Job]:
        """The active jobs that take this decode step together with `job` (removed from the queue), or
        none when the turn is not a batchable decode step. Under the lock."""
        if new or self.batch is None or not getattr(job, "decoding", False):
            return []
        others = [other for other in self._active if getattr(other, "decoding", False) and not other.cancelled()]
        for other in others:
            self._active.remove(other)
        self._running += len(others)
        return others

    def _admissible(self) -> list[Job]:
        """The waiting jobs that may start now, in queue order: all of them without a KV bound; with one,
        those before the first whose buffer does not fit beside the started jobs' (one alone always fits).
        Under the lock."""
        if not self.max_kv_bytes:
            return list(self._waiting)
        held, out = sum(self._kv.values()), []
        for job in self._waiting:
            if held and held + _kv_bytes(job) > self.max_kv_bytes:
                break
            out.append(job)
        return out

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                picked = self._next()
                if picked is None:
                    return
                job, new = picked
                with self._cond:
                    jobs = [job, *self._companions(job, new)]
                try:
                    if len(jobs) > 1:
                        mores = self.batch(jobs)
                    else:
                        mores = [job.start() if new else job.step()]
                except Exception as err:  # noqa: BLE001 - one request's failure must not stop the worker
                    if isinstance(err, torch.OutOfMemoryError):
                        # The device ran out of memory for this turn (a KV buffer outside the KV pool, a
                        # large prefill): the caller may retry later; the worker and other requests go on.
                        log.warning("request failed on the model thread: device out of memory (%s)",
                                    str(err).splitlines()[0] if str(err) else "no detail")
                        err = Overloaded("the model's device ran out of memory for this request; retry later, "
                                         "or lower server.max_active or set server.max_kv_bytes")
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                    elif not isinstance(err, ServiceError):
                        log.exception("request failed on the model thread")
                    for failed in jobs:
                        failed.fail(err)
                    mores = [False] * len(jobs)
                with self._cond:
                    for each, more in zip(jobs, mores):
                        if more and self._aborted is None:
                            self._active.append(each)
                        else:
                            self._kv.pop(id(each), None)
                    self._running = 0
                for each, more in zip(jobs, mores):
                    if more and self._aborted is not None:
                        each.fail(self._aborted)
