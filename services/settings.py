"""Configuration, one frozen dataclass per concern, built once at the edge and passed inward; and the
one place that reads the environment ($KVBLEND_DATA_DIR, $KVBLEND_CACHE_DIR, $KVBLEND_TOKEN).

`kvblend serve` reads a config file (`--config FILE`) with the sections `[server]`, `[model]`, `[store]`,
`[guard]`, `[auth]` and `[tls]`; each key is a field of that section's dataclass (or of
`store.StoreConfig`). Flags win over the file, the file over the environment; an unknown section or key
is an error naming it.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomllib

import torch

from blend.fusor import MODES, BlendConfig
from store.config import StoreConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DATA_DIR = "~/.kvblend"  # chunk texts, vectors, index and KV, as `kvblend ingest` writes them
DEFAULT_CACHE_DIR = "~/.cache/kvblend"  # converted model weights
SERVED_SELECTOR = BlendConfig.selector + "+cachedk"  # server.selector's default (see ServerSettings.selector)
KV_DIR = "kv"  # under the data folder: the disk KV tier that `kvblend ingest` writes and `serve` reads


# -- the environment --------------------------------------------------------------------------------

def _env(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name)
    return value or None  # set but empty counts as unset


def env_data_dir(environ: Mapping[str, str] | None = None) -> str | None:
    return _env("KVBLEND_DATA_DIR", environ)


def env_cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
    return _env("KVBLEND_CACHE_DIR", environ)


def env_token(environ: Mapping[str, str] | None = None) -> str | None:
    return _env("KVBLEND_TOKEN", environ)


def data_dir(given: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """`given` (--data-dir), else $KVBLEND_DATA_DIR, else ~/.kvblend."""
    return Path(given or env_data_dir(environ) or DEFAULT_DATA_DIR).expanduser()


def token(given: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """`given` (--token), else $KVBLEND_TOKEN, else none."""
    return given or env_token(environ)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "smollm2-135m"
    cache_dir: Path = Path(DEFAULT_CACHE_DIR).expanduser()
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (choose one of {', '.join(DTYPES)})")

    @classmethod
    def resolve(cls, spec: str = "smollm2-135m", cache_dir: str | Path | None = None, dtype: str = "float32",
                device: str | None = None, environ: Mapping[str, str] | None = None) -> ModelConfig:
        """Unset `cache_dir`: $KVBLEND_CACHE_DIR, else ~/.cache/kvblend; unset `device`: cuda when available."""
        cache_dir = cache_dir or env_cache_dir(environ) or DEFAULT_CACHE_DIR
        return cls(spec=spec, cache_dir=Path(cache_dir).expanduser(), dtype=dtype, device=device or default_device())

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_TENANT = "default"
CATALOGS = ("local", "redis")


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or not TENANT.fullmatch(name) or ".." in name:
        raise ValueError(f"tenant {name!r} is not 1-64 letters, digits, '_', '-' or '.' starting with a "
                         "letter or digit")
    return name


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC edge and the request path."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path(DEFAULT_DATA_DIR)  # chunk texts, vectors and the disk KV tier, as `kvblend ingest` uses
    rpc_threads: int = 96  # each queued or streaming Generate holds one; above max_waiting + max_active
    max_waiting: int = 64  # requests queued for the model; one more is RESOURCE_EXHAUSTED
    max_active: int = 4  # requests decoding at once, interleaved token by token on the model thread
    batch_decode: bool = True  # the active requests' decode steps run as one batched step (false: one each)
    # On CUDA a request decoding alone replays its decode step as one CUDA graph, captured at its first
    # decode step (blend/graphs.py). Off: on an H200 it decodes at 7.0 ms/token against 8.1 with the
    # layer graphs, but its capture (~0.6 s) is paid once per request's KV buffer (docs/gpu.md).
    decode_graphs: bool = False
    # On CUDA each layer's row-wise parts (norm, projections, RoPE, MLP) replay as CUDA graphs per bucket of
    # token count, captured at start-up (blend/graphs.py LayerGraphs): prefill, recompute and decode steps
    # of up to 1,024 tokens launch ~8 kernels per layer instead of ~45 (larger steps are GPU-bound: eager).
    layer_graphs: bool = True
    # With `layer_graphs` and the KV pool on CUDA: a step of a request whose cache is a pool range also runs
    # each layer as one graph (KV write and scattered attention inside, `LayerGraphs(kv_pool=)`). On the H200
    # (docs/gpu.md, eighth session) faster than the per-layer graphs at reuse and blend@0.05, no slower at 0.15.
    pool_layer_graphs: bool = True
    max_kv_bytes: int = 0  # active requests' KV buffers at most this many bytes together (0: no bound); one waits
    # On CUDA requests' KV buffers are ranges of one pool (blend/cache.py KVPool), allocated at start-up:
    # its size in bytes; 0: server.max_kv_bytes where set, else a quarter of the GPU memory free after
    # the model loaded; -1: no pool (each request allocates its own). A request that finds no free
    # range allocates its own buffer and decodes on the slower gathered path.
    kv_pool_bytes: int = 0
    # With the pool, a decode step of up to 32 requests replays as one CUDA graph per batch size,
    # captured at start-up (blend/graphs.py DecodeGraphs).
    step_graphs: bool = True
    max_ingest_calls: int = 8  # IngestChunks calls in progress at once; one more is RESOURCE_EXHAUSTED
    drain_s: float = 30.0  # on SIGTERM, in-flight requests get this long to finish
    chunk_tokens: int = 512  # documents are split into chunks of at most this many model tokens
    max_documents: int = 256  # per IngestChunks call
    max_document_chars: int = 1 << 20
    default_top_k: int = 3
    max_top_k: int = 32
    max_chunks: int = 64  # chunk ids per Generate
    max_inline_documents: int = 16  # passages given inline in one Generate (or chat completion)
    max_inline_document_chars: int = 32768  # characters of one inline passage
    default_mode: str = "blend"
    default_ratio: float = 0.15
    check_layer: int = 1
    # blend's token selector (blend/selectors.py). Served: the question's attention ranking the chunk
    # tokens' cached K at check layer 1 ("+cachedk"), so layer 0 runs for the question and the kept tokens
    # only: on the H200 blend@0.05 24.7 against 26.4 ms and @0.15 36.4 against 38.1 ms with the same
    # ranking on cached keys (docs/gpu.md, seventh session), first-token KL 0.0695 against 0.0700 at 0.15
    # on 40 MuSiQue questions (docs/blend.md). It needs check_layer 1; any other selector may be set.
    selector: str = SERVED_SELECTOR
    # The loading controller plans every blend request from measured tier bandwidths and prefill cost:
    # chunks that load slower than they compute are prefilled in full, the ratio never below the request's.
    loading_controller: bool = True
    default_max_new_tokens: int = 64
    max_new_tokens: int = 1024
    health_interval_s: float = 2.0  # how often the Redis tier is pinged for the health service
    # Layer entries with no manifest (an ingest that died between them) idle this long on disk or in Redis are
    # deleted, at start-up and then at this interval; younger ones may belong to an ingest still writing. 0 = never.
    orphan_idle_s: float = 600.0
    metrics_port: int = 0  # Prometheus metrics over HTTP on `metrics_host` at this port; 0 = no metrics endpoint
    # The metrics say which tenants' requests fail and how busy the server is: loopback only unless set,
    # whatever `host` is (a container sets "0.0.0.0" for its scraper).
    metrics_host: str = "127.0.0.1"
    metrics_tls: bool = False  # serve /metrics over HTTPS with the [tls] certificate and key
    # The OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) on `host` at this port, over the same
    # engine and tokens; 0 = none. HTTPS with the [tls] certificate and key when they are set.
    http_port: int = 0
    # Where the chunk catalog (texts, vectors, KV keys) lives: "local" (sqlite + faiss under data_dir) or
    # "redis" (in the store's Redis, shared by every replica; data_dir keeps a local mirror of it).
    catalog: str = "local"
    # Tenant collections kept open (about 3 file descriptors each); past it the least recently used closes.
    max_open_tenants: int = 256
    # Warm-up (a CPU tier above a bottom tier): this often, chunks waiting to be pulled are copied from the
    # bottom tier (Redis, disk) into free room of the CPU tier, at most `warmup_pass_bytes` per pass, on a
    # background thread, never while requests wait; 0 = off. Waiting are the chunks other replicas added
    # (catalog "redis": the shared log is followed without a request) and the chunks a request prefilled in
    # full because their tier loads slower than they recompute (so the next request loads them).
    warmup_interval_s: float = 1.0
    warmup_pass_bytes: int = 64 << 20

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port!r} is not in 0..65535 (0 picks a free port)")
        for name in ("rpc_threads", "max_waiting", "max_active", "max_ingest_calls", "max_documents",
                     "max_document_chars", "default_top_k", "max_top_k", "max_chunks", "default_max_new_tokens",
                     "max_new_tokens", "check_layer", "max_open_tenants", "max_inline_documents",
                     "max_inline_document_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"server.{name} {value!r} must be an integer >= 1")
        if self.rpc_threads <= self.max_waiting + self.max_active + self.max_ingest_calls:
            raise ValueError(f"server.rpc_threads {self.rpc_threads} must exceed max_waiting + max_active + "
                             f"max_ingest_calls ({self.max_waiting} + {self.max_active} + "
                             f"{self.max_ingest_calls}): every queued or active Generate and every ingest holds "
                             "a thread, and health checks need one left")
        if self.default_top_k > self.max_top_k or self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"server defaults (top_k {self.default_top_k}, max_new_tokens "
                             f"{self.default_max_new_tokens}) exceed their limits ({self.max_top_k}, "
                             f"{self.max_new_tokens})")
        if self.default_mode not in MODES:
            raise ValueError(f"server.default_mode {self.default_mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 <= self.default_ratio <= 1.0:
            raise ValueError(f"server.default_ratio {self.default_ratio!r} is outside [0, 1]")
        try:
            BlendConfig("blend", self.default_ratio, self.check_layer, self.selector)
        except ValueError as err:
            raise ValueError(f"server.selector {self.selector!r} with check_layer {self.check_layer}: {err}") from None
        for name in ("metrics_port", "http_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"server.{name} {value!r} is not in 0..65535 (0 = off)")
        if self.catalog not in CATALOGS:
            raise ValueError(f"server.catalog {self.catalog!r} is not one of {', '.join(CATALOGS)}")
        if self.warmup_interval_s < 0 or not isinstance(self.warmup_pass_bytes, int) or self.warmup_pass_bytes < 1:
            raise ValueError(f"server.warmup_interval_s {self.warmup_interval_s!r} must be >= 0 (0 = off) and "
                             f"warmup_pass_bytes {self.warmup_pass_bytes!r} an integer >= 1")
        if self.drain_s < 0 or self.health_interval_s <= 0:
            raise ValueError(f"server.drain_s {self.drain_s!r} must be >= 0 and health_interval_s "
                             f"{self.health_interval_s!r} > 0")
        if self.orphan_idle_s < 0:
            raise ValueError(f"server.orphan_idle_s {self.orphan_idle_s!r} must be >= 0 (0 = never sweep)")
        if not isinstance(self.kv_pool_bytes, int) or self.kv_pool_bytes < -1:
            raise ValueError(f"server.kv_pool_bytes {self.kv_pool_bytes!r} must be an integer >= -1 "
                             "(0: sized at start-up, -1: no pool)")

    @property
    def url_host(self) -> str:
        """The host as it goes before `:port` (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host

    @property
    def address(self) -> str:
        return f"{self.url_host}:{self.port}"

    @property
    def metrics_url_host(self) -> str:
        host = self.metrics_host
        return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class GuardConfig:
    """The quality guard: a sampled share of blend requests also runs full prefill's first step."""

    fraction: float = 0.0  # 0 = off
    max_kl: float = 0.5  # first-token KL(full || blend) above which the answer comes from full prefill
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"guard.fraction {self.fraction!r} is outside [0, 1]")
        if not self.max_kl >= 0.0:
            raise ValueError(f"guard.max_kl {self.max_kl!r} must be >= 0")


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens, each bound to one tenant. No tokens: no auth, tenant from `kvblend-tenant` metadata."""

    tokens: tuple[tuple[str, str], ...] = ()  # (token, tenant)

    def __post_init__(self):
        for token, tenant in self.tokens:
            if not isinstance(token, str) or len(token) < 16:
                raise ValueError("auth token for tenant "
                                 f"{tenant!r} is shorter than 16 characters (use a random secret)")
            check_tenant(tenant)
        if len({token for token, _ in self.tokens}) != len(self.tokens):
            raise ValueError("the same auth token is given twice")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None  # PEM certificate chain
    key: Path | None = None  # PEM private key

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls needs both cert and key (or neither)")
        for name in ("cert", "key"):
            value = getattr(self, name)
            if value is not None:
                path = Path(value).expanduser()
                if not path.is_file():
                    raise ValueError(f"tls.{name} {str(path)!r}: no such file")
                object.__setattr__(self, name, path)

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class ServeSettings:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)


def _section(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for item in fields(cls):  # a quoted 'false' is a true string: a switch takes only true or false
        if item.type in (bool, "bool") and item.name in values and not isinstance(values[item.name], bool):
            raise ValueError(f"{where}: {item.name} must be true or false, not {values[item.name]!r}")
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


log = logging.getLogger(__name__)


def _secrets_in(data: dict) -> list[str]:
    """The keys of a parsed config file that hold secrets (bearer tokens, the store's MAC key, a Redis
    password in its URL)."""
    found = []
    if data.get("auth", {}).get("tokens"):
        found.append("[auth] tokens")
    store = data.get("store", {})
    if store.get("secret"):
        found.append("[store] secret")
    url = store.get("redis_url")
    if isinstance(url, str) and "@" in url and ":" in url.partition("://")[2].partition("@")[0]:
        found.append("[store] redis_url (a password)")
    return found


def warn_if_readable(path: Path, data: dict) -> bool:
    """Log a warning when a config file holding secrets can be read by users other than its owner;
    True when it warned."""
    secrets = _secrets_in(data)
    mode = Path(path).stat().st_mode
    if not secrets or not mode & (stat.S_IRGRP | stat.S_IROTH):
        return False
    log.warning("--config %s holds %s and is readable by %s (mode %s): anyone on this host who can read it can "
                "call as any tenant or forge store entries; run `chmod 600 %s` (or keep the store secret in "
                "[store] secret_file)", path, ", ".join(secrets),
                "others" if mode & stat.S_IROTH else "its group", stat.filemode(mode), path)
    return True


def read_file(path: Path) -> dict:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {str(path)!r}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {str(path)!r} is not TOML: {err}") from None
    unknown = sorted(set(data) - {"server", "model", "store", "guard", "auth", "tls"})
    if unknown:
        raise ValueError(f"--config {str(path)!r}: unknown section [{unknown[0]}] "
                         "(sections: server, model, store, guard, auth, tls)")
    warn_if_readable(Path(path), data)
    return data


def build(file_values: dict, overrides: dict) -> ServeSettings:
    """Settings from a parsed config file and flag values (None = not given); flags win."""
    where = "config"
    server = dict(file_values.get("server", {}))
    model = dict(file_values.get("model", {}))
    store = dict(file_values.get("store", {}))
    for name in ("host", "port", "data_dir", "metrics_port", "metrics_host", "catalog", "http_port"):
        if overrides.get(name) is not None:
            server[name] = overrides[name]
    for name in ("spec", "cache_dir", "dtype", "device"):
        if overrides.get(name) is not None:
            model[name] = overrides[name]
    if overrides.get("redis_url") is not None:
        store["redis_url"] = overrides["redis_url"]
    server_config = _section(ServerConfig, server, f"{where} [server]")
    if "cache_dir" in model:
        model["cache_dir"] = Path(model["cache_dir"]).expanduser()
    if model.get("device") is None:
        model["device"] = default_device()
    if model.get("dtype") is None:  # served in bf16 on a GPU, float32 on a CPU, unless said otherwise
        model["dtype"] = "bfloat16" if str(model["device"]).startswith("cuda") else "float32"
    if model["dtype"] not in DTYPES:
        raise ValueError(f"model dtype {model['dtype']!r} is not one of {', '.join(DTYPES)}")
    model_config = _section(ModelConfig, model, f"{where} [model]")
    store.setdefault("disk_path", server_config.data_dir / KV_DIR)
    if store.get("disk_path") in ("", "none"):
        store["disk_path"] = None  # `disk_path = ""` runs without a disk tier (e.g. replicas sharing Redis)
    if server_config.catalog == "redis":
        if store.get("redis_url") is None:
            raise ValueError("server.catalog 'redis' needs a Redis URL (--redis-url or [store] redis_url)")
        # Replicas find each other's chunks in Redis, so every KV entry must be written there too.
        store["write_through"] = True
    store_config = _section(StoreConfig, store, f"{where} [store]")
    auth = dict(file_values.get("auth", {}))
    tokens = auth.pop("tokens", {})
    if not isinstance(tokens, dict):
        raise ValueError(f"{where} [auth] tokens must be a table of token = \"tenant\"")
    auth_config = _section(AuthConfig, {**auth, "tokens": tuple(tokens.items())}, f"{where} [auth]")
    tls_config = _section(TlsConfig, dict(file_values.get("tls", {})), f"{where} [tls]")
    if server_config.metrics_tls and not tls_config.enabled:
        raise ValueError("server.metrics_tls needs a [tls] cert and key to serve /metrics over HTTPS")
    return ServeSettings(
        server=server_config, model=model_config, store=store_config,
        guard=_section(GuardConfig, dict(file_values.get("guard", {})), f"{where} [guard]"),
        auth=auth_config, tls=tls_config,
    )


def from_flags(overrides: dict, config_file: str | Path | None = None,
               environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Flag values (`overrides`, None = not given), then the config file, then the environment
    ($KVBLEND_DATA_DIR, $KVBLEND_CACHE_DIR)."""
    file_values = read_file(Path(config_file)) if config_file else {}
    overrides = dict(overrides)
    server, model = file_values.get("server", {}), file_values.get("model", {})
    if overrides.get("data_dir") is None and "data_dir" not in server:
        overrides["data_dir"] = env_data_dir(environ)
    if overrides.get("cache_dir") is None and "cache_dir" not in model:
        overrides["cache_dir"] = env_cache_dir(environ)
    return build(file_values, overrides)


__all__ = ["AuthConfig", "GuardConfig", "ModelConfig", "ServeSettings", "ServerConfig", "TlsConfig",
           "DEFAULT_TENANT", "DTYPES", "KV_DIR", "build", "check_tenant", "data_dir", "default_device",
           "env_cache_dir", "env_data_dir", "env_token", "from_flags", "read_file", "token"]
