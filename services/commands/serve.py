"""`kvblend serve`: its flags, the settings they build (flags, then --config, then the environment), and
the call into services/serving/server.py."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from services import settings
from services.settings import ServeSettings


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """What `kvblend serve` runs with; `environ` stands in for the process environment (tests)."""
    overrides = {
        "host": args.host, "port": args.port, "data_dir": args.data_dir, "spec": args.model,
        "cache_dir": args.cache_dir, "dtype": args.dtype, "device": args.device, "redis_url": args.redis_url,
        "metrics_port": args.metrics_port, "metrics_host": args.metrics_host, "catalog": args.catalog,
        "http_port": args.http_port,
    }
    return settings.from_flags(overrides, args.config, environ)


def cmd_serve(args: argparse.Namespace) -> int:
    from services.serving.server import serve

    code = serve(settings_from_args(args))
    # Everything is drained and closed by now. Leaving through interpreter teardown lets native
    # libraries destroy their thread pools in arbitrary order, which at times aborts the process
    # ("terminate called without an active exception") and turns a clean stop into exit -6.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve ingest / retrieve / blended generate over gRPC")
    p.add_argument("--port", type=int, default=None, help="port (default 50051; 0 picks a free one)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--model", default=None, help="model spec (default smollm2-135m, the embedded model)")
    p.add_argument("--cache-dir", default=None,
                   help="where converted weights live (default ~/.cache/kvblend)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--redis-url", default=None, help="Redis KV tier, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--data-dir", default=None,
                   help="chunk texts, index and disk KV tier (default $KVBLEND_DATA_DIR or ~/.kvblend)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port (default 0: off)")
    p.add_argument("--metrics-host", default=None,
                   help="address the metrics listen on (default 127.0.0.1, whatever --host is; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) on this "
                        "port, on --host (default 0: off)")
    p.add_argument("--catalog", default=None, choices=["local", "redis"],
                   help="chunk catalog: local (sqlite + faiss in --data-dir) or redis (shared by replicas)")
    p.add_argument("--config", default=None, help="TOML file: [server] [model] [store] [guard] [auth] [tls]")
    p.set_defaults(func=cmd_serve)
