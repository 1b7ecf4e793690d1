"""The model's one thread: a bounded queue of requests in front of it, and token-level interleaving.

Only this thread runs the model (and its tokenizer), so the per-layer step never sees two callers.
Up to `max_active` generations are in flight: the worker starts (prefills) a waiting one as soon as
there is room, and otherwise runs one decode step of the next active one in turn, so a long answer
never holds a short one's first token hostage. A cancelled job is dropped at its next turn: between
tokens, never mid-step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
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


class _Call:
    """A plain function run once on the model thread (e.g. one chunk's KV at ingest)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
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
        return self.future.cancelled()

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class ModelWorker:
    def __init__(self, max_waiting: int, max_active: int, name: str = "model"):
        self.max_waiting = max_waiting
        self.max_active = max_active
        self._waiting: deque[Job] = deque()
        self._active: deque[Job] = deque()
        self._running = 0  # the job taking its turn now is in neither queue, but is active
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
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(f"the request queue is full ({len(self._waiting)} waiting, "
                                 f"{len(self._active)} generating); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def call(self, fn: Callable[[], object], timeout: float | None = None):
        """Run `fn` on the model thread and return its result. Waits for room in the queue rather
        than failing: callers are jobs (ingestion) that would rather be slow than fail half-way.
        TimeoutError after `timeout` seconds (the call is then withdrawn if it has not started)."""
        call = _Call(fn)
        deadline = time.monotonic() + timeout if timeout is not None else None
        with self._cond:
            while len(self._waiting) >= self.max_waiting and not self._closed:
                left = deadline - time.monotonic() if deadline is not None else None
                if left is not None and (left <= 0 or not self._cond.wait(left)):
                    raise TimeoutError("the request queue stayed full")
                if left is None:
                    self._cond.wait()
            if self._closed:
                raise Unavailable("the server is shutting down and takes no new work")
            self._waiting.append(call)
            self._cond.notify_all()
        try:
            return call.future.result(deadline - time.monotonic() if deadline is not None else None)
        except TimeoutError:
            call.future.cancel()
            raise

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
                        job.fail(Cancelled())
                if self._waiting and len(self._active) < self.max_active:
                    self._running = 1
                    return self._waiting.popleft(), True
                if self._active:
                    self._running = 1
                    return self._active.popleft(), False
                if self._closed:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                picked = self._next()
                if picked is None:
                    return
                job, new = picked
                try:
                    more = job.start() if new else job.step()
                except Exception as err:  # noqa: BLE001 - one request's failure must not stop the worker
                    if not isinstance(err, ServiceError):
                        log.exception("request failed on the model thread")
                    job.fail(err)
                    more = False
                with self._cond:
                    if more and self._aborted is None:
                        self._active.append(job)
                    self._running = 0
                    self._cond.notify_all()  # room in the queue for a waiting `call`
                if more and self._aborted is not None:
                    job.fail(self._aborted)
