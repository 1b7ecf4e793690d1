"""The warm-up's thread: every `server.warmup_interval_s`, follow the shared catalog's log (when the catalog
is shared) and run a warm-up pass (store/warmup.py), so chunks another replica ingested, and chunks a request
recomputed because their tier loads too slowly, reach this replica's CPU tier before a request asks for them.

The thread never runs model work and holds the catalog thread only for the log sync a request would do
anyway (one round trip per followed collection when nothing changed); if the catalog thread is busy for
longer than the interval the sync is withdrawn and tried next time. It runs at the lowest OS priority, and a
pass stops while requests wait for the model.
"""

from __future__ import annotations

import logging
import os
import threading

from services.serving.catalog import Catalog
from store.warmup import Warmup

log = logging.getLogger(__name__)


class WarmupThread:
    def __init__(self, warmup: Warmup, catalog: Catalog | None, interval_s: float):
        self.warmup = warmup
        self.catalog = catalog
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:  # Linux: per-thread niceness, so the model thread wins the CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(self.interval_s):
            try:
                if self.catalog is not None:  # a shared catalog: learn of other replicas' chunks
                    self.catalog.run(self.catalog.follow, wait_s=self.interval_s)
            except Exception as err:  # noqa: BLE001 - Redis down or the catalog busy: the pass still runs
                log.debug("warm-up: catalog sync skipped (%s)", err)
            try:
                self.warmup.run_pass()
            except Exception:  # noqa: BLE001 - the warm-up must never take the replica down
                log.exception("warm-up pass failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
