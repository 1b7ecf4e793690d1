"""Warm-up: chunks copied from the bottom tier (Redis, disk) into this replica's CPU tier in the background:
chunks another replica ingested, before any request asks for them, and chunks a request prefilled in full
because their tier loads slower than they recompute, so the next request loads them.

The catalog's log tells a replica which chunks are new, and a request which chunks it recomputed (`offer`); a pass (`run_pass`, on the warm-up's
own thread: services/serving/warmup.py) reads each one's manifest and layers from the bottom tier and
fills them into the CPU tier, the layers first and the manifest last (a reader that finds the manifest
finds the layers, as after `ChunkStore.put`). A pass is the lowest priority there is:
- a chunk another replica added only fills room the CPU tier's budget has left, at the cold end of its LRU,
  so it never evicts what requests use (`TieredStore.fill`); a chunk a request used may also push out chunks
  used less often (`TieredStore.make_room`) and goes in at the hot end; when the next chunk does not fit,
  the pass stops and the chunk waits;
- it moves at most `pass_bytes` per pass (a chunk larger than that moves alone);
- it stops between chunks as soon as `busy()` says requests are waiting for the model.
A chunk already in the CPU tier is skipped; one that cannot be read (not in Redis, Redis down, a corrupt
entry) is a counted miss and dropped: a request then reads it from Redis as it would without warm-up.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from store.chunks import Manifest
from store.codec import CorruptEntry
from store.keys import layer_key, manifest_key
from store.tiered import TieredStore

log = logging.getLogger(__name__)

MAX_QUEUE = 65536  # chunks waiting; past it the oldest offers are dropped (the CPU tier holds far fewer)


@dataclass
class WarmupStats:
    queue: int = 0  # chunks learned of and not pulled yet
    chunks: int = 0  # chunks pulled into the CPU tier
    bytes: int = 0  # bytes pulled into the CPU tier
    skipped: int = 0  # chunks found in the CPU tier already
    misses: int = 0  # chunks that could not be read from the bottom tier (absent, Redis down, corrupt)
    dropped: int = 0  # offers dropped: the queue was full, or the chunk is larger than the whole tier
    passes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class Warmup:
    def __init__(self, tiered: TieredStore, tier: str = "cpu", pass_bytes: int = 64 << 20,
                 busy: Callable[[], bool] = lambda: False):
        names = [t.name for t in tiered.tiers]
        if tier not in names or names.index(tier) == len(names) - 1:
            raise ValueError(f"warm-up needs a {tier!r} tier above the shared bottom tier (tiers: {', '.join(names)})")
        if pass_bytes < 1:
            raise ValueError(f"warm-up pass_bytes {pass_bytes!r} must be >= 1")
        self.tiered = tiered
        self.tier = tier
        self.pass_bytes = pass_bytes
        self.busy = busy
        self._target = tiered.tiers[names.index(tier)]
        self._source = tiered.tiers[-1]
        self._budget = tiered.budgets[names.index(tier)]
        # chunk key -> whether it may push colder chunks out (a request used it), oldest offer first
        self._queue: OrderedDict[str, bool] = OrderedDict()
        self._stats = WarmupStats()
        self._lock = threading.Lock()

    def offer(self, keys: Iterable[str], used: bool = False) -> None:
        """Chunk keys to pull (cheap: called on the catalog thread or the model thread): ones another
        replica added fill free room only; `used` ones (a request just recomputed them for their slow
        tier) may also push out chunks used less often, at the hot end of the tier's LRU."""
        with self._lock:
            for key in keys:
                self._queue[key] = used or self._queue.get(key, False)
            while len(self._queue) > MAX_QUEUE:
                self._queue.popitem(last=False)
                self._stats.dropped += 1

    def forget(self, keys: Iterable[str]) -> None:
        """Chunk keys deleted since they were offered: not pulled."""
        with self._lock:
            for key in keys:
                self._queue.pop(key, None)

    def stats(self) -> WarmupStats:
        with self._lock:
            return WarmupStats(**{**asdict(self._stats), "queue": len(self._queue)})

    def run_pass(self) -> int:
        """Pull queued chunks into the CPU tier within the budgets; the bytes pulled. Never raises on a
        backend failure: a chunk it cannot read is a counted miss."""
        pulled = 0
        while not self.busy():
            with self._lock:
                key = next(iter(self._queue), None)
                used = self._queue.get(key, False)
            if key is None:
                break
            outcome, size = self._pull(key, self.pass_bytes - pulled if pulled else None, used)
            if outcome == "wait":  # no room in the tier or in this pass: it stays first in line
                break
            with self._lock:
                self._queue.pop(key, None)
                if outcome == "pulled":
                    self._stats.chunks += 1
                    self._stats.bytes += size
                else:
                    setattr(self._stats, outcome, getattr(self._stats, outcome) + 1)
            pulled += size
        with self._lock:
            self._stats.passes += 1
        return pulled

    def _pull(self, key: str, allowed: int | None, used: bool = False) -> tuple[str, int]:
        """("pulled", bytes), ("skipped" | "misses" | "dropped", 0), or ("wait", 0) when it does not fit now."""
        placed: list[str] = []
        try:
            raw = self._source.get(manifest_key(key))
            manifest = Manifest.from_tensor(raw) if raw is not None else None
            if manifest is None:
                return "misses", 0
            layers = [layer_key(key, i) for i in range(manifest.n_layers)]
            if all(self._target.contains(entry) for entry in [*layers, manifest_key(key)]):
                return "skipped", 0
            block_bytes = manifest.dtype.itemsize
            for dim in manifest.block_shape:
                block_bytes *= dim
            size = block_bytes * manifest.n_layers + raw.numel() * raw.element_size()
            if self._budget is not None and size > self._budget:
                return "dropped", 0  # larger than the whole tier: a request reads it from Redis
            if allowed is not None and size > allowed:
                return "wait", 0
            room = self.tiered.room(self.tier)
            if room is not None and size > room and not (used and self.tiered.make_room(self.tier, size, key)):
                return "wait", 0
            for entry in layers:
                value = self._source.get(entry)
                if value is None or tuple(value.shape) != manifest.block_shape or value.dtype != manifest.dtype:
                    return self._undo(placed, "misses")
                if not self.tiered.fill(self.tier, entry, value, hot=used):
                    return self._undo(placed, "wait")  # requests' entries took the room meanwhile
                placed.append(entry)
            if not self.tiered.fill(self.tier, manifest_key(key), raw, hot=used):
                return self._undo(placed, "wait")
            return "pulled", size
        except (CorruptEntry, ValueError) as err:
            log.warning("warm-up: chunk %s is unreadable in %s (%s); a miss", key, self._source.name, err)
            return self._undo(placed, "misses")
        except Exception:  # noqa: BLE001 - the warm-up never takes the replica down; a request reads it later
            log.exception("warm-up: chunk %s failed; a miss", key)
            return self._undo(placed, "misses")

    def _undo(self, placed: list[str], outcome: str) -> tuple[str, int]:
        """Take out the layers a cut-short pull placed: without their manifest nobody would read them."""
        for entry in placed:
            self.tiered.drop(self.tier, entry)
        return outcome, 0
