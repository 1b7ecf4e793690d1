"""The one file that names concrete tiers: a `StoreConfig` becomes the tiers it asks for, fastest first.

Everything else sees tiers only through the `store.tier.Tier` protocol, so adding a tier is a class
that implements it plus a few lines here (docs/extending.md).
"""

from __future__ import annotations

import logging

import torch

from store.admission import FrequencySketch
from store.config import StoreConfig
from store.disk_tier import DiskTier
from store.memory_tier import MemoryTier
from store.tier import Tier
from store.tiered import TieredStore

log = logging.getLogger(__name__)


def open_tiers(config: StoreConfig) -> tuple[list[Tier], list[int | None]]:
    """The tiers `config` asks for, fastest first, and each one's byte budget (None: not tracked here)."""
    tiers: list[Tier] = []
    budgets: list[int | None] = []
    secret = config.mac_secret()
    if config.gpu_bytes:
        if torch.cuda.is_available():
            tiers.append(MemoryTier("gpu", "cuda"))
            budgets.append(config.gpu_bytes)
        else:
            log.info("store: gpu_bytes is %d but CUDA is not available; no GPU tier", config.gpu_bytes)
    if config.cpu_bytes:
        tiers.append(MemoryTier("cpu", "cpu"))
        budgets.append(config.cpu_bytes)
    if config.disk_path is not None and config.disk_bytes:
        tiers.append(DiskTier(config.disk_path, quantize=config.quantize, secret=secret))
        budgets.append(config.disk_bytes)
    if config.redis_url is not None:
        from store.redis_tier import RedisTier  # redis-py only where a Redis tier is asked for

        redis_tier = RedisTier(config.redis_url, config.redis_prefix, config.quantize,
                               config.redis_timeout_s, config.redis_retry_s, cluster=config.redis_cluster,
                               secret=secret)
        tiers.append(redis_tier)
        budgets.append(None)  # Redis evicts by its own maxmemory policy
        if not redis_tier.check():
            log.warning("store: starting without Redis (%s unreachable); it is used once it answers",
                        redis_tier.url)
    else:
        log.info("store: no Redis URL; tiers are %s only", ", ".join(t.name for t in tiers) or "none")
    shared = [tier.name for tier in tiers if not tier.volatile]
    if shared and secret is None:
        log.warning("store: no [store] secret; %s entries are trusted as is (set secret_file so that a "
                    "forged or copied entry is a miss)", " and ".join(shared))
    if not tiers:
        raise ValueError("no usable tier: CUDA is not available for gpu_bytes and no other tier is set")
    return tiers, budgets


def open_tiered(config: StoreConfig) -> TieredStore:
    """The tiered store `config` describes: its tiers, budgets, admission and write-through."""
    tiers, budgets = open_tiers(config)
    return TieredStore(tiers, budgets, config.admit_after, FrequencySketch(config.sketch_width),
                       config.write_through)
