"""Helpers for the store tests: tiny chunks and blocks, a Redis server of the test's own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis
import torch

from blend.cache import ChunkKV

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_chunk(seed: int = 0, n_layers: int = 3, tokens: int = 5, heads: int = 2, dim: int = 4,
               dtype: torch.dtype = torch.float32, start: int = 7) -> ChunkKV:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(n_layers, tokens, 2, heads, dim, generator=generator).to(dtype)
    return ChunkKV(token_ids=tuple(range(100 + seed, 100 + seed + tokens)), start=start, kv=kv)


def block(seed: int = 0, shape=(5, 2, 2, 4), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own on a free port, without persistence, to stop and restart."""

    def __init__(self, *extra_args: str):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not on PATH (install redis-server to run the fault tests)")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.extra_args = list(extra_args)
        flags = dict(zip(extra_args[::2], extra_args[1::2]))
        self.password = flags.get("--requirepass")

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def computing(chunks):
    """A compute-on-miss callback serving `chunks`, and the list of indices it was called with."""
    calls = []

    def compute(index):
        calls.append(index)
        return chunks[index]

    return compute, calls
