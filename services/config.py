"""Configuration, built once at the edge from CLI flags and the environment, passed inward frozen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    spec: str = "smollm2-135m"
    cache_dir: Path = Path("~/.cache/kvblend").expanduser()
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} (choose one of {', '.join(DTYPES)})")

    @classmethod
    def from_args(cls, args) -> "ModelConfig":
        cache_dir = args.cache_dir or os.environ.get("KVBLEND_CACHE_DIR") or "~/.cache/kvblend"
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(spec=args.model, cache_dir=Path(cache_dir).expanduser(), dtype=args.dtype, device=device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
