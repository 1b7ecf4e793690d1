"""Probe (not a result): the host time of the request source's per-layer bookkeeping, on the host alone (no
GPU): the views a layer's copies land in, a view a segment against `store.source.layer_views` (one split of
the layer's range), for the bench's prompt shape (the system prefix and 10 chunks of 512 tokens, back to
back in the request's buffer); and, for reference, building a `StoreSource` over a CPU tier holding the
chunks and one layer's lookup of them (`_gather`). Only the host's Python and PyTorch calls are timed: the
K/V blocks are small stand-ins.
`python3 -m services.bench.probe_source`
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from blend.cache import ChunkKV
from services.bench.gpu import host_us, make_layout, tier_store
from store.chunks import ChunkStore
from store.disk_tier import DiskTier
from store.memory_tier import MemoryTier
from store.source import StoreSource, layer_views
from store.tiered import TieredStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    layout = make_layout(1000, 10, 512, 32)
    lengths = [len(layout.prefix)] + [len(chunk) for chunk in layout.chunks]
    starts = [0] + layout.chunk_starts()
    data = torch.zeros(32, len(layout), 2, 1, 2)
    segments = list(range(len(lengths)))
    views = layer_views(data, starts, lengths, segments)
    each = {
        "a view a segment (before)": lambda: {i: data[5, starts[i] : starts[i] + lengths[i]] for i in segments},
        "layer_views (served)": lambda: views(5),
    }
    for name, fn in each.items():
        print(f"{len(segments)} segments' views of a layer, {name}: {host_us(fn, args.repeats):.1f} us "
              f"(median of {args.repeats})")

    def kv(ids, start):
        return ChunkKV(token_ids=tuple(ids), start=start, kv=torch.zeros(32, len(ids), 2, 1, 2, dtype=torch.bfloat16))

    prefix = kv(layout.prefix, 0)
    store, keys = tier_store("cpu", [kv(ids, len(layout.prefix)) for ids in layout.chunks], "probe-source")
    build = host_us(lambda: StoreSource(store, [prefix, *keys]), args.repeats // 10)
    source = StoreSource(store, [prefix, *keys]).begin()
    gather = host_us(lambda: source._gather(5), args.repeats // 10)
    print(f"StoreSource over the CPU tier, prefix and 10 chunks: built in {build:.0f} us; a layer's lookup "
          f"(_gather) {gather:.1f} us")
    # As a server's store stacks its tiers (a memory tier above, disk below): every chunk's layers are looked for
    # tier by tier to find its slowest one (`TieredStore.slowest`), which a one-tier store answers at once.
    with tempfile.TemporaryDirectory() as folder:
        # The chunks in the middle tier (the CPU tier above, under a memory tier standing for the GPU one).
        stacked = ChunkStore(TieredStore([MemoryTier("gpu", "cpu"), store.tiered.tiers[0], DiskTier(Path(folder))],
                                         [None] * 3))
        build = host_us(lambda: StoreSource(stacked, [prefix, *keys]), args.repeats // 10)
        print(f"StoreSource over three tiers (memory, memory, disk), the chunks in the second: built in {build:.0f} us")


if __name__ == "__main__":
    main()
