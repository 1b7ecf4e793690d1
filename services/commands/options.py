"""Flags that several commands share, and what they turn into."""

from __future__ import annotations

import argparse

from services.settings import DTYPES, ModelConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (embedded), a .gguf path, a local folder or a Hugging Face id")
    parser.add_argument("--cache-dir", default=None, help="where converted weights live (default ~/.cache/kvblend)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model flags of `add_model_args` (unset --cache-dir: $KVBLEND_CACHE_DIR)."""
    return ModelConfig.resolve(args.model, args.cache_dir, args.dtype, args.device)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="chunk texts, vectors, index and KV (default $KVBLEND_DATA_DIR or ~/.kvblend)")
