"""A long prefill is run a slice per turn on the model thread (chunked prefill): another tenant's short
request is not held behind it, and a request whose deadline passes mid-prefill is abandoned between
slices instead of holding the model (SmolLM2 on this CPU: a 3,000-token prompt takes several seconds)."""

from __future__ import annotations

import threading
import time

import pytest
from tests.helpers.model import CACHE_DIR

from services.serving.engine import Engine
from services.serving.errors import DeadlineExceeded
from services.serving.requests import GenerateParams
from services.settings import build

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    settings = build({"server": {"chunk_tokens": 128, "max_active": 4}, "guard": {"fraction": 0.0}},
                     {"spec": "smollm2-135m", "cache_dir": str(CACHE_DIR), "device": "cpu",
                      "data_dir": str(tmp_path_factory.mktemp("slices-data"))})
    engine = Engine.open(settings)
    yield engine
    engine.close()


def test_a_short_request_is_not_held_behind_a_long_prefill_and_an_expired_one_is_dropped(engine):
    """Order of events, not speed: the short answer is complete before the long request has produced
    anything, and the long one, past its deadline, ends without a single token (its prefill, several
    seconds long, was abandoned between slices instead of running to its first token)."""
    long_query = " ".join(f"word{i % 50} is item {i}." for i in range(600))  # ~4,800 tokens
    long = engine.generate("alice", GenerateParams(query=long_query, mode="full", max_new_tokens=4), timeout_s=2.0)
    events: list[tuple[str, object]] = []
    reader = threading.Thread(target=_record, args=(long, events))
    reader.start()
    time.sleep(0.3)  # the long prefill is under way
    short = list(engine.generate("bob", GenerateParams(query="Say hi.", mode="full", max_new_tokens=1)))
    # The long request may already have ended past its deadline, but it produced no token first.
    pieces = [event for kind, event in events if kind == "piece"]
    assert short[-1].finish is not None and not pieces, "the short answer waited for the long request"
    reader.join(timeout=600)
    assert [kind for kind, _ in events] == ["error"] and isinstance(events[0][1], DeadlineExceeded)
    after = list(engine.generate("carol", GenerateParams(query="Say hi.", mode="full", max_new_tokens=1)))
    assert after[-1].finish is not None


def _record(generation, events: list) -> None:
    """Each piece as it arrives, then the error that ended the stream, if any."""
    try:
        for piece in generation:
            events.append(("piece", piece))
    except Exception as err:  # noqa: BLE001 - the test looks at which error ended the stream
        events.append(("error", err))
