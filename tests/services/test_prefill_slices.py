"""A long prefill is run a slice per turn on the model thread (chunked prefill): another tenant's short
request is not held behind it, and a request whose deadline passes mid-prefill is abandoned between
slices instead of holding the model (SmolLM2 on this CPU: a 3,000-token prompt takes several seconds)."""

from __future__ import annotations

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
    long_query = " ".join(f"word{i % 50} is item {i}." for i in range(600))  # ~3,000 tokens
    started = time.perf_counter()
    long = engine.generate("alice", GenerateParams(query=long_query, mode="full", max_new_tokens=4), timeout_s=2.0)
    time.sleep(0.3)  # the long prefill is under way
    short = list(engine.generate("bob", GenerateParams(query="Say hi.", mode="full", max_new_tokens=1)))
    short_done = time.perf_counter() - started
    report = short[0].report
    with pytest.raises(DeadlineExceeded):
        list(long)
    abandoned = time.perf_counter() - started
    assert report.queue_s < 1.0, f"the short request waited {report.queue_s:.2f} s for the model"
    assert short_done < 3.0, f"the short answer took {short_done:.2f} s behind the long prefill"
    # The expired request gave the model back between slices, well before its prefill could finish.
    assert abandoned < 4.0, f"the expired request held the model until {abandoned:.2f} s"
    after = list(engine.generate("carol", GenerateParams(query="Say hi.", mode="full", max_new_tokens=1)))
    assert after[0].report.queue_s < 1.0
