"""Fixtures for the end-to-end service tests: a tiny model and `kvblend serve` subprocesses.

Each server is a real process on a free port; tests talk real gRPC to it. The plain server (auth off,
CPU + Redis tiers under a key prefix of its own on the shared test Redis) is shared by the end-to-end
and fuzz modules; other modules start their own with the configuration they test.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from tests.helpers.kv import REDIS_URL
from tests.helpers.service import ServerProcess, delete_redis_prefix, make_tiny_model


@pytest.fixture(scope="session")
def service_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-smollm2-shape"))


def _require_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as err:
        pytest.fail(f"the test Redis at {REDIS_URL} does not answer ({err}); start redis-server on port 6379")
    finally:
        client.close()


@pytest.fixture(scope="session")
def plain_server(service_model_dir, tmp_path_factory):
    """Auth off; tiers: CPU (admit on second use) over Redis, so a chunk's first use is a Redis hit."""
    _require_redis()
    prefix = f"kvblend-svc-test-{uuid.uuid4().hex}:"
    server = ServerProcess(tmp_path_factory.mktemp("plain-server"), service_model_dir, {
        "server": {"chunk_tokens": 128, "max_new_tokens": 1000, "default_max_new_tokens": 8,
                   "max_documents": 8, "max_document_chars": 20000, "max_waiting": 64},
        "store": {"disk_path": "", "redis_url": REDIS_URL, "redis_prefix": prefix},
    })
    server.redis_prefix = prefix
    yield server
    code = server.stop()
    delete_redis_prefix(prefix)
    assert code == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    """A ready client of the module's own `server` fixture."""
    with server.client() as client:
        client.wait_ready(30)
        yield client
