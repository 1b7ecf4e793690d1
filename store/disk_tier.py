"""Disk tier: one codec-encoded file per entry under a directory, kept across restarts.

A write goes to a temporary file in the entry's own directory and is renamed over the entry with
`os.replace`, which is atomic: a reader, a concurrent writer or a process killed mid-write sees the
old entry or the new one, never half of one. (No fsync: after a power loss a torn file fails its
checksum and is a miss.)

Any OS error on an entry (a directory in its place, EACCES, EMFILE, EIO) is a miss or a skipped
write, counted in `errors` and logged with the path; it never reaches the request, so no server path
reaches a client. After `ERRORS_BEFORE_DOWN` errors in a row the tier reports itself unavailable
(health degraded); any successful call, or a `check()` that writes and reads a probe file in the
folder, makes it available again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from store import codec
from store.tier import get_each

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9A-Za-z_.:-]+")
_TMP = ".tmp-"
STALE_TMP_S = 600  # a temp file this old belongs to a writer that died; newer ones may be in flight
ERRORS_BEFORE_DOWN = 3  # OS errors in a row after which the tier reports itself unavailable


class DiskTier:
    volatile = False

    def __init__(self, root: str | Path, quantize: bool = False, name: str = "disk",
                 secret: bytes | None = None):
        self.name = name
        self.root = Path(root).expanduser() / f"v{codec.FORMAT_VERSION}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quantize = quantize
        self._secret = secret  # MAC key (store.codec): entries without a valid MAC are CorruptEntry
        self.errors = 0  # OS errors since the tier was opened
        self.skipped_writes = 0
        self._failing = 0  # OS errors since the last successful call
        self._last_error = ""
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        found = []
        now = time.time()
        for path in self.root.glob("*/*"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another process renamed or deleted it meanwhile
                continue
            if _TMP in path.name:
                if now - stat.st_mtime > STALE_TMP_S:
                    path.unlink(missing_ok=True)
                continue
            found.append((stat.st_mtime, path.name, stat.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key) or _TMP in key or key.startswith("."):
            raise ValueError(f"entry key {key!r} is not a safe file name (letters, digits, _ . : - only)")
        return self.root / key[:2] / key

    @property
    def available(self) -> bool:
        return self._failing < ERRORS_BEFORE_DOWN

    def _error(self, what: str, path: Path, err: OSError) -> None:
        with self._lock:
            self.errors += 1
            self._failing += 1
            failing, repeated = self._failing, str(err) == self._last_error
            self._last_error = str(err)
        if failing == ERRORS_BEFORE_DOWN:
            log.warning("store: disk tier at %s marked unavailable after %d errors in a row (last: %s of "
                        "%s: %s); entries there are misses until a call or check() succeeds",
                        self.root, failing, what, path, err)
        elif not repeated:
            log.warning("store: disk tier %s of %s failed (%s); treated as a miss or a skipped write",
                        what, path, err)

    def _ok(self) -> None:
        if self._failing:
            with self._lock:
                was_down, self._failing, self._last_error = not self.available, 0, ""
            if was_down:
                log.warning("store: disk tier at %s is available again (%d errors so far)", self.root, self.errors)

    def check(self) -> bool:
        """Write, read and remove a probe file in the folder; True (and `available`) when it works."""
        probe = self.root / f"{_TMP}check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"kvblend")
            if probe.read_bytes() != b"kvblend":
                raise OSError(f"probe file {probe} read back other bytes")
        except OSError as err:
            self._error("probe", probe, err)
            return False
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        self._ok()
        return True

    def contains(self, key: str) -> bool:
        path = self._path(key)
        try:
            return path.is_file()
        except OSError as err:
            self._error("stat", path, err)
            return False

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:  # e.g. a directory in its place, no permission, out of file descriptors
            self._error("read", path, err)
            return None
        self._ok()
        return codec.decode(data, self._secret, key)

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None | codec.CorruptEntry]:
        return get_each(self, keys)

    def put(self, key: str, value: torch.Tensor) -> int | None:
        path = self._path(key)
        data = codec.encode(value, self.quantize, self._secret, key)
        tmp = path.with_name(f"{key}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:
            self._error("write", path, err)
            with self._lock:
                self.skipped_writes += 1
            return None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._ok()
        with self._lock:
            self._sizes[key] = len(data)
        return len(data)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            self._error("delete", path, err)
        with self._lock:
            self._sizes.pop(key, None)

    def bytes_used(self) -> int:
        """Bytes of the entries this process has seen (found at start-up or written since)."""
        with self._lock:
            return sum(self._sizes.values())

    def entries(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            return iter(list(self._sizes.items()))

    def idle_entries(self, idle_s: float) -> list[str]:
        """Keys of entries whose file was last written at least `idle_s` seconds ago."""
        now, idle = time.time(), []
        for key in [key for key, _ in self.entries()]:
            try:
                if now - self._path(key).stat().st_mtime >= idle_s:
                    idle.append(key)
            except FileNotFoundError:
                continue
            except OSError as err:
                self._error("stat", self._path(key), err)
        return idle
