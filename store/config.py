"""Store configuration: tiers, their byte budgets and the placement policy, built once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class StoreConfig:
    # Tiers from fastest to slowest; a tier with a zero budget or no location is left out.
    gpu_bytes: int = 0  # GPU tier budget; ignored (with a log line) when CUDA is not available
    cpu_bytes: int = 2 * GiB  # CPU tier budget (pinned memory when CUDA is available)
    disk_path: Path | None = None  # local directory; keeps the cache across restarts
    disk_bytes: int = 20 * GiB
    # Redis is the bottom tier when set: it takes what disk (or memory) evicts and evicts by its own
    # maxmemory policy, so it has no budget here (see docs/store.md). Password and TLS go in the URL.
    redis_url: str | None = None
    redis_prefix: str = "kvblend:"
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster; the client finds the rest
    redis_timeout_s: float = 1.0  # socket connect and read timeout
    redis_retry_s: float = 5.0  # after a failure, Redis is skipped this long before it is tried again
    # Every put also lands in the bottom tier (Redis), not only the highest admitting one: replicas
    # sharing Redis then find each other's chunks. `kvblend serve --catalog redis` turns it on.
    write_through: bool = False
    quantize: bool = False  # int8 K/V (per token, per head absmax) in the Redis and disk tiers
    # Uses of a chunk (per request, counted in a frequency sketch) before it may enter a memory tier
    # that is not the bottom tier; 1 is plain LRU. 2 keeps a flood of one-off chunks out of GPU/CPU.
    admit_after: int = 2
    sketch_width: int = 1 << 16  # counters per sketch row; about 4x the distinct chunks in play
    # Key of the MAC on every Redis and disk entry, the same on every replica sharing them: an entry
    # without a valid MAC is a miss, so a forged or copied value never becomes K/V. Unset: those tiers
    # are trusted as is. `secret_file` (its contents, stripped) keeps it out of the config file.
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None

    def __post_init__(self):
        if self.disk_path is not None:
            object.__setattr__(self, "disk_path", Path(self.disk_path).expanduser())
        for name in ("gpu_bytes", "cpu_bytes", "disk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} {value!r} must be a byte count >= 0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url {self.redis_url!r} must start with redis://, rediss:// or unix://")
        if self.redis_timeout_s <= 0 or self.redis_retry_s < 0:
            raise ValueError(f"redis timeout {self.redis_timeout_s!r} must be > 0 and retry "
                             f"{self.redis_retry_s!r} >= 0 seconds")
        if self.admit_after < 1:
            raise ValueError(f"admit_after {self.admit_after!r} must be >= 1 (1 admits on first use)")
        if self.sketch_width < 16 or self.sketch_width & (self.sketch_width - 1):
            raise ValueError(f"sketch_width {self.sketch_width!r} must be a power of two >= 16")
        if not (self.gpu_bytes or self.cpu_bytes or self.disk_path or self.redis_url):
            raise ValueError("no tier configured: set cpu_bytes, gpu_bytes, disk_path or redis_url")
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set secret or secret_file, not both")
        if self.secret is not None and len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"secret is shorter than {MIN_SECRET_BYTES} bytes (use a random one, e.g. "
                             "`openssl rand -hex 32`)")
        if self.secret_file is not None:
            object.__setattr__(self, "secret_file", Path(self.secret_file).expanduser())

    def mac_secret(self) -> bytes | None:
        """The MAC key of the Redis and disk entries (`secret`, or `secret_file` read now), or None."""
        if self.secret_file is None:
            return None if self.secret is None else self.secret.encode()
        try:
            secret = self.secret_file.read_bytes().strip()
        except OSError as err:
            raise ValueError(f"secret_file {str(self.secret_file)!r} is unreadable ({err.strerror})") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"secret_file {str(self.secret_file)!r} holds fewer than {MIN_SECRET_BYTES} "
                             "bytes (use a random secret, e.g. `openssl rand -hex 32`)")
        return secret
