"""Tiers composed into one store: byte budgets, LRU, promotion, demotion and admission, all here.

Tiers are ordered fastest first. A `get` looks in each tier in turn; a hit below the top is copied
up into the highest tier above that admits it (the lower copy stays, so the hierarchy is
inclusive), unless that tier is full and its least recently used entry belongs to a chunk used at
least as often (so a request larger than a tier leaves whole chunks there, not a slice of each).
A `put` goes to the highest admitting tier. When a tier is over its budget its least
recently used entries are evicted and demoted to the next tier down; the last tier drops them (a
Redis bottom tier has no budget here and evicts by its own maxmemory policy). An entry larger than
a tier's whole budget passes through it to the next tier.

Written through (`write_through`), a put also lands in the bottom tier, so replicas sharing that
tier (Redis) find each other's entries.

Admission keeps one-off chunks out of the small memory tiers: a volatile tier that is not the last
tier takes an entry only once its chunk has been used `admit_after` times (uses are counted per
request by `note_use`, in a frequency sketch). Persistent tiers and the last tier take everything,
so nothing is lost to admission. Admission guards what a tier evicts, not what fills free room: a chunk
whose whole size fits a memory tier's free room gets a copy there too on its put, whatever its uses
(`copy_into_room`: all its entries or none, evicting nothing), beside the entry in the tier admission chose
(which stays: a persistent tier keeps it across restarts), so a freshly ingested corpus that fits the CPU tier
is read from it from its first request, not from disk or Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from store.admission import FrequencySketch
from store.codec import CorruptEntry
from store.keys import chunk_of
from store.tier import Tier

log = logging.getLogger(__name__)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # entries that failed their checksum or MAC: deleted and counted as misses
    evictions: int = 0  # entries pushed out of this tier by its budget
    promotions: int = 0  # entries copied into this tier from a tier below on a hit
    demotions: int = 0  # entries moved into this tier from the tier above on an eviction
    load_s: float = 0.0  # time spent in successful gets from this tier
    bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class TieredStore:
    def __init__(self, tiers: Sequence[Tier], budgets: Sequence[int | None], admit_after: int = 1,
                 sketch: FrequencySketch | None = None, write_through: bool = False):
        if not tiers:
            raise ValueError("a tiered store needs at least one tier")
        if len(tiers) != len(budgets):
            raise ValueError(f"{len(tiers)} tiers but {len(budgets)} budgets")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names {names} are not unique")
        self.tiers = list(tiers)
        self.budgets = list(budgets)
        self.admit_after = admit_after
        self.write_through = write_through
        self.sketch = sketch if sketch is not None else FrequencySketch()
        self._stats = {tier.name: TierStats() for tier in self.tiers}
        self._lock = threading.RLock()
        # Per budgeted tier: key -> bytes, least recently used first. Unbudgeted tiers are not tracked.
        self._lru: list[OrderedDict[str, int] | None] = []
        self._used: list[int] = []
        for tier, budget in zip(self.tiers, self.budgets):
            lru = None if budget is None else OrderedDict(tier.entries())
            self._lru.append(lru)
            self._used.append(sum(lru.values()) if lru is not None else 0)

    # -- policy ---------------------------------------------------------------------------------

    def note_use(self, item: str) -> None:
        """Count one use of an item (a chunk, once per request) toward admission."""
        self.sketch.add(item)

    def _admits(self, index: int, key: str) -> bool:
        tier = self.tiers[index]
        if not tier.volatile or index == len(self.tiers) - 1 or self.admit_after <= 1:
            return True
        return self.sketch.estimate(chunk_of(key)) >= self.admit_after

    def _touch(self, index: int, key: str) -> None:
        lru = self._lru[index]
        if lru is not None:
            with self._lock:
                if key in lru:
                    lru.move_to_end(key)

    def _place(self, index: int, key: str, value: torch.Tensor, evict: bool = True) -> bool:
        """Write into tier `index` and evict its least recently used entries down.

        True when the entry is kept: in this tier, or (larger than its budget) passed to one below.
        False when the tier skipped the write (e.g. Redis is down), or, with `evict=False`, when it does not fit
        the budget: then it is not kept (taken out again) and nothing is evicted.
        """
        tier, lru = self.tiers[index], self._lru[index]
        if lru is None:
            return tier.put(key, value) is not None
        # Write, account and take out the victims as one step, so that a concurrent put of a victim
        # cannot land between its removal from the index and from the tier.
        with self._lock:
            size = tier.put(key, value)
            if size is None:
                return False
            self._used[index] += size - lru.pop(key, 0)
            lru[key] = size
            if not evict and self._used[index] > self.budgets[index]:
                self._used[index] -= lru.pop(key)
                tier.delete(key)
                return False
            evicted = []
            while self._used[index] > self.budgets[index] and lru:
                victim, victim_size = lru.popitem(last=False)
                self._used[index] -= victim_size
                evicted.append((victim, self._take(index, victim)))
            self._stats[tier.name].evictions += len(evicted)
        kept = True
        for victim, victim_value in evicted:
            demoted = victim_value is not None and self._demote(index, victim, victim_value)
            if victim == key:
                kept = demoted
        return kept

    def _take(self, index: int, key: str) -> torch.Tensor | None:
        tier = self.tiers[index]
        try:
            value = tier.get(key)
        except CorruptEntry as err:
            self._corrupt(index, key, err)
            return None
        tier.delete(key)
        return value

    def _demote(self, index: int, key: str, value: torch.Tensor) -> bool:
        """Into the first tier below `index` that takes it; True if one did. The bottom tier drops."""
        for below in range(index + 1, len(self.tiers)):
            # The hierarchy is inclusive: an entry promoted from below is often still there.
            if self.tiers[below].contains(key):
                self._touch(below, key)
            elif not self._place(below, key, value):
                continue  # that tier skipped the write (e.g. Redis down): try the next one
            with self._lock:
                self._stats[self.tiers[below].name].demotions += 1
            return True
        if index + 1 < len(self.tiers):
            log.warning("store: entry %s evicted from %s was dropped: every tier below skipped it",
                        key, self.tiers[index].name)
        return False

    def _corrupt(self, index: int, key: str, err: CorruptEntry) -> None:
        tier = self.tiers[index]
        log.warning("store: entry %s in %s is corrupt (%s); deleted and treated as a miss",
                    key, tier.name, err)
        tier.delete(key)
        with self._lock:
            self._stats[tier.name].corrupt += 1
            lru = self._lru[index]
            if lru is not None and key in lru:
                self._used[index] -= lru.pop(key)

    # -- the map --------------------------------------------------------------------------------

    def get(self, key: str) -> torch.Tensor | None:
        return self.get_from(key)[0]

    def get_from(self, key: str) -> tuple[torch.Tensor | None, str | None]:
        """`get`, and the name of the tier that served it (None on a miss)."""
        for index, tier in enumerate(self.tiers):
            started = time.perf_counter()
            try:
                value = tier.get(key)
            except CorruptEntry as err:
                self._corrupt(index, key, err)
                value = None
            stats = self._stats[tier.name]
            if value is None:
                with self._lock:
                    stats.misses += 1
                continue
            with self._lock:
                stats.hits += 1
                stats.load_s += time.perf_counter() - started
            self._touch(index, key)
            self._promote(index, key, value)
            return value, tier.name
        return None, None

    def get_many_from(self, keys: Sequence[str]) -> list[tuple[torch.Tensor | None, str | None]]:
        """`get_from` of each key, asking each tier once for all the keys still missing (one round trip
        to Redis for a layer of every chunk); hits are promoted as by `get`."""
        found: list[tuple[torch.Tensor | None, str | None]] = [(None, None)] * len(keys)
        missing = list(range(len(keys)))
        for index, tier in enumerate(self.tiers):
            if not missing:
                break
            started = time.perf_counter()
            values = tier.get_many([keys[i] for i in missing])
            elapsed = time.perf_counter() - started
            still = []
            for slot, value in zip(missing, values):
                if isinstance(value, CorruptEntry):
                    self._corrupt(index, keys[slot], value)
                    value = None
                if value is None:
                    still.append(slot)
                    continue
                self._touch(index, keys[slot])
                self._promote(index, keys[slot], value)
                found[slot] = (value, tier.name)
            with self._lock:
                stats = self._stats[tier.name]
                stats.misses += len(still)
                stats.hits += len(missing) - len(still)
                if len(still) < len(missing):
                    stats.load_s += elapsed
            missing = still
        return found

    def _displaces_as_hot(self, index: int, key: str, value: torch.Tensor) -> bool:
        """Would promoting `key` into tier `index` evict an entry of a chunk used at least as often?

        A request reads every chunk layer by layer. When its chunks do not all fit a tier, promoting
        on every hit evicts, layer by layer, chunks that were wholly in the tier, until each chunk has
        some layers only below and the whole request reads at the slow tier's speed (seen on an H200:
        half the chunks in the CPU tier, half only in Redis, and after one request every chunk read as
        a Redis chunk). So a promotion that needs room takes it only from a colder chunk (TinyLFU's
        admission: the candidate's use count against the victim's)."""
        lru = self._lru[index]
        if lru is None:
            return False
        size = value.numel() * value.element_size()
        with self._lock:
            if self._used[index] - lru.get(key, 0) + size <= self.budgets[index] or not lru:
                return False
            victim = next(iter(lru))
        return not self._colder(victim, chunk_of(key))

    def _colder(self, entry: str, chunk: str) -> bool:
        """Is `entry` of another chunk, used less often than `chunk` (what a copy-up may evict for it)?"""
        owner = chunk_of(entry)
        return owner != chunk and self.sketch.estimate(owner) < self.sketch.estimate(chunk)

    def _promote(self, index: int, key: str, value: torch.Tensor) -> None:
        """A hit in tier `index`: a copy into the highest tier above that admits it and has room for it
        without evicting a chunk as hot (`_displaces_as_hot`)."""
        for above in range(index):
            if self._admits(above, key):
                if self._displaces_as_hot(above, key, value):
                    continue
                if self._place(above, key, value):
                    with self._lock:
                        self._stats[self.tiers[above].name].promotions += 1
                break

    def put(self, key: str, value: torch.Tensor) -> bool:
        """Store in the highest tier that admits it and, written through, in the bottom tier too. False
        (logged) if every tier skipped the write, or if the write-through did not reach the bottom tier
        (the entry is then kept above, but other replicas cannot see it)."""
        failure = self.try_put(key, value)
        if failure is not None:
            log.warning("store: entry %s was not stored %s", key, failure)
        return failure is None

    def try_put(self, key: str, value: torch.Tensor) -> str | None:
        """`put` without the log line: None when stored, else why not (for a caller that reports many
        entries' failures as one, e.g. a chunk's layers)."""
        bottom = len(self.tiers) - 1
        for index in range(len(self.tiers)):
            if self._admits(index, key) and self._place(index, key, value):
                if self.write_through and index < bottom and not self._place(bottom, key, value):
                    return f"through to {self.tiers[bottom].name} (kept in {self.tiers[index].name} only)"
                return None
        return "anywhere: every tier skipped it or it exceeds every budget"

    def copy_into_room(self, entries: Sequence[tuple[str, torch.Tensor]]) -> str | None:
        """Copy `entries` (a chunk's layers, then its manifest) into the fastest budgeted memory tier with free room
        for all of them that does not hold the last one yet: all or none, evicting nothing (an entry that would go
        over the budget, the room taken meanwhile by another thread's put, is not kept, and the chunk's entries
        copied before it are taken out again). The lock is held an entry at a time, as by every put, not for the
        whole chunk (a request's look-ups wait for no chunk-sized copy). The tier's name, or None."""
        size = sum(value.numel() * value.element_size() for _, value in entries)
        with self._lock:
            index = next((i for i, (tier, lru) in enumerate(zip(self.tiers, self._lru))
                          if lru is not None and tier.volatile and entries[-1][0] not in lru
                          and self._used[i] + size <= self.budgets[i]), None)
        if index is None:
            return None
        for count, (key, value) in enumerate(entries):
            if not self._place(index, key, value, evict=False):
                for placed, _ in entries[:count]:
                    self.drop(self.tiers[index].name, placed)
                return None
        return self.tiers[index].name

    def make_room(self, name: str, size: int, chunk: str) -> bool:
        """Evict (demoting down) tier `name`'s least recently used entries while they belong to chunks used
        less often than `chunk`, until `size` more bytes fit its budget; True when they fit. What a chunk a
        request just used may push out before it is pulled into the tier (never one as hot as itself)."""
        index = next(i for i, tier in enumerate(self.tiers) if tier.name == name)
        lru = self._lru[index]
        if lru is None:
            return True
        evicted = []
        with self._lock:
            while self._used[index] + size > self.budgets[index] and lru:
                victim = next(iter(lru))
                if not self._colder(victim, chunk):
                    break
                self._used[index] -= lru.pop(victim)
                evicted.append((victim, self._take(index, victim)))
            self._stats[self.tiers[index].name].evictions += len(evicted)
            fits = self._used[index] + size <= self.budgets[index]
        for victim, value in evicted:
            if value is not None:
                self._demote(index, victim, value)
        return fits

    def fill(self, name: str, key: str, value: torch.Tensor, hot: bool = False) -> bool:
        """Place an entry into tier `name` only if it fits the room its budget has left, at the cold end of
        its LRU: nothing is evicted for it and it is the first to go when the tier needs room. Admission is
        not asked: it keeps one-off chunks from pushing out used ones, and a fill pushes out nothing
        (the replica warm-up, store/warmup.py). False when it does not fit or the tier skipped it. `hot`:
        at the hot end instead (a chunk a request just used, pulled in after it)."""
        index = next((i for i, tier in enumerate(self.tiers) if tier.name == name), None)
        if index is None:
            raise ValueError(f"no tier named {name!r} (tiers: {', '.join(t.name for t in self.tiers)})")
        tier, lru = self.tiers[index], self._lru[index]
        size = value.numel() * value.element_size()
        with self._lock:
            if lru is not None and self._used[index] - lru.get(key, 0) + size > self.budgets[index]:
                return False
            stored = tier.put(key, value)
            if stored is None:
                return False
            if lru is not None:
                self._used[index] += stored - lru.pop(key, 0)
                lru[key] = stored
                lru.move_to_end(key, last=hot)
        return True

    def drop(self, name: str, key: str) -> None:
        """Delete an entry from tier `name` only (the other tiers keep theirs)."""
        index = next(i for i, tier in enumerate(self.tiers) if tier.name == name)
        self.tiers[index].delete(key)
        lru = self._lru[index]
        with self._lock:
            if lru is not None and key in lru:
                self._used[index] -= lru.pop(key)

    def room(self, name: str) -> int | None:
        """Bytes tier `name` can take before its budget evicts anything; None for an unbudgeted tier."""
        index = next(i for i, tier in enumerate(self.tiers) if tier.name == name)
        with self._lock:
            return None if self._lru[index] is None else max(0, self.budgets[index] - self._used[index])

    def where(self, key: str) -> str | None:
        """The name of the fastest tier holding the entry (nothing read, no use counted), or None."""
        return next((tier.name for tier in self.tiers if tier.contains(key)), None)

    def slowest(self, keys: Sequence[str]) -> str | None:
        """The slowest of the tiers the entries would be read from (each from its fastest holder), or
        None if none is held. Tiers evict entry by entry, so one chunk's layers can be split: the
        slowest one sets when the whole chunk has arrived."""
        # Tier by tier from the fastest, each asked about the keys no faster tier holds (a chunk wholly in the CPU tier
        # under the GPU tier: 32 look-ups in each, not a generator a key; a request's source asks for every chunk's
        # layers on its host-bound path); the bottom tier (Redis) only until its first hit: nothing is slower.
        slowest, remaining, bottom = None, list(keys), len(self.tiers) - 1
        for index, tier in enumerate(self.tiers):
            if not remaining:
                break
            if index == bottom:
                return tier.name if any(map(tier.contains, remaining)) else (
                    None if slowest is None else self.tiers[slowest].name)
            contains = tier.contains
            still = [key for key in remaining if not contains(key)]
            if len(still) < len(remaining):
                slowest = index
            remaining = still
        return None if slowest is None else self.tiers[slowest].name

    def contains(self, key: str, bottom_only: bool = False) -> bool:
        """In some tier; or, `bottom_only`, in the bottom tier (the one replicas share)."""
        tiers = self.tiers[-1:] if bottom_only else self.tiers
        return any(tier.contains(key) for tier in tiers)

    def delete(self, key: str) -> None:
        for index, tier in enumerate(self.tiers):
            tier.delete(key)
            lru = self._lru[index]
            with self._lock:
                if lru is not None and key in lru:
                    self._used[index] -= lru.pop(key)

    def counters(self) -> dict[str, TierStats]:
        """A snapshot of the counters per tier name, without `bytes` (no tier is asked: cheap for a scrape)."""
        with self._lock:
            return {name: TierStats(**asdict(stats)) for name, stats in self._stats.items()}

    def usage(self) -> dict[str, int | None]:
        """Bytes per tier name from the LRU accounting; None for an unbudgeted tier, which is not tracked."""
        with self._lock:
            return {tier.name: None if lru is None else used
                    for tier, lru, used in zip(self.tiers, self._lru, self._used)}

    def stats(self) -> dict[str, TierStats]:
        """A snapshot per tier name, with the bytes each tier holds now (asked of each tier: a Redis SCAN)."""
        snapshot = self.counters()
        for tier in self.tiers:
            snapshot[tier.name].bytes = tier.bytes_used()
        return snapshot
