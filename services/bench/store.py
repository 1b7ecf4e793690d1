"""`kvblend bench-store`: chunk-KV load throughput per store tier, and the admission replay.

A program, not a test: it prints tables of figures measured in one run and writes them as JSON.

Throughput: for each layout and tier, chunks of random K/V are written through a store holding
only that tier, then read back through a `StoreSource` exactly as the fusor reads them (one layer
of every chunk at a time, the next layer prefetched) and copied into a per-layer buffer on the
compute device. GB/s is K/V bytes delivered (before any int8 coding) over wall time.

Redis paths: the same chunks in Redis read back through `StoreSource` by the old path (one redis-py
GET per chunk and layer over one connection, decoded through `bytes`) and by the batch path (a
layer of every chunk as pipelined GETs spread over a few sockets, received in place), alternating
old and new so that both see the same machine load; the ratio of their median rates is the figure
to read on a noisy machine, and CPU seconds per GB (client process, Redis server) the one that does
not depend on the load.

Replay: a skewed stream of chunk requests against a small CPU tier over a disk tier, once with
plain LRU (admit_after=1) and once with admission on second use (admit_after=2).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blend.cache import ChunkKV
from store.chunks import ChunkStore
from store.disk_tier import DiskTier
from store.keys import chunk_key
from store.memory_tier import MemoryTier
from store.source import StoreSource
from store.tier import Tier
from store.tiered import TieredStore


@dataclass(frozen=True)
class Layout:
    name: str
    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def chunk_bytes(self, tokens: int) -> int:
        return self.n_layers * tokens * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


LAYOUTS = {
    "smollm2": Layout("SmolLM2-135M", 30, 3, 64, torch.float32),
    "8b": Layout("8B-shaped", 32, 8, 128, torch.bfloat16),
}


@dataclass(frozen=True)
class StoreBenchConfig:
    json_out: Path
    redis_url: str = "redis://127.0.0.1:6379/0"
    layouts: tuple[str, ...] = ("smollm2", "8b")
    tokens: int = 512  # per chunk
    chunks: int = 10  # per request (1 is measured too)
    repeats: int = 3  # timed loads per row
    replay_requests: int = 3000
    only: str = "all"  # or "throughput", "redis", "replay"
    redis_connections: int = 4  # sockets of the batch path
    torch_threads: int | None = None  # None: torch's default
    work_dir: Path | None = None  # where the disk tier's files go (None: system temp)

    def __post_init__(self):
        for name in self.layouts:
            if name not in LAYOUTS:
                raise ValueError(f"unknown layout {name!r} (choose from {', '.join(LAYOUTS)})")


def _chunks(layout: Layout, count: int, tokens: int) -> list[ChunkKV]:
    generator = torch.Generator().manual_seed(0)
    return [ChunkKV(token_ids=tuple(range(i * tokens, (i + 1) * tokens)), start=16,
                    kv=torch.randn(layout.n_layers, tokens, 2, layout.kv_heads, layout.head_dim,
                                   generator=generator).to(layout.dtype))
            for i in range(count)]


def _tiers(redis_url: str, workdir: Path) -> list[tuple[str, Callable[[], Tier]]]:
    """(label, factory) for each tier this machine has; Redis only if it answers."""
    from store.redis_tier import RedisTier

    tiers = []
    if torch.cuda.is_available():
        tiers.append(("gpu", lambda: MemoryTier("gpu", "cuda")))
    tiers.append(("cpu" + (" (pinned)" if torch.cuda.is_available() else ""), lambda: MemoryTier("cpu")))
    tiers.append(("disk", lambda: DiskTier(workdir / "disk")))
    tiers.append(("disk int8", lambda: DiskTier(workdir / "disk-int8", quantize=True)))
    prefix = f"kvblend-bench-{uuid.uuid4().hex}:"
    probe = RedisTier(redis_url, prefix)
    if probe.check():
        tiers.append(("redis", lambda: RedisTier(redis_url, prefix)))
        tiers.append(("redis int8", lambda: RedisTier(redis_url, prefix + "q:", quantize=True)))
    else:
        print(f"note: Redis at {probe.url} does not answer; its rows are left out", file=sys.stderr)
    return tiers


def _clear(tier: Tier) -> None:
    for key, _ in list(tier.entries()):
        tier.delete(key)


def _load_once(chunks: ChunkStore, keys: list[str], layout: Layout, tokens: int,
               device: torch.device) -> float:
    buffer = torch.empty(len(keys) * tokens, 2, layout.kv_heads, layout.head_dim, dtype=layout.dtype,
                         device=device)
    started = time.perf_counter()
    with StoreSource(chunks, keys, device=device) as source:
        for layer in range(layout.n_layers):
            for slot, block in enumerate(source.layer(layer)):
                buffer[slot * tokens : (slot + 1) * tokens].copy_(block, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def throughput(config: StoreBenchConfig, workdir: Path) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = sorted({1, config.chunks})
    rows = []
    tiers = _tiers(config.redis_url, workdir)
    for layout_name in config.layouts:
        layout = LAYOUTS[layout_name]
        data = _chunks(layout, max(counts), config.tokens)
        keys = [chunk_key("bench", [], chunk.token_ids, layout.dtype) for chunk in data]
        for label, factory in tiers:
            tier = factory()
            chunks = ChunkStore(TieredStore([tier], [None]))
            try:
                for count in counts:
                    started = time.perf_counter()
                    for key, chunk in zip(keys[:count], data[:count]):
                        if not chunks.put(key, chunk):
                            raise RuntimeError(f"tier {label} did not store chunk {key}")
                    write_s = time.perf_counter() - started
                    stored = tier.bytes_used()
                    times = [_load_once(chunks, keys[:count], layout, config.tokens, device)
                             for _ in range(config.repeats)]
                    size = layout.chunk_bytes(config.tokens) * count
                    rows.append({
                        "layout": layout.name, "tier": label, "chunks": count, "tokens": config.tokens,
                        "kv_mb": size / 1e6, "stored_mb": stored / 1e6, "write_gb_s": size / write_s / 1e9,
                        "load_ms_median": 1e3 * statistics.median(times),
                        "load_gb_s_median": size / statistics.median(times) / 1e9,
                        "load_gb_s_best": size / min(times) / 1e9,
                    })
                    _clear(tier)
            finally:
                _clear(tier)
        del data
    return rows


def _server_cpu(tier) -> float:
    info = tier.client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def redis_paths(config: StoreBenchConfig) -> list[dict]:
    """Old (redis-py GET per layer, one connection) against new (pipelined GETs over `redis_connections` sockets,
    received in place)
    on the same stored chunks, loads alternating; plus the new path on int8 values."""
    from store.redis_tier import RedisTier

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prefix, int8_prefix = (f"kvblend-bench-{uuid.uuid4().hex}:" for _ in range(2))  # neither under the other
    if not RedisTier(config.redis_url, prefix, connections=0).check():
        print(f"note: Redis at {config.redis_url} does not answer; no Redis path rows", file=sys.stderr)
        return []
    n = config.redis_connections
    paths = [("GET per layer, 1 connection (old)", prefix, dict(connections=0)),
             (f"pipelined GETs, {n} connections", prefix, dict(connections=n)),
             (f"pipelined GETs, {n} connections, int8", int8_prefix, dict(connections=n, quantize=True))]
    rows = []
    for layout_name in config.layouts:
        layout = LAYOUTS[layout_name]
        data = _chunks(layout, config.chunks, config.tokens)
        keys = [chunk_key("bench", [], chunk.token_ids, layout.dtype) for chunk in data]
        tiers = [RedisTier(config.redis_url, path_prefix, **options) for _, path_prefix, options in paths]
        stores = [ChunkStore(TieredStore([tier], [None])) for tier in tiers]
        try:
            for store in (stores[0], stores[2]):  # the old and new paths read the same values
                for key, chunk in zip(keys, data):
                    if not store.put(key, chunk):
                        raise RuntimeError(f"Redis did not store chunk {key}")
            stored = [tier.bytes_used() for tier in tiers]
            times: list[list[float]] = [[] for _ in paths]
            # CPU seconds (this process, all its threads; the Redis server) do not depend on how busy
            # the machine is, where wall time on shared cores does.
            cpu = [[0.0, 0.0] for _ in paths]
            for _ in range(config.repeats):  # interleaved: each round times every path once
                for slot, store in enumerate(stores):
                    process, server = time.process_time(), _server_cpu(tiers[0])
                    times[slot].append(_load_once(store, keys, layout, config.tokens, device))
                    cpu[slot][0] += time.process_time() - process
                    cpu[slot][1] += _server_cpu(tiers[0]) - server
            size = layout.chunk_bytes(config.tokens) * len(keys)
            for (label, _, _), tier_stored, path_times, (client_s, server_s) in zip(paths, stored, times, cpu):
                rows.append({
                    "layout": layout.name, "path": label, "chunks": len(keys), "tokens": config.tokens,
                    "kv_mb": size / 1e6, "stored_mb": tier_stored / 1e6,
                    "load_ms_median": 1e3 * statistics.median(path_times),
                    "load_gb_s_median": size / statistics.median(path_times) / 1e9,
                    "load_gb_s_best": size / min(path_times) / 1e9,
                    "x_old": statistics.median(times[0]) / statistics.median(path_times),
                    "client_cpu_s_per_gb": client_s / (size * config.repeats / 1e9),
                    "redis_cpu_s_per_gb": server_s / (size * config.repeats / 1e9),
                    "times_s": path_times,
                })
        finally:
            for tier in (tiers[0], tiers[2]):
                _clear(tier)
            for tier in tiers:
                tier.close()
        del data
    return rows


def replay(admit_after: int, workdir: Path, requests: int, seed: int = 0) -> dict:
    """Fast-tier hit rate over a skewed stream: 20% of the recurring chunks take 80% of their requests,
    and a third of all chunk requests are for chunks never seen before or after."""
    recurring, hot_share, one_off_share, per_request, fast_slots = 500, 0.8, 1 / 3, 4, 120
    hot = recurring // 5
    rng = random.Random(seed)
    entry = torch.zeros(4, 2, 1, 8)  # one tiny layer: the policy, not the bytes, is under test
    chunk_bytes = entry.numel() * entry.element_size() + 8 * (5 + 4)  # the layer and its manifest
    cpu = MemoryTier("cpu")
    tiered = TieredStore([cpu, DiskTier(workdir / f"replay-{admit_after}")], [fast_slots * chunk_bytes, None],
                         admit_after=admit_after)
    chunks = ChunkStore(tiered)
    fast_hits = lookups = 0
    one_off = 0
    for _ in range(requests):
        names = []
        for _ in range(per_request):
            if rng.random() < one_off_share:
                one_off += 1
                names.append(f"once-{one_off}")
            elif rng.random() < hot_share:
                names.append(f"hot-{rng.randrange(hot)}")
            else:
                names.append(f"cold-{rng.randrange(hot, recurring)}")
        keys = [chunk_key("replay", [], list(name.encode()), "float32") for name in names]
        for key in keys:
            lookups += 1
            fast_hits += cpu.contains(f"{key}:0")
        chunks.get_or_compute(keys, lambda index: ChunkKV((0, 1, 2, 3), 0, entry[None]))
    stats = {name: s.as_dict() for name, s in tiered.stats().items()}
    return {"admit_after": admit_after, "requests": requests, "chunk_lookups": lookups,
            "fast_tier_hit_rate": fast_hits / lookups, "fast_tier_chunks": fast_slots, "stats": stats}


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    header = [title for title, _, _ in columns]
    body = [[format(row[key], fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def run(config: StoreBenchConfig) -> int:
    """The benchmark as a program: prints its tables and writes the figures to `config.json_out`."""
    import redis

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    result = {"args": asdict(config),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "redis_py": redis.__version__, "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_average_at_start": os.getloadavg(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory(prefix="kvblend-bench-", dir=config.work_dir) as workdir:
        if config.only in ("all", "throughput"):
            rows = throughput(config, Path(workdir))
            result["throughput"] = rows
            print(_table(rows, [("layout", "layout", ""), ("tier", "tier", ""), ("chunks", "chunks", "d"),
                                ("K/V MB", "kv_mb", ".1f"), ("stored MB", "stored_mb", ".1f"),
                                ("write GB/s", "write_gb_s", ".2f"), ("load ms", "load_ms_median", ".1f"),
                                ("load GB/s", "load_gb_s_median", ".2f"),
                                ("best GB/s", "load_gb_s_best", ".2f")]))
            print()
        if config.only in ("all", "redis"):
            rows = redis_paths(config)
            result["redis_paths"] = rows
            print(_table(rows, [("layout", "layout", ""), ("Redis -> " + ("pinned CPU" if torch.cuda.is_available()
                                                                             else "CPU"), "path", ""),
                                ("chunks", "chunks", "d"), ("K/V MB", "kv_mb", ".1f"),
                                ("stored MB", "stored_mb", ".1f"), ("load ms", "load_ms_median", ".1f"),
                                ("load GB/s", "load_gb_s_median", ".2f"), ("best GB/s", "load_gb_s_best", ".2f"),
                                ("x old", "x_old", ".2f"), ("client CPU s/GB", "client_cpu_s_per_gb", ".2f"),
                                ("Redis CPU s/GB", "redis_cpu_s_per_gb", ".2f")]))
            print()
        if config.only in ("all", "replay"):
            runs = [replay(admit_after, Path(workdir), config.replay_requests) for admit_after in (1, 2)]
            result["replay"] = runs
            for run_ in runs:
                run_["policy"] = "plain LRU" if run_["admit_after"] == 1 else "admit on 2nd use"
            print(_table(runs, [("policy", "policy", ""), ("requests", "requests", "d"),
                                ("chunk lookups", "chunk_lookups", "d"),
                                ("fast-tier hit rate", "fast_tier_hit_rate", ".3f")]))
    config.json_out.parent.mkdir(parents=True, exist_ok=True)
    config.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {config.json_out}")
    return 0
