"""`kvblend generate`: one prompt, full prefill through the per-layer step, then greedy decoding."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from blend.decode import greedy, stop_token_ids
from blend.fusor import BlendConfig, prefill
from blend.loader import load
from blend.prompt import build_layout
from services.commands.options import add_model_args, model_config
from services.settings import ModelConfig


def generate_text(config: ModelConfig, prompt: str, max_new_tokens: int) -> Iterator[str]:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    model = load(config.spec, config.cache_dir, config.torch_dtype, config.device)
    layout = build_layout(model.tokenizer, [], prompt, system=None)
    with torch.inference_mode():
        filled = prefill(model.step, layout, BlendConfig(mode="full"), None, len(layout) + max_new_tokens)
        tokens: list[int] = []
        shown = ""
        for token in greedy(model.step, filled.cache, filled.length, filled.logits, max_new_tokens,
                            stop_token_ids(model.tokenizer, model.step.config)):
            tokens.append(token)
            text = model.tokenizer.decode(tokens, skip_special_tokens=True)
            yield text[len(shown):]
            shown = text


def cmd_generate(args: argparse.Namespace) -> int:
    for piece in generate_text(model_config(args), args.prompt, args.max_new_tokens):
        print(piece, end="", flush=True)
    print()
    return 0


def add_parsers(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="answer one prompt with full prefill and greedy decoding")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    add_model_args(gen)
    gen.set_defaults(func=cmd_generate)
