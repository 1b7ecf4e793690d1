"""`kvblend bench-store`: chunk-KV load throughput per store tier, and the admission replay.

A program, not a test: it prints tables of figures measured in one run and writes them as JSON.

Throughput: for each layout and tier, chunks of random K/V are written through a store holding
only that tier, then read back through a `StoreSource` exactly as the fusor reads them (one layer
of every chunk at a time, the next layer prefetched) and copied into a per-layer buffer on the
compute device. GB/s is K/V bytes delivered (before any int8 coding) over wall time.

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
    only: str = "all"  # or "throughput", "replay"
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
