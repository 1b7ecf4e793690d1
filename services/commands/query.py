"""`kvblend query`: ask a running server; prints the answer as it streams, then the request report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services import settings


def cmd_query(args: argparse.Namespace) -> int:
    import grpc

    from services.client import Answer, Client, format_report

    if args.chunk_ids and args.top_k:
        raise ValueError("give --chunk-ids or --top-k, not both")
    with Client(args.server, token=settings.token(args.token), tenant=args.tenant, tls_ca=args.tls_ca) as client:
        stream = client.generate(args.query, chunk_ids=args.chunk_ids or (), top_k=args.top_k or 0,
                                 mode=args.mode, ratio=args.ratio, max_new_tokens=args.max_new_tokens,
                                 timeout=args.timeout)
        try:
            answer = Answer.collect(stream, on_text=None if args.json else
                                    (lambda text: print(text, end="", flush=True)))
        except grpc.RpcError as err:
            print(f"\nkvblend: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(answer.as_dict(), indent=2))
    else:
        print("\n")
        print(format_report(answer))
    return 0


def add_parsers(subparsers) -> None:
    q = subparsers.add_parser("query", help="ask a running kvblend server; prints tokens as they stream")
    q.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    q.add_argument("--query", required=True)
    pick = q.add_mutually_exclusive_group()
    pick.add_argument("--chunk-ids", nargs="+", default=None, help="these chunks, in this order")
    pick.add_argument("--top-k", type=int, default=None, help="the K chunks retrieved for the query")
    q.add_argument("--mode", default="", choices=["", "full", "prefix", "reuse", "blend"],
                   help="default: the server's (blend)")
    q.add_argument("--ratio", type=float, default=None, help="blend recompute ratio (default: the server's)")
    q.add_argument("--max-new-tokens", type=int, default=0)
    q.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    q.add_argument("--token", default=None, help="bearer token (default $KVBLEND_TOKEN)")
    q.add_argument("--tenant", default=None, help="tenant, on a server without auth")
    q.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: use TLS")
    q.add_argument("--json", action="store_true", help="print the answer and report as JSON")
    q.set_defaults(func=cmd_query)
