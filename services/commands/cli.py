"""The `kvblend` command line: the parser of every command group, and error reporting; the work happens
in the library modules that each group's handlers call."""

from __future__ import annotations

import argparse
import logging
import sys

from services.commands import bench, demo, generate, ingest, query, serve
from services.commands import eval as eval_


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvblend", description="Blend cached chunk KV for fast RAG answers")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (generate.add_parsers, eval_.add_eval_parser, ingest.add_parsers, eval_.add_retrieval_eval_parser,
                serve.add_parsers, query.add_parsers, demo.add_parsers, bench.add_parsers):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    from blend.adapter import UnsupportedModel
    from blend.loader import ModelSpecError

    try:
        return args.func(args)
    except (ModelSpecError, UnsupportedModel, ValueError, OSError, RuntimeError) as err:
        print(f"kvblend: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
