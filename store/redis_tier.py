"""Redis tier: codec-encoded entries under a key prefix; an outage turns into misses, never errors.

A command the server refuses (say, out of memory under `noeviction`) is a miss or a skipped write
with a warning. When a call fails to connect or times out, the tier logs one warning and is skipped
(reads miss, writes are dropped and counted) for `retry_s` seconds; the next call after that tries
the server again, and the tier is back in use as soon as one succeeds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from store import codec
from store.redis_wire import WireReader, supports
from store.tier import get_each

log = logging.getLogger(__name__)

_OUTAGE = (redis.ConnectionError, redis.TimeoutError, OSError)
_MISSING = object()
_ENTRY = re.compile(r"[0-9a-f]{64}:(m|[0-9]+)")  # store.keys: a chunk's manifest or one of its layers


def _safe_url(url: str) -> str:
    # Never log a password: keep scheme and host only.
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def connect(url: str, cluster: bool = False, timeout_s: float = 1.0) -> redis.Redis:
    """A client for one Redis server, or (`cluster`) for the Redis Cluster that `url`'s node belongs to."""
    # One retry: after a server restart the first call on a pooled connection fails, a fresh one works.
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 1)}
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


class RedisTier:
    volatile = False

    def __init__(self, url: str, prefix: str = "kvblend:", quantize: bool = False,
                 timeout_s: float = 1.0, retry_s: float = 5.0, name: str = "redis", cluster: bool = False,
                 secret: bytes | None = None, connections: int = 4, pin: bool | None = None):
        """`connections`: sockets a batch read (`get_many`) spreads its keys over, each read in place
        (store.redis_wire); 0 reads a batch as one redis-py GET per key, as single `get`s do. A cluster or
        a TLS URL always does the latter. `pin`: batch-read values land in pinned memory (default: when
        CUDA is available), so their copy to the GPU is asynchronous."""
        self.name = name
        self.url = _safe_url(url)
        self.prefix = prefix
        self.quantize = quantize
        self._secret = secret  # MAC key (store.codec): entries without a valid MAC are CorruptEntry
        self.retry_s = retry_s
        self.client = connect(url, cluster, timeout_s)
        self.skipped_writes = 0
        self._down_until = 0.0  # monotonic time before which the server is not tried
        self._down = False
        self._last_refusal = ""
        self._lock = threading.Lock()
        self._this_thread = threading.local()  # `refused`: how this thread's last failed call failed
        pin = torch.cuda.is_available() if pin is None else pin
        self._wire = (WireReader(url, prefix, timeout_s, connections, secret, pin)
                      if connections and not cluster and supports(url) else None)

    @property
    def available(self) -> bool:
        return not self._down

    def refused(self) -> bool:
        """Whether this thread's last failed call was refused by a server that answered (out of memory under
        noeviction, say), not lost to an outage. Asked right after a failed write, it tells which of the two
        that write met; `available` cannot: another thread's call may find the server back in between."""
        return getattr(self._this_thread, "refused", False)

    def _call(self, method, *args, default=None):
        if self._down and time.monotonic() < self._down_until:
            self._this_thread.refused = False
            return _MISSING
        try:
            result = method(*args)
        except redis.ResponseError as err:  # the server answered but refused, e.g. OOM under noeviction
            self._this_thread.refused = True
            if str(err) != self._last_refusal:
                log.warning("redis at %s refused a command (%s); treated as a miss or a skipped write "
                            "(see docs/store.md for the maxmemory policy)", self.url, err)
                self._last_refusal = str(err)
            return _MISSING
        except _OUTAGE as err:
            self._this_thread.refused = False
            with self._lock:
                if not self._down:
                    log.warning("redis at %s is unreachable (%s): reads are misses and writes are skipped; "
                                "retrying every %.1f s", self.url, err, self.retry_s)
                self._down = True
                self._down_until = time.monotonic() + self.retry_s
            return _MISSING
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("redis at %s is back (%d writes were skipped while it was down)",
                                self.url, self.skipped_writes)
                self._down = False
        return result

    def check(self) -> bool:
        """Try the server now (ignoring the back-off); True when it answers (`available` follows)."""
        self._down_until = 0.0
        return self._call(self.client.ping) is not _MISSING

    def contains(self, key: str) -> bool:
        found = self._call(self.client.exists, self.prefix + key)
        return found is not _MISSING and bool(found)

    def get(self, key: str) -> torch.Tensor | None:
        value = self._call(self.client.get, self.prefix + key)
        if value is _MISSING or value is None:
            return None
        return codec.decode(value, self._secret, key)

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None | codec.CorruptEntry]:
        if self._wire is None:
            return get_each(self, keys)
        values = self._call(self._wire.get_many, keys)
        return [None] * len(keys) if values is _MISSING else values

    def close(self) -> None:
        """Close the batch reader's sockets (redis-py's pool closes its own when collected)."""
        if self._wire is not None:
            self._wire.close()

    def put(self, key: str, value: torch.Tensor) -> int | None:
        data = codec.encode(value, self.quantize, self._secret, key)
        # One SET of the whole value is atomic: concurrent writers of a key leave one complete value.
        if self._call(self.client.set, self.prefix + key, data) is _MISSING:
            with self._lock:
                self.skipped_writes += 1
            return None
        return len(data)

    def delete(self, key: str) -> None:
        self._call(self.client.delete, self.prefix + key)

    def _scan(self) -> list[tuple[str, int]]:
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.prefix) + "*"
        names = list(self.client.scan_iter(match=pattern, count=1000))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.strlen(name)
        sizes = pipe.execute()
        return [(name.decode()[len(self.prefix):], size) for name, size in zip(names, sizes) if size]

    def entries(self) -> Iterator[tuple[str, int]]:
        """Every entry under the prefix (SCAN, O(keys): for stats and tests, not the request path)."""
        found = self._call(self._scan)
        return iter([] if found is _MISSING else found)

    def idle_entries(self, idle_s: float) -> list[str]:
        """Keys of entries (chunk manifests and layers, not the catalog's keys under the same prefix) that no
        call has read or written for at least `idle_s` seconds (OBJECT IDLETIME; none under an LFU maxmemory
        policy, which does not track it)."""
        found = self._call(self._idle, idle_s)
        return [] if found is _MISSING else found

    def _idle(self, idle_s: float) -> list[str]:
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.prefix) + "*:*"
        names = [name for name in self.client.scan_iter(match=pattern, count=1000)
                 if _ENTRY.fullmatch(name.decode()[len(self.prefix):])]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.object("idletime", name)
        idle = pipe.execute(raise_on_error=False)
        return [name.decode()[len(self.prefix):] for name, seconds in zip(names, idle)
                if isinstance(seconds, int) and seconds >= idle_s]

    def bytes_used(self) -> int:
        return sum(size for _, size in self.entries())

    def used_memory(self) -> int | None:
        """`INFO memory` used_memory: the whole server's, not only this prefix's; None while it is down."""
        info = self._call(self.client.info, "memory")
        return None if info is _MISSING else info.get("used_memory")
