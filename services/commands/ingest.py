"""`kvblend ingest`, `retrieve` and `delete`: their flags, and the calls into services/ingest.py."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from services import settings
from services.commands.options import add_data_dir, add_model_args, model_config


def _index_kinds() -> tuple[str, ...] | None:
    """faiss index kinds for --index; None (any value, checked when the index opens) where faiss is not
    installed, so that a GPU machine without it still parses `kvblend bench`."""
    try:
        from retriever.index import INDEX_KINDS
    except ImportError:
        return None
    return INDEX_KINDS


def _first_line(text: str, width: int = 100) -> str:
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def cmd_ingest(args: argparse.Namespace) -> int:
    from services.ingest import IngestConfig, ingest_local, ingest_remote, read_documents

    if args.server is not None:
        local_only = [flag for flag, given in (("--data-dir", args.data_dir), ("--no-kv", args.no_kv),
                                               ("--index", args.index), ("--threads", args.threads)) if given]
        if local_only:
            raise ValueError(f"{', '.join(local_only)} apply to a local ingest, not to --server {args.server} "
                             "(the server chunks, embeds and computes KV with its own settings)")
        totals = ingest_remote(read_documents(args.dataset, args.docs), args.server, args.batch_size,
                               settings.token(args.token), args.tenant, args.limit)
        print(f"{totals['documents']} documents sent to {args.server}: {totals['chunks_added']} chunks new, "
              f"{totals['chunks_existing']} already ingested, KV computed for {totals['kv_computed']} "
              f"({totals['retries']} calls retried)")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({**totals, "server": args.server}, indent=2))
        return 0
    config = IngestConfig(data_dir=settings.data_dir(args.data_dir), chunk_tokens=args.chunk_tokens,
                          batch_size=args.batch_size, with_kv=not args.no_kv, limit=args.limit,
                          index_kind=args.index)
    model = model_config(args)
    stats, total = ingest_local(config, model, read_documents(args.dataset, args.docs), args.threads,
                                progress=not args.quiet)
    line = (f"{stats.documents} documents, {stats.chunks} chunks: {stats.added} new, {stats.skipped} already "
            f"ingested; text+embedding {stats.text_rate:.1f} chunks/s")
    if config.with_kv:
        line += f"; KV {stats.kv_computed} chunks at {stats.kv_rate:.2f} chunks/s"
    print(f"{line}; {total} chunks in {config.data_dir}")
    if args.json_out:
        record = {**asdict(config), "data_dir": str(config.data_dir)}
        Path(args.json_out).write_text(json.dumps({**stats.as_dict(), "collection_chunks": total,
                                                   "config": record, "model": model.spec}, indent=2))
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from services.ingest import retrieve_from

    for hit in retrieve_from(settings.data_dir(args.data_dir), args.query, args.k):
        print(f"{hit.chunk_id}  {hit.score:.4f}  {_first_line(hit.chunk.text)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from services.ingest import delete_from

    for cid, count in delete_from(settings.data_dir(args.data_dir), args.chunk_ids).items():
        print(f"deleted {cid}: text, vector and KV under {count} key(s)")
    return 0


def add_parsers(subparsers) -> None:
    ing = subparsers.add_parser("ingest", help="chunk, embed, index and precompute KV for documents")
    source = ing.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", type=Path, help="MuSiQue-shaped JSON file (its passages are ingested)")
    source.add_argument("--docs", type=Path, help="folder of .txt/.md files")
    source.add_argument("--stdin", action="store_true", help='JSON lines {"text", "title", "id"} on stdin')
    add_data_dir(ing)
    ing.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in serving-model tokens")
    ing.add_argument("--batch-size", type=int, default=32, help="chunks embedded and recorded together")
    ing.add_argument("--no-kv", action="store_true", help="text, vectors and index only; no KV precompute")
    ing.add_argument("--limit", type=int, default=None, help="stop after this many documents")
    ing.add_argument("--index", choices=_index_kinds(), default=None,
                     help="faiss index kind (default: keep the existing one, flat for a new one)")
    ing.add_argument("--json", dest="json_out", default=None, help="write the job's figures here")
    ing.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's; 1 is faster on a CPU shared "
                          "with other jobs)")
    ing.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ing.add_argument("--server", default=None,
                     help="send the documents to a running server instead (HOST:PORT, a comma list of replicas "
                          "or dns:///NAME:PORT), through IngestChunks; the server chunks and computes KV")
    ing.add_argument("--token", default=None, help="bearer token for --server (default $KVBLEND_TOKEN)")
    ing.add_argument("--tenant", default=None, help="tenant for --server, on a server without auth")
    add_model_args(ing)
    ing.set_defaults(func=cmd_ingest)

    ret = subparsers.add_parser("retrieve", help="the chunks nearest a query: id, score, first line")
    ret.add_argument("--query", required=True)
    ret.add_argument("-k", type=int, default=5)
    add_data_dir(ret)
    ret.set_defaults(func=cmd_retrieve)

    rm = subparsers.add_parser("delete", help="remove chunks: text, vector and every KV entry")
    rm.add_argument("chunk_ids", nargs="+", metavar="CHUNK_ID")
    add_data_dir(rm)
    rm.set_defaults(func=cmd_delete)
