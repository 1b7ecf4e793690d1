"""Helpers for the store tests: tiny chunks and blocks, a Redis server of the test's own."""

from __future__ import annotations


import redis
import torch

from blend.cache import ChunkKV
from services.bench.launch import RedisProcess

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


class RedisServer(RedisProcess):
    """A redis-server of the test's own on a free port, without persistence, to stop and restart."""

    def __init__(self, *extra_args: str):
        super().__init__(None, *extra_args)


def computing(chunks):
    """A compute-on-miss callback serving `chunks`, and the list of indices it was called with."""
    calls = []

    def compute(index):
        calls.append(index)
        return chunks[index]

    return compute, calls


def stored_prompt(step, seed: int, chunk_lengths: tuple[int, ...]):
    """A random prompt in a tiny model's vocabulary, its segments' K/V (system prefix first, each chunk
    computed behind it) and their content addresses: what a store holds for that prompt."""
    from blend.fusor import compute_kv
    from blend.prompt import PromptLayout
    from store.keys import chunk_key

    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(0, 128, (n,), generator=generator).tolist())  # noqa: E731
    layout = PromptLayout(prefix=ids(6), chunks=tuple(ids(n) for n in chunk_lengths), suffix=ids(5))
    with torch.inference_mode():
        prefix = compute_kv(step, layout.prefix)
        chunks = [compute_kv(step, chunk, behind=prefix) for chunk in layout.chunks]
    dtype = prefix.kv.dtype
    keys = [chunk_key("tiny", (), layout.prefix, dtype)]
    keys += [chunk_key("tiny", layout.prefix, chunk, dtype) for chunk in layout.chunks]
    return layout, [prefix, *chunks], keys
