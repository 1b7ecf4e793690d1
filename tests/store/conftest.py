"""Fixtures for the store tests: an isolated key prefix on the shared Redis, a Redis we can stop."""

from __future__ import annotations

import uuid

import pytest
import redis
from tests.helpers.kv import REDIS_URL, RedisServer, delete_prefix


@pytest.fixture
def redis_prefix():
    """A key prefix of our own on the shared test Redis, deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as err:
        pytest.fail(f"the test Redis at {REDIS_URL} does not answer ({err}); start redis-server on port 6379")
    prefix = f"kvblend-test-{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()
