"""The `kvblend` command line: argument parsing and error reporting only; work happens elsewhere."""

from __future__ import annotations

import argparse
import logging
import sys

from services.settings import DTYPES, ModelConfig


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (embedded), a .gguf path, a local folder or a Hugging Face id")
    parser.add_argument("--cache-dir", default=None, help="where converted weights live (default ~/.cache/kvblend)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def cmd_generate(args) -> int:
    from services.commands.generate import generate_text

    config = ModelConfig.from_args(args)
    for piece in generate_text(config, args.prompt, args.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_eval(args) -> int:
    from services.bench.evaluate import EvalConfig, run_eval

    config = EvalConfig.from_args(args)
    run_eval(ModelConfig.from_args(args), config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvblend", description="Blend cached chunk KV for fast RAG answers")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt with full prefill and greedy decoding")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="TTFT and quality of full / prefix / reuse / blend on a MuSiQue-shaped file")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--chunks", type=int, default=None, help="passages per question (default: all)")
    ev.add_argument("--modes", default="full,prefix,reuse,blend")
    ev.add_argument("--ratios", default="0.05,0.15,0.3,1.0")
    ev.add_argument("--selector", default="k", help="deviation measure(s) for blend: k (default), v, or k,v")
    ev.add_argument("--check-layer", type=int, default=1)
    ev.add_argument("--gradual-layers", type=int, default=0, help="also run blend with gradual filtering")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--no-hf", action="store_true", help="skip timing the Hugging Face forward")
    ev.add_argument("--kv-int8", action="store_true",
                    help="also run reuse/blend on chunk KV through the store's int8 codec (rows '/int8')")
    ev.add_argument("--json", required=True, dest="json_out")
    ev.add_argument("--plot", default=None)
    add_model_args(ev)
    ev.set_defaults(func=cmd_eval)

    from services import client, ingest
    from services.bench import cluster as bench_cluster
    from services.bench import demo
    from services.bench import gpu as bench
    from services.bench import retrieval as retrieval_eval
    from services.bench import service as bench_service
    from services.bench import store as bench_store
    from services.serving import server

    ingest.add_parsers(sub)
    retrieval_eval.add_parsers(sub)
    server.add_parsers(sub)
    client.add_parsers(sub)
    demo.add_parsers(sub)
    bench.add_parser(sub)
    bench_store.add_parser(sub)
    bench_service.add_parser(sub)
    bench_cluster.add_parser(sub)
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
