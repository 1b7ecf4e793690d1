"""The model worker shares its turns between tenants, not requests (issue 19, item 2)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from services.serving.scheduler import ModelWorker


class Turns:
    """Jobs that each want `turns` turns and write their tenant to a shared log at each one; a job may hold
    the model thread in its first turn until `gate` is set, so the rest are queued before any other starts."""

    def __init__(self):
        self.log: list[str] = []
        self.done = threading.Semaphore(0)

    def job(self, tenant: str, turns: int, gate: threading.Event | None = None,
            reached: threading.Event | None = None):
        log, done = self.log, self.done
        left = [turns]

        def turn() -> bool:
            log.append(tenant)
            left[0] -= 1
            if left[0] == 0:
                done.release()
            return left[0] > 0

        def start() -> bool:
            if reached is not None:
                reached.set()
            if gate is not None:
                gate.wait(10)
            return turn()

        return SimpleNamespace(request=SimpleNamespace(tenant=tenant), start=start, step=turn,
                               cancelled=lambda: False, fail=lambda error: done.release())


def _run(jobs_of, max_active: int) -> list[str]:
    worker, turns, gate = ModelWorker(max_waiting=32, max_active=max_active), Turns(), threading.Event()
    try:
        worker.submit(turns.job("server", 1, gate))
        jobs = jobs_of(turns)
        for job in jobs:
            worker.submit(job)
        gate.set()
        for _ in range(len(jobs) + 1):
            assert turns.done.acquire(timeout=10)
    finally:
        worker.close()
    return turns.log[1:]


def test_a_tenant_with_one_request_gets_every_other_turn_beside_one_with_four():
    """Tenant a queues four 3-turn requests, then tenant b one: b's three turns are the 2nd, 4th and 6th, not
    behind a's four (per request round robin would give b the 5th, 10th and 15th)."""
    log = _run(lambda turns: [turns.job("a", 3) for _ in range(4)] + [turns.job("b", 3)], max_active=8)
    assert log[:6] == ["a", "b", "a", "b", "a", "b"]
    assert log.count("a") == 12 and log.count("b") == 3  # nothing starved, nothing lost


def test_a_free_active_place_goes_to_the_tenant_that_waited_not_the_oldest_request():
    """Both active places held by tenant a's 4-turn requests, three more of a's queued before b's one: the
    place a's first request frees (after 7 turns) goes to b, not to a's next queued request."""
    worker, turns = ModelWorker(max_waiting=32, max_active=2), Turns()
    second_started, go_on = threading.Event(), threading.Event()
    jobs = [turns.job("a", 4), turns.job("a", 4, gate=go_on, reached=second_started)]
    jobs += [turns.job("a", 2) for _ in range(3)]
    try:
        for job in jobs:
            worker.submit(job)
        assert second_started.wait(10)  # both places are a's now
        worker.submit(turns.job("b", 2))
        go_on.set()
        for _ in range(len(jobs) + 1):
            assert turns.done.acquire(timeout=10)
    finally:
        worker.close()
    assert turns.log[:8] == ["a"] * 7 + ["b"]
    assert turns.log.count("a") == 14 and turns.log.count("b") == 2
