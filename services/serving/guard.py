"""The quality guard's sampling and bookkeeping: a sampled share of blend requests is also prefilled
in full, and answered in full when blend's first-token distribution is too far from it."""

from __future__ import annotations

import random
import statistics
import threading

from services.settings import GuardConfig


class Guard:
    """Sampling and bookkeeping of the quality guard (see `Generation._check`)."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self.checked = self.fell_back = self.agreed = 0
        self.kls: list[float] = []

    def sample(self) -> bool:
        if self.config.fraction <= 0.0:
            return False
        with self._lock:
            return self._random.random() < self.config.fraction

    def record(self, kl: float, agree: bool, fell_back: bool) -> None:
        with self._lock:
            self.checked += 1
            self.agreed += int(agree)
            self.fell_back += int(fell_back)
            self.kls.append(kl)

    def summary(self) -> dict:
        with self._lock:
            return {"fraction": self.config.fraction, "max_kl": self.config.max_kl, "checked": self.checked,
                    "fell_back": self.fell_back,
                    "mean_kl": statistics.fmean(self.kls) if self.kls else 0.0,
                    "agreement": self.agreed / self.checked if self.checked else 0.0}
