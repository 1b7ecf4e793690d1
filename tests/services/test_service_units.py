"""Pieces of the service tested without a server: the model worker's queue and interleaving, the
serve configuration, and the committed gRPC stubs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from proto import build as build_proto
from services.serving.errors import Overloaded, Unavailable
from services.serving.scheduler import ModelWorker
from services.settings import build


class Steps:
    """A job that takes `turns` turns, logging each on a shared list."""

    def __init__(self, name, turns, log, gate=None):
        self.name, self.left, self.log, self.gate = name, turns, log, gate
        self.failed = None
        self.cancel = threading.Event()
        self.done = threading.Event()

    def start(self):
        if self.gate is not None:
            self.gate.wait(5)
        return self.step()

    def step(self):
        self.log.append(self.name)
        self.left -= 1
        if self.left == 0:
            self.done.set()
        return self.left > 0

    def cancelled(self):
        return self.cancel.is_set()

    def fail(self, error):
        self.failed = error
        self.done.set()


def test_active_jobs_take_turns_token_by_token():
    log, gate = [], threading.Event()
    worker = ModelWorker(max_waiting=4, max_active=2)
    long, short = Steps("long", 5, log, gate), Steps("short", 2, log)
    worker.submit(long)
    worker.submit(short)
    gate.set()
    assert short.done.wait(5) and long.done.wait(5)
    assert log[:4] == ["long", "short", "long", "short"]  # the short job is not held behind the long one
    worker.close()


def test_a_full_queue_refuses_and_a_closed_worker_is_unavailable():
    gate = threading.Event()
    worker = ModelWorker(max_waiting=1, max_active=1)
    worker.submit(Steps("busy", 1, [], gate))
    time.sleep(0.1)  # the worker has taken it: the queue is empty again
    worker.submit(Steps("waiting", 1, []))
    with pytest.raises(Overloaded, match="queue is full"):
        worker.submit(Steps("one too many", 1, []))
    gate.set()
    assert worker.close(timeout=5)
    with pytest.raises(Unavailable):
        worker.submit(Steps("late", 1, []))


def test_a_cancelled_job_is_dropped_between_turns():
    log = []
    worker = ModelWorker(max_waiting=2, max_active=2)
    job = Steps("endless", 10 ** 9, log)
    worker.submit(job)
    while len(log) < 3:
        time.sleep(0.001)
    job.cancel.set()
    assert job.done.wait(5) and job.failed is not None
    taken = len(log)
    time.sleep(0.05)
    assert len(log) == taken  # no turn after the drop
    worker.close()


def test_call_runs_on_the_model_thread_and_returns_or_raises():
    worker = ModelWorker(max_waiting=2, max_active=1, name="model-x")
    assert worker.call(lambda: threading.current_thread().name) == "model-x"
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    worker.close()


def test_config_names_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'max_qeue'"):
        build({"server": {"max_qeue": 3}}, {})
    with pytest.raises(ValueError, match="default_mode 'fast'"):
        build({"server": {"default_mode": "fast"}}, {})
    # A quoted "false" is a non-empty, so true, string: a switch takes only true or false.
    with pytest.raises(ValueError, match="batch_decode must be true or false, not 'false'"):
        build({"server": {"batch_decode": "false"}}, {})
    with pytest.raises(ValueError, match="shorter than 16"):
        build({"auth": {"tokens": {"short": "alice"}}}, {})
    with pytest.raises(ValueError, match="tenant '../x'"):
        build({"auth": {"tokens": {"a-long-enough-token-123": "../x"}}}, {})
    settings = build({"server": {"port": 7000}, "store": {"disk_path": ""}},
                     {"port": 7001, "data_dir": str(tmp_path), "redis_url": "redis://127.0.0.1:6379/0"})
    assert settings.server.port == 7001  # flags win over the file
    assert settings.store.disk_path is None and settings.store.redis_url == "redis://127.0.0.1:6379/0"
    assert build({}, {"data_dir": str(tmp_path)}).store.disk_path == tmp_path / "kv"


def test_committed_stubs_match_the_proto(tmp_path):
    for generated in build_proto.build(tmp_path):
        committed = build_proto.ROOT / generated.relative_to(tmp_path)
        assert generated.read_text() == committed.read_text(), (
            f"{committed} is stale: run python -m proto.build")


def test_streamed_text_pieces_add_up_to_the_decoded_answer(service_model_dir):
    from transformers import AutoTokenizer

    from services.serving.generation import TextStream

    tokenizer = AutoTokenizer.from_pretrained(service_model_dir)
    generator = torch.Generator().manual_seed(0)
    text = "Tokyo (東京), Kyōto 🇯🇵 and sushi 🍣; café.\n\n  Two spaces"
    samples = [tokenizer(text, add_special_tokens=False)["input_ids"],
               torch.randint(0, len(tokenizer), (80,), generator=generator).tolist()]
    for ids in samples:
        stream = TextStream(tokenizer)
        pieces = [stream.add(token, final=index == len(ids) - 1) for index, token in enumerate(ids)]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])  # no half characters sent


def test_the_server_sweeps_orphaned_layers_at_start_up_and_every_orphan_idle_s_and_never_at_0():
    from types import SimpleNamespace

    from services.serving.server import OrphanSweep

    calls = []
    engine = SimpleNamespace(store=SimpleNamespace(sweep_orphans=lambda idle_s: calls.append(idle_s) or 0))
    began = time.monotonic()
    sweep = OrphanSweep(engine, 0.2)
    while len(calls) < 2 and time.monotonic() < began + 10:
        time.sleep(0.01)
    sweep.stop()
    assert calls[:2] == [0.2, 0.2] and time.monotonic() - began >= 0.2  # at once, and again after 0.2 s
    never = []
    OrphanSweep(SimpleNamespace(store=SimpleNamespace(sweep_orphans=never.append)), 0).stop()
    time.sleep(0.1)
    assert never == []
    with pytest.raises(ValueError, match="orphan_idle_s"):
        build({"server": {"orphan_idle_s": -1}}, {})


def test_a_kv_pool_size_below_minus_one_is_refused_by_name():
    with pytest.raises(ValueError, match="kv_pool_bytes -2"):
        build({"server": {"kv_pool_bytes": -2}}, {})
    assert build({"server": {"kv_pool_bytes": -1}}, {}).server.kv_pool_bytes == -1
