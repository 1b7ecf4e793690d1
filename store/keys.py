"""Content addresses: what a chunk's K/V is a function of, hashed; never a caller's name for it.

A chunk key is 64 hex digits. Its entries in the tiers are `<chunk key>:m` (the manifest) and
`<chunk key>:<layer>` (one layer's [T, 2, kv_heads, head_dim] block).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from functools import lru_cache

import torch

from store.codec import FORMAT_VERSION

_KEY = re.compile(r"[0-9a-f]{64}")
MANIFEST = "m"


def chunk_key(fingerprint: str, prefix_ids: Sequence[int], token_ids: Sequence[int],
              dtype: torch.dtype | str) -> str:
    """sha256 of (format version, model fingerprint, dtype, the tokens computed before the chunk, its tokens).

    `prefix_ids` are the tokens the chunk's K/V was computed behind (e.g. the system prompt): the
    same text behind another prefix has other K/V, so another key.
    """
    if not fingerprint:
        raise ValueError("empty model fingerprint (pass LoadedModel.fingerprint)")
    dtype_name = str(dtype).removeprefix("torch.")
    record = [FORMAT_VERSION, fingerprint, dtype_name, [int(i) for i in prefix_ids],
              [int(i) for i in token_ids]]
    return hashlib.sha256(json.dumps(record, separators=(",", ":")).encode()).hexdigest()


def check_chunk_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"chunk key {key!r} is not 64 lowercase hex digits (build it with store.chunk_key)")
    return key


def manifest_key(key: str) -> str:
    return f"{key}:{MANIFEST}"


def layer_key(key: str, layer: int) -> str:
    return f"{key}:{layer}"


@lru_cache(maxsize=8192)
def layer_keys(key: str, n_layers: int) -> tuple[str, ...]:
    """Every layer entry's key of a chunk, built once per chunk (a request asks for them per chunk; with the
    manifests parsed once, `StoreSource` is built in 54 against 191 us on the 2-core CPU,
    docs/ops/cpu_probe_source_s15.txt)."""
    return tuple(layer_key(key, layer) for layer in range(n_layers))


def chunk_of(entry_key: str) -> str:
    """The chunk an entry belongs to: admission counts uses per chunk, not per layer."""
    return entry_key.split(":", 1)[0]


def layer_of(entry_key: str) -> str | None:
    """The chunk key of a layer entry (`<chunk key>:<layer>`); None for a manifest or any other key."""
    chunk, _, layer = entry_key.partition(":")
    return chunk if layer.isdigit() and _KEY.fullmatch(chunk) else None
