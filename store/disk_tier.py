"""Disk tier: one codec-encoded file per entry under a directory, kept across restarts.

A write goes to a temporary file in the entry's own directory and is renamed over the entry with
`os.replace`, which is atomic: a reader, a concurrent writer or a process killed mid-write sees the
old entry or the new one, never half of one. (No fsync: after a power loss a torn file fails its
checksum and is a miss.)
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from store import codec

_KEY = re.compile(r"[0-9A-Za-z_.:-]+")
_TMP = ".tmp-"
STALE_TMP_S = 600  # a temp file this old belongs to a writer that died; newer ones may be in flight


class DiskTier:
    volatile = False
    available = True  # health (store.tier.Health): a local disk tier is never down
    skipped_writes = 0

    def __init__(self, root: str | Path, quantize: bool = False, name: str = "disk"):
        self.name = name
        self.root = Path(root).expanduser() / f"v{codec.FORMAT_VERSION}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quantize = quantize
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

    def check(self) -> bool:
        return True

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> torch.Tensor | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return codec.decode(data)

    def put(self, key: str, value: torch.Tensor) -> int:
        path = self._path(key)
        data = codec.encode(value, self.quantize)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{key}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self._sizes[key] = len(data)
        return len(data)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(key, None)

    def bytes_used(self) -> int:
        """Bytes of the entries this process has seen (found at start-up or written since)."""
        with self._lock:
            return sum(self._sizes.values())

    def entries(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            return iter(list(self._sizes.items()))
