"""How often a chunk was used lately: a count-min sketch that halves itself (TinyLFU's frequency part).

Memory stays fixed however many distinct chunks flow past, and halving all counters every
`10 * width` uses makes old popularity fade, so a chunk that was hot yesterday does not hold a
fast tier forever.
"""

from __future__ import annotations

import hashlib
import threading

DEPTH = 4
MAX_COUNT = 15


class FrequencySketch:
    def __init__(self, width: int = 1 << 16):
        if width < 16 or width & (width - 1):
            raise ValueError(f"sketch width {width!r} must be a power of two >= 16")
        self.width = width
        self._rows = [bytearray(width) for _ in range(DEPTH)]
        self._added = 0
        self._reset_at = 10 * width
        self._lock = threading.Lock()

    def _slots(self, item: str) -> list[int]:
        digest = hashlib.blake2b(item.encode(), digest_size=4 * DEPTH).digest()
        mask = self.width - 1
        return [int.from_bytes(digest[4 * row : 4 * row + 4], "little") & mask for row in range(DEPTH)]

    def add(self, item: str) -> None:
        slots = self._slots(item)
        with self._lock:
            for row, slot in zip(self._rows, slots):
                if row[slot] < MAX_COUNT:
                    row[slot] += 1
            self._added += 1
            if self._added >= self._reset_at:
                for row in self._rows:
                    row[:] = bytes(count // 2 for count in row)
                self._added //= 2

    def estimate(self, item: str) -> int:
        slots = self._slots(item)
        return min(row[slot] for row, slot in zip(self._rows, slots))
