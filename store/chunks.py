"""Chunks as store entries: one manifest plus one entry per layer, so layers can be read one at a time.

The manifest (token ids, start, layer count, block shape, dtype) is written after every layer, so a
reader that finds it can expect the layers; if one of them has since been evicted or found corrupt
the chunk is a miss, never a partial answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from blend.cache import ChunkKV
from store.codec import CODE_DTYPES, DTYPE_CODES
from store.config import StoreConfig
from store.keys import check_chunk_key, layer_key, layer_keys, layer_of, manifest_key
from store.open import open_tiered
from store.tiered import TieredStore

log = logging.getLogger(__name__)

Compute = Callable[[int], ChunkKV]  # index of the chunk in the request -> its K/V computed on its own


@dataclass(frozen=True)
class Manifest:
    token_ids: tuple[int, ...]
    start: int
    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @cached_property
    def block_shape(self) -> tuple[int, int, int, int]:
        return (len(self.token_ids), 2, self.kv_heads, self.head_dim)

    @classmethod
    def of(cls, chunk: ChunkKV) -> "Manifest":
        kv = chunk.kv
        if kv.dim() != 5 or kv.shape[1] != len(chunk.token_ids) or kv.shape[2] != 2:
            raise ValueError(f"chunk K/V of shape {list(kv.shape)} is not [n_layers, {len(chunk.token_ids)} "
                             f"tokens, 2, kv_heads, head_dim]")
        if kv.dtype not in DTYPE_CODES:
            raise ValueError(f"chunk K/V dtype {kv.dtype} is not storable (use one of {list(DTYPE_CODES)})")
        return cls(tuple(chunk.token_ids), chunk.start, kv.shape[0], kv.shape[3], kv.shape[4], kv.dtype)

    def to_tensor(self) -> torch.Tensor:
        head = [self.start, self.n_layers, self.kv_heads, self.head_dim, DTYPE_CODES[self.dtype]]
        return torch.tensor(head + list(self.token_ids), dtype=torch.int64)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "Manifest":
        values = tensor.tolist() if tensor.dtype == torch.int64 and tensor.dim() == 1 else []
        if len(values) < 5 or values[4] not in CODE_DTYPES:
            raise ValueError(f"not a chunk manifest: {tensor.dtype} tensor of shape {list(tensor.shape)}")
        start, n_layers, kv_heads, head_dim, code = values[:5]
        return cls(tuple(values[5:]), start, n_layers, kv_heads, head_dim, CODE_DTYPES[code])


class ChunkStore:
    """Whole chunks and single layers of chunks, over a `TieredStore`. Thread-safe."""

    # Parsed manifests kept by chunk with the stored tensor they were parsed from (`_manifest`): a request's
    # chunks and then some (~18 KB each for 512 tokens: the ids as Python ints), the oldest dropped first.
    PARSED_MAX = 512

    def __init__(self, tiered: TieredStore):
        self.tiered = tiered
        self._parsed: dict[str, tuple[torch.Tensor, Manifest]] = {}
        self._parsed_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: StoreConfig) -> "ChunkStore":
        """Over the tiers `config` asks for (`store.open` builds them)."""
        return cls(open_tiered(config))

    def put(self, key: str, chunk: ChunkKV) -> bool:
        """Store every layer, then the manifest; False if some entry could not be stored, logged once for
        the chunk (a tier that is full or down refuses every layer alike)."""
        manifest = Manifest.of(chunk)
        check_chunk_key(key)
        described = manifest.to_tensor()
        failures = [self.tiered.try_put(layer_key(key, i), chunk.kv[i]) for i in range(manifest.n_layers)]
        failures.append(self.tiered.try_put(manifest_key(key), described))
        if not any(failures):
            # A memory tier with free room for the whole chunk gets a copy too, whatever its uses (admission decides
            # what a tier evicts, not what fills its free room): an ingested corpus that fits the CPU tier is read from
            # there from its first request, and still kept where admission put it (disk, Redis: across restarts).
            # All the chunk's entries or none, evicting nothing.
            self.tiered.copy_into_room([(layer_key(key, i), chunk.kv[i]) for i in range(manifest.n_layers)]
                                       + [(manifest_key(key), described)])
        failed = [failure for failure in failures if failure is not None]
        if failed:
            log.warning("store: chunk %s: %d of its %d entries (layers and manifest) were not stored (first: "
                        "not stored %s)", key, len(failed), len(failures), failed[0])
        return not failed

    def sweep_orphans(self, idle_s: float) -> int:
        """Delete, from every tier, the layers of chunks that have no manifest in any tier and have been idle
        in a persistent tier (disk, Redis) for at least `idle_s` seconds: left by an ingest that died or
        failed between its layers and its manifest, or by a manifest evicted alone. Nothing reads them (a
        reader starts at the manifest) and nothing would delete them. The age rule spares an ingest still
        writing: its layers are seconds old when its manifest is written. Nothing is swept while a tier does
        not answer. Returns how many layer keys were deleted (each from every tier)."""
        if not all(tier.available for tier in self.tiered.tiers):
            return 0  # a manifest may be in the tier that does not answer
        deleted = 0
        for tier in self.tiered.tiers:
            if tier.volatile:
                continue
            layers: dict[str, list[str]] = {}
            for entry in tier.idle_entries(idle_s):
                chunk = layer_of(entry)
                if chunk is not None:
                    layers.setdefault(chunk, []).append(entry)
            for chunk, entries in layers.items():
                if self.tiered.contains(manifest_key(chunk)):
                    continue
                for entry in entries:
                    self.tiered.delete(entry)
                deleted += len(entries)
                log.info("store: deleted %d layer entries of chunk %s from %s: no manifest in any tier and idle "
                         "for %.0f s or more", len(entries), chunk, tier.name, idle_s)
        return deleted

    def manifest(self, key: str) -> Manifest | None:
        """The chunk's manifest; each call counts as one use of the chunk for admission."""
        self.tiered.note_use(check_chunk_key(key))
        return self._manifest(key)

    def contains(self, key: str, bottom_only: bool = False) -> bool:
        """Manifest and every layer are in some tier (`bottom_only`: in the bottom tier, which replicas
        share). Counts no use, so ingestion can ask freely."""
        manifest = self._manifest(check_chunk_key(key))
        return (manifest is not None and self.tiered.contains(manifest_key(key), bottom_only)
                and all(self.tiered.contains(layer_key(key, index), bottom_only)
                        for index in range(manifest.n_layers)))

    def delete(self, key: str) -> None:
        """Every entry of the chunk from every tier; the manifest last, so a delete cut short can be rerun."""
        manifest = self._manifest(check_chunk_key(key))
        if manifest is not None:
            for index in range(manifest.n_layers):
                self.tiered.delete(layer_key(key, index))
        self.tiered.delete(manifest_key(key))

    def delete_local(self, key: str, n_layers: int) -> None:
        """Every entry of the chunk from this replica's own tiers, not from the bottom tier replicas share
        (another replica deleted it there, and may have written it anew since)."""
        for tier in self.tiered.tiers[:-1]:
            for entry in [manifest_key(check_chunk_key(key)), *(layer_key(key, i) for i in range(n_layers))]:
                self.tiered.drop(tier.name, entry)

    def _manifest(self, key: str) -> Manifest | None:
        value = self.tiered.get(manifest_key(key))
        if value is None:
            return None
        # A memory tier hands back the tensor it holds: parsed once, not per request (`store.manifest` took 27.8 us
        # on an H200 host, docs/ops/h200_probe_host_s15b.txt).
        # Kept with that tensor and used only for that very object, so a manifest written anew (another
        # tensor) or read from disk or Redis (a new tensor each time) is parsed again.
        parsed = self._parsed.get(key)
        if parsed is not None and parsed[0] is value:
            return parsed[1]
        try:
            manifest = Manifest.from_tensor(value)
        except ValueError as err:
            log.warning("store: manifest of chunk %s is unreadable (%s); treated as a miss", key, err)
            return None
        with self._parsed_lock:
            if len(self._parsed) >= self.PARSED_MAX:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[key] = (value, manifest)
        return manifest

    def layer(self, key: str, manifest: Manifest, index: int) -> torch.Tensor | None:
        """One layer's [T, 2, kv_heads, head_dim] block; None if missing or not fitting the manifest."""
        return self.layer_from(key, manifest, index)[0]

    def layer_from(self, key: str, manifest: Manifest, index: int) -> tuple[torch.Tensor | None, str | None]:
        """`layer`, and the name of the tier that served it."""
        if not 0 <= index < manifest.n_layers:
            raise ValueError(f"layer {index} is outside the chunk's {manifest.n_layers} layers")
        block, tier = self.tiered.get_from(layer_keys(key, manifest.n_layers)[index])
        return self._fits(key, manifest, index, block, tier)

    def layers_from(self, chunks: Sequence[tuple[str, Manifest]],
                    index: int) -> list[tuple[torch.Tensor | None, str | None]]:
        """`layer_from` of one layer of several chunks, each tier asked once for all of them."""
        return self.blocks_from(chunks, [index])[0]

    def blocks_from(self, chunks: Sequence[tuple[str, Manifest]],
                    layers: Sequence[int]) -> list[list[tuple[torch.Tensor | None, str | None]]]:
        """`layers_from` of several layers at once (per layer, per chunk), each tier asked once for all of them: a
        request's source looks a few layers of every chunk up in one pass, not one pass a layer."""
        for _, manifest in chunks:
            for index in layers:
                if not 0 <= index < manifest.n_layers:
                    raise ValueError(f"layer {index} is outside the chunk's {manifest.n_layers} layers")
        every = [layer_keys(key, manifest.n_layers) for key, manifest in chunks]
        found = iter(self.tiered.get_many_from([keys[index] for index in layers for keys in every]))
        return [[self._fits(key, manifest, index, *next(found)) for key, manifest in chunks] for index in layers]

    def _fits(self, key: str, manifest: Manifest, index: int, block: torch.Tensor | None,
              tier: str | None) -> tuple[torch.Tensor | None, str | None]:
        if block is None:
            return None, None
        if tuple(block.shape) != manifest.block_shape or block.dtype != manifest.dtype:
            log.warning("store: layer %d of chunk %s is %s %s, its manifest says %s %s; a miss",
                        index, key, block.dtype, list(block.shape), manifest.dtype,
                        list(manifest.block_shape))
            return None, None
        return block, tier

    def get(self, key: str, device: str | torch.device = "cpu") -> ChunkKV | None:
        """The whole chunk on `device`, or None if its manifest or any layer is missing."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        kv = torch.empty((manifest.n_layers, *manifest.block_shape), dtype=manifest.dtype, device=device)
        for index in range(manifest.n_layers):
            block = self.layer(key, manifest, index)
            if block is None:
                return None
            kv[index].copy_(block)
        return ChunkKV(token_ids=manifest.token_ids, start=manifest.start, kv=kv)

    def get_or_compute(self, keys: Sequence[str], compute: Compute,
                       device: str | torch.device = "cpu") -> list[ChunkKV]:
        """Each chunk looked up on its own; a missing one is computed by `compute(index)` and written back."""
        chunks = []
        for index, key in enumerate(keys):
            chunk = self.get(key, device)
            if chunk is None:
                chunk = compute(index)
                self.put(key, chunk)
            chunks.append(chunk)
        return chunks
