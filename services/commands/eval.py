"""`kvblend eval` (TTFT and quality of every mode) and `kvblend retrieval-eval` (recall@k)."""

from __future__ import annotations

import argparse
from pathlib import Path

from blend.fusor import BlendConfig
from services import settings
from services.commands.options import add_model_args, model_config


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _ratios(text: str) -> tuple[float, ...]:
    ratios = []
    for item in text.split(","):
        try:
            ratios.append(float(item))
        except ValueError:
            raise ValueError(f"ratio {item!r} in --ratios is not a number") from None
    return tuple(ratios)


def cmd_eval(args: argparse.Namespace) -> int:
    from services.bench.evaluate import EvalConfig, run_eval

    config = EvalConfig(
        dataset=Path(args.dataset), json_out=Path(args.json_out), limit=args.limit, chunks=args.chunks,
        modes=_names(args.modes), ratios=_ratios(args.ratios), selectors=_names(args.selector),
        check_layer=args.check_layer, gradual_layers=args.gradual_layers, max_new_tokens=args.max_new_tokens,
        hf=not args.no_hf, plot=Path(args.plot) if args.plot else None, kv_int8=args.kv_int8,
    )
    run_eval(model_config(args), config)
    return 0


def cmd_retrieval_eval(args: argparse.Namespace) -> int:
    from services.bench.retrieval import run_retrieval_eval

    run_retrieval_eval(args.dataset, settings.data_dir(args.data_dir), model_config(args), args.chunk_tokens,
                       args.limit, args.json_out)
    return 0


def add_eval_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="TTFT and quality of full / prefix / reuse / blend on a MuSiQue-shaped file")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--chunks", type=int, default=None, help="passages per question (default: all)")
    ev.add_argument("--modes", default="full,prefix,reuse,blend")
    ev.add_argument("--ratios", default="0.05,0.15,0.3,1.0")
    ev.add_argument("--selector", default=BlendConfig.selector,
                    help=f"selector(s) for blend, comma-separated (default {BlendConfig.selector}): k, v, qattn, "
                    "k*qattn, each with options "
                    "+sinkN +gmax +coverX +floorY +nofirst (docs/blend.md)")
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


def add_retrieval_eval_parser(subparsers) -> None:
    rev = subparsers.add_parser("retrieval-eval", help="recall@k of ingested MuSiQue-shaped passages")
    rev.add_argument("--dataset", required=True, type=Path)
    rev.add_argument("--data-dir", default=None, help="where the dataset was ingested")
    rev.add_argument("--chunk-tokens", type=int, default=512, help="as given to ingest")
    rev.add_argument("--limit", type=int, default=None, help="first N questions")
    rev.add_argument("--json", dest="json_out", default=None)
    add_model_args(rev)
    rev.set_defaults(func=cmd_retrieval_eval)
