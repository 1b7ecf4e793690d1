"""The model worker bounds the active requests' KV buffers (issue 18): a request whose buffer does not
fit beside the active ones waits in the queue, first come first served, and one alone always runs."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from services.serving.scheduler import ModelWorker


def _job(name: str, size: int, turns: int, log: list, done: threading.Semaphore,
         gate: threading.Event | None = None):
    left = [turns]

    def turn() -> bool:
        log.append(name)
        left[0] -= 1
        if left[0] == 0:
            done.release()
        return left[0] > 0

    def start() -> bool:
        if gate is not None:
            gate.wait(10)
        return turn()

    return SimpleNamespace(request=SimpleNamespace(tenant="t"), start=start, step=turn, kv_bytes=lambda: size,
                           cancelled=lambda: False, fail=lambda error: done.release())


def _run(sizes: dict[str, tuple[int, int]], max_kv_bytes: int) -> tuple[list[str], tuple[int, int], list[tuple[int, int]]]:
    """Submit jobs (name -> (KV bytes, turns)) behind a held first turn; the turn log and, at each turn,
    the worker's (bytes held, jobs waiting for room) at the end, and the (bytes held, jobs waiting for room) at each later turn."""
    log, done, gate = [], threading.Semaphore(0), threading.Event()
    worker = ModelWorker(max_waiting=32, max_active=8, max_kv_bytes=max_kv_bytes)
    seen = []
    try:
        worker.submit(_job("hold", 0, 1, log, done, gate))
        for name, (size, turns) in sizes.items():
            job = _job(name, size, turns, log, done)
            step = job.step
            job.step = lambda step=step: (seen.append(worker.kv_bytes()), step())[1]
            worker.submit(job)
        gate.set()
        for _ in range(len(sizes) + 1):
            assert done.acquire(timeout=10)
        after = worker.kv_bytes()
    finally:
        worker.close()
    return log[1:], after, seen


def test_a_request_that_does_not_fit_waits_until_the_active_ones_end():
    log, after, seen = _run({"a": (60, 3), "b": (60, 3)}, max_kv_bytes=100)
    assert log == ["a", "a", "a", "b", "b", "b"]  # b never active beside a: 120 bytes > 100
    assert seen and all(held <= 100 for held, _ in seen)
    assert (60, 1) in seen  # while a ran, b was reported waiting for KV room
    assert after == (0, 0)  # every buffer released at the end


def test_without_a_bound_they_interleave_and_a_request_alone_always_runs():
    log, _, _ = _run({"a": (60, 3), "b": (60, 3)}, max_kv_bytes=0)
    assert log[:2] == ["a", "b"]
    log, _, _ = _run({"big": (500, 2)}, max_kv_bytes=100)  # bigger than the bound, but nothing else runs
    assert log == ["big", "big"]


def test_a_large_waiting_request_is_not_overtaken_by_smaller_ones_behind_it():
    log, _, _ = _run({"a": (60, 3), "big": (90, 2), "small": (10, 2)}, max_kv_bytes=100)
    # small (10) would fit beside a (60), but big came first and does not: small waits behind it.
    assert log.index("small") > log.index("big")
    assert log[:3] == ["a", "a", "a"]


def test_a_turn_that_runs_out_of_device_memory_fails_its_requests_as_overloaded_and_the_worker_goes_on():
    from services.serving.errors import Overloaded

    failures, done = [], threading.Semaphore(0)

    def oom() -> bool:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    starved = SimpleNamespace(request=SimpleNamespace(tenant="t"), start=oom, step=oom, kv_bytes=lambda: 0,
                              cancelled=lambda: False, fail=lambda error: (failures.append(error), done.release()))
    log: list = []
    worker = ModelWorker(max_waiting=4, max_active=2)
    try:
        worker.submit(starved)
        worker.submit(_job("next", 0, 2, log, done))
        assert done.acquire(timeout=10) and done.acquire(timeout=10)
    finally:
        worker.close()
    assert len(failures) == 1 and isinstance(failures[0], Overloaded) and "out of memory" in str(failures[0])
    assert log == ["next", "next"]  # the next request ran to its end
