"""The fusor: full prefill, prefix caching, full KV reuse and CacheBlend, as one layer loop.

The modes differ only in which positions are computed at which layer and which cached segments are
placed into the buffer first:

    mode    cached segments placed        computed at layer < check   from the check layer on
    full    none                          every token                 every token
    prefix  system prefix + first chunk   the rest                    the rest
    reuse   system prefix + all chunks    the question                the question
    blend   system prefix + all chunks    every chunk + question      top `ratio` chunk tokens + question

Chunk KV comes from a `KVSource`, which yields one layer at a time, so a source may still be loading
layer i + 1 while layer i computes; the fusor never does I/O itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from blend.adapter import LlamaStep
from blend.cache import ChunkKV, KVCache
from blend.decode import settle
from blend.prompt import PromptLayout
from blend.selectors import SCORERS, Selector, adaptive_count, parse_selector, token_scores

MODES = ("full", "prefix", "reuse", "blend")
SELECTORS = SCORERS  # scorer names; a selector may add options, e.g. "qattn+sink4" (blend/selectors.py)


@dataclass(frozen=True)
class BlendConfig:
    mode: str = "blend"
    ratio: float = 0.15
    check_layer: int = 1
    # The question's attention, chunk-start sinks kept, the exactly cached first chunk ranked last: on
    # 40 MuSiQue questions it had under half of K deviation's first-token KL at every ratio, at the
    # same recompute and within 4% of K's GPU TTFT (docs/blend.md). "k" and "v" remain.
    selector: str = "qattn+sink4+nofirst"  # a scorer plus options (blend/selectors.py)
    # Gradual filtering: the kept set starts at min(1, 2 * ratio) at the check layer and shrinks
    # linearly to `ratio` over `gradual_layers` layers, each step ranking by that layer's deviation.
    gradual_layers: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (choose one of {', '.join(MODES)})")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"recompute ratio {self.ratio!r} is outside [0, 1]")
        parse_selector(self.selector)
        if self.check_layer < 1:
            raise ValueError(f"check layer {self.check_layer} must be >= 1 (layer 0 always runs in full)")
        if self.gradual_layers < 0:
            raise ValueError(f"gradual_layers {self.gradual_layers} must be >= 0")
        if parse_selector(self.selector).cached_keys and (self.gradual_layers > 1 or self.check_layer != 1):
            # Only layer 0's K/V depend on a token alone: with a later check layer the layers between would
            # keep placed K/V where blend recomputes every token, another method, not a cheaper ranking.
            raise ValueError("+cachedk ranks once, at check layer 1: it takes no gradual_layers and no later "
                             f"check layer (got check_layer {self.check_layer}, gradual_layers {self.gradual_layers})")

    @property
    def label(self) -> str:
        if self.mode != "blend":
            return self.mode
        suffix = f"/gradual{self.gradual_layers}" if self.gradual_layers else ""
        return f"blend@{self.ratio:g}/{self.selector}{suffix}"

    @property
    def selection(self) -> Selector:
        return parse_selector(self.selector)


class KVSource(Protocol):
    """Cached segments (system prefix first, then chunks in layout order), delivered per layer."""

    starts: Sequence[int]  # the position each segment's K was rotated at when it was computed

    def into(self, data: torch.Tensor, starts: Sequence[int], device_too: bool = True,
             first: int | None = None) -> set[int]:
        """The request's KV buffer ([layers, capacity, 2, kv_heads, head_dim]) and where each segment goes
        in it, before the first `layer`: a source may copy segments straight there; it returns their
        indices, which the fusor then does not place (their blocks from `layer` are views of `data`).
        `device_too` False: the store's GPU-tier segments are left to the fusor (handed over by `layer`).
        `first`: how many layers' copies to start now (None: the source's own choice)."""
        ...

    def layer(self, index: int) -> Sequence[torch.Tensor]:
        """One [T, 2, kv_heads, head_dim] block per segment for this layer, on the compute device."""
        ...

    def ahead(self) -> None:
        """The asked layer's compute is enqueued: a source may start loading later layers now."""
        ...

    def turn_with(self, turner: Callable[[int], None]) -> bool:
        """After `into`, the re-rotation of the segments it placed (`turner(layer)` enqueues a layer's): True where
        the source runs it itself, each layer before handing the layer over; False: the fusor turns each layer."""
        ...


class MemorySource:
    """Chunk KV already in memory on the compute device."""

    def __init__(self, entries: Sequence[ChunkKV | None]):
        self.entries = list(entries)
        self.starts = [entry.start if entry is not None else 0 for entry in self.entries]

    def into(self, data: torch.Tensor, starts: Sequence[int], device_too: bool = True,
             first: int | None = None) -> set[int]:
        return set()  # in memory already: the fusor places each layer by one device-side copy

    def layer(self, index: int) -> list[torch.Tensor | None]:
        return [entry.kv[index] if entry is not None else None for entry in self.entries]

    def ahead(self) -> None:
        pass  # nothing to load

    def turn_with(self, turner: Callable[[int], None]) -> bool:
        return False  # nothing placed: the fusor turns what it places


@dataclass
class Prefill:
    cache: KVCache
    length: int
    logits: torch.Tensor  # first-token logits (the last prompt token's), float32
    recomputed: int  # chunk tokens recomputed from the check layer on


def cached_chunks(mode: str, n_chunks: int) -> int:
    """How many of a prompt's chunks (from the first) a mode places from cache (see the table above)."""
    return {"full": 0, "prefix": min(1, n_chunks), "reuse": n_chunks, "blend": n_chunks}[mode]


def cached_entries(mode: str, prefix: ChunkKV, chunks: Sequence[ChunkKV], layout: PromptLayout) -> list[ChunkKV]:
    """The cached segments a mode places, checked against the layout so a cache never meets wrong text."""
    if tuple(prefix.token_ids) != tuple(layout.prefix):
        raise ValueError("the cached system prefix does not match the prompt's prefix tokens")
    for index, (entry, ids) in enumerate(zip(chunks, layout.chunks)):
        if tuple(entry.token_ids) != tuple(ids):
            raise ValueError(f"cached KV of chunk {index} was computed for other tokens than the prompt's")
    if len(chunks) != len(layout.chunks):
        raise ValueError(f"{len(chunks)} cached chunks for a prompt of {len(layout.chunks)} chunks")
    return ([prefix] + list(chunks))[: (1 + cached_chunks(mode, len(chunks))) if mode != "full" else 0]


def _sent(tensor: torch.Tensor, device) -> torch.Tensor:
    """A small host-built tensor on the compute device without a stream synchronize: a blocking copy from
    pageable memory waits for the GPU to drain (work still queued: another request's decode step, the
    previous layers), a non-blocking one is staged by the driver at once and ordered on the stream."""
    return tensor.to(device, non_blocking=True)


def _place(step: LlamaStep, cache: KVCache, layer: int, blocks, new_starts, turn, unplaced: Sequence[int]) -> None:
    # `unplaced`: the segments the source did not copy into the buffer itself (`KVSource.into`; on a GPU's served
    # path the GPU tier's below PLACE_ASIDE_FROM, else none); None among them: a chunk prefilled in full instead of
    # loaded. One multi-tensor copy: a launch per layer, not one per chunk (on a GPU the step is bound by launches,
    # issue 16).
    pairs = [(cache.data[layer, new_starts[index] : new_starts[index] + blocks[index].shape[0]], blocks[index])
             for index in unplaced if blocks[index] is not None and blocks[index].shape[0]]
    if pairs:
        torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs], non_blocking=True)
    if turn is not None:
        # K was rotated at the positions each chunk was computed at: move every chunk's K to where it
        # sits now, in one pass over the contiguous chunk range (one rotation per layer, not per chunk).
        lo, hi, turning = turn
        step.turn_keys(cache.data[layer, lo:hi, 0], turning)


def _turn(old_starts, new_starts, lengths, skip):
    """(lo, hi, old_new, moving) for re-rotating the placed segments in [lo, hi) by token (`turn_in_place`):
    old_new [2, hi - lo] (int64, numpy) holds each token's position when computed, then now; moving lists the
    segments that moved; None if none moves."""
    moving = [i for i, (old, new) in enumerate(zip(old_starts, new_starts)) if i not in skip and old != new]
    if not moving:
        return None
    lo, hi = new_starts[moving[0]], new_starts[moving[-1]] + lengths[moving[-1]]
    # Built in numpy (a slice assignment a moving segment) and sent with the rest: the request's head is bound
    # by its host time, and two PyTorch calls a segment here were 0.19 ms of it on an H200 host
    # (docs/ops/h200_probe_host_s15b.txt).
    now = np.arange(lo, hi)
    shift = np.zeros(hi - lo, dtype=np.int64)
    for i in moving:
        shift[new_starts[i] - lo : new_starts[i] - lo + lengths[i]] = new_starts[i] - old_starts[i]
    return lo, hi, np.stack((now - shift, now)), moving


def _send_all(device, ints: Sequence[np.ndarray], floats: np.ndarray | None = None):
    """Host-built int64 arrays and one float32 array on the device by one copy: (views of the int64 ones, in order;
    the float32 one's view, or None). A request's set-up sends several small index and rank arrays, each copy is a
    host-side call on its critical path, and they are built in numpy, not PyTorch (with the packed token ids, the
    served shape's set-up on the meta device: 1,170 against 1,330 us on the 2-core CPU, `python3 -m
    services.bench.probe_head --time`, docs/ops/cpu_probe_head_s16.txt)."""
    parts = [np.ascontiguousarray(a, dtype=np.int64) for a in ints]
    flat = [a.reshape(-1) for a in parts]
    if floats is not None:  # its bytes as int64 words (padded to a whole one): the device view reads them back
        floats = np.ascontiguousarray(floats, dtype=np.float32).reshape(-1)
        flat.append(np.concatenate((floats, np.zeros(floats.size % 2, np.float32))).view(np.int64))
    # Each part padded to an even count of words, so every view starts 16-byte aligned: a Triton kernel is compiled
    # per argument alignment (the re-rotation's positions at an odd word compiled a second variant on a request).
    sizes = [a.size for a in flat]
    padded = [a if a.size % 2 == 0 else np.concatenate((a, np.zeros(1, np.int64))) for a in flat]
    sent = _sent(torch.from_numpy(np.concatenate(padded)), device).split([a.size for a in padded])
    views = [part[:size].view(a.shape) for part, size, a in zip(sent, sizes, parts)]
    return views, sent[-1].view(torch.float32)[: floats.size] if floats is not None else None


def _shared(step: LlamaStep, positions: torch.Tensor, n: int, cache: KVCache, start: int | None = None):
    """(mask, rope) for steps over `positions` of `cache`, made once and shared by the layers that compute them;
    (None, None) where whole-layer graphs run those steps (positions alone fix the mask and the rotation inside;
    a step that needs either, e.g. the check layer's q/k/v, makes its own): ~3 launches fewer, twice, in a
    request's host-bound head."""
    if step.graphs is not None and step.graphs.pooled_for(positions.shape[0], cache):
        return None, None
    return step.mask(positions, n, cache.capacity, start=start), step.cos_sin(positions)


def _schedule(config: BlendConfig, n_layers: int) -> dict[int, float]:
    """Layer -> fraction of chunk tokens kept from that layer on (blend only)."""
    if config.mode != "blend":
        return {}
    if config.check_layer >= n_layers:
        raise ValueError(f"check layer {config.check_layer} is past the model's last layer {n_layers - 1}")
    if config.gradual_layers <= 1:
        return {config.check_layer: config.ratio}
    start, end = min(1.0, 2 * config.ratio), config.ratio
    steps = min(config.gradual_layers, n_layers - config.check_layer)
    return {
        config.check_layer + s: start + (end - start) * s / max(1, steps - 1) for s in range(steps)
    }


# With +cachedk layer 0 (the check layer is 1) runs the positions never dropped alone (the question, chunks prefilled
# in full): the GPU has next to nothing queued, so the source's `ahead` there (issuing later layers' copies) would sit
# on the request's critical path, the host's head (docs/gpu.md, sixteenth session). The copies `KVSource.into` started
# cover the head; the check layer's `ahead` follows the kept tokens' steps. True: `ahead` after every layer (the
# bench's /early-ahead rows).
AHEAD_BEFORE_CHECK = False

# Chunks the source finds in GPU memory are placed by the source (copied into the request's buffer on its copy stream
# and their keys turned aside, `KVSource.into`'s device_too; StoreSource.PLACE_DEVICE) where blend recomputes at least
# this share of the chunk tokens, else by the fusor on the compute stream ahead of each layer. Aside, the placing
# leaves the compute stream but costs the host the source's per-layer issuing: at 0.15 the GPU-bound request gained
# (1.027 and 1.028 the fusor placing them, two H100 runs, docs/gpu.md twentieth session), at 0.05 the host-bound one
# lost (0.985, 0.956). The bench's `/placed-aside` and `/placed-inline` rows pair the two at both ratios.
PLACE_ASIDE_FROM = 0.15

# Below PLACE_ASIDE_FROM the request is bound by its copies (blend@0.05 on an H200: a layer's compute ~0.365 ms against
# its copy's ~0.385): there `into` may start more layers' copies at once (looked up in one pass, and each later
# lookup pass of the request covering as many) than the source's own two, so the copy stream does not idle while the
# host sets up and ranks, at the cost of that host time in the head.
# Which wins was measured per machine, so it is chosen by the card's name (a table, as tuned kernel configs are; a
# card not named: the source's own): on the H200 four won at 0.05 in three runs (1.046 in s23a, 1.044 and 1.051 in
# s25a/b, the bench's `/four-first` rows) and lost at 0.15 (0.964, 0.963, 0.962); on the H100 four lost at 0.05 in
# three runs (the bench's `/two-first` rows 1.041, 1.049, 1.079 of it, s25d-f; docs/gpu.md twenty-first session).
COPY_BOUND_FIRST: dict[str, int] = {"NVIDIA H200": 4}


def _card_name(device: torch.device) -> str | None:
    """The CUDA card's name (`torch.cuda.get_device_name`, once a device: the head is host-bound), None off CUDA."""
    if device.type != "cuda":
        return None
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


_cuda_name = functools.cache(torch.cuda.get_device_name)


def _copy_bound_first(device: torch.device) -> int | None:
    """The layers `into` starts where blend is bound by its copies, on this device (COPY_BOUND_FIRST); None: the
    source's own."""
    name = _card_name(device)
    return COPY_BOUND_FIRST.get(name) if name is not None else None

# A computed token's fixed rank where it has one (`_ranks`): never dropped, a chunk-start sink, the first chunk.
NEVER_DROPPED, SINK, EXACT = float("inf"), torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max


def _ranks(n: int, always: Sequence[slice], sinks: Sequence[slice], exact: slice | None) -> np.ndarray:
    """[n] float32 on the host (numpy): each position's fixed score, NaN where its own score ranks it. Never dropped
    (the question, chunks prefilled in full) above all; chunk-start sinks above every other chunk token (they
    take the budget first); the exactly cached first chunk below all (ranked last); a sink in the first chunk
    is ranked last. One tensor the ranking applies in one `where`, not three masks and as many passes."""
    ranks = np.full(n, np.nan, dtype=np.float32)
    for span in sinks:
        ranks[span] = SINK
    if exact is not None:
        ranks[exact] = EXACT
    for span in always:
        ranks[span] = NEVER_DROPPED
    return ranks


def _keep(selection: Selector, score, mass, ranks, n_candidates: int, n_always: int, ceiling: int):
    """Indices (sorted) of the computed tokens kept: every non-candidate, then the best candidates.

    `score` already holds the fixed `ranks` (non-candidates at +inf). The fixed budget needs no device value on
    the host. The adaptive one reads its count once (the kept set's size sets every later layer's shapes); it
    stays between floor x ceiling and ceiling, and applies only where the ceiling drops tokens, so ratio 1
    still recomputes every chunk token.
    """
    ceiling = min(n_candidates, ceiling)
    budget = ceiling
    if selection.coverage and 0 < ceiling < n_candidates:
        floor = round(selection.floor * ceiling)
        # The first chunk's attention mass is not counted towards the coverage.
        mass = torch.where(ranks == EXACT, 0.0, mass)
        count = adaptive_count(score, mass, ranks != NEVER_DROPPED, selection.coverage).clamp(floor, ceiling)
        settle(count)  # the wait with the GIL released (the host reads it next)
        budget = int(count)
    return torch.topk(score, budget + n_always).indices.sort().values


def prefill(step: LlamaStep, layout: PromptLayout, config: BlendConfig, source: KVSource | None,
            capacity: int | None = None, recompute: Sequence[int] = ()) -> Prefill:
    """Fill a KV buffer for the whole prompt under `config.mode` and return the first-token logits
    (`prefill_layers` run to the end)."""
    layers = prefill_layers(step, layout, config, source, capacity, recompute)
    while True:
        try:
            next(layers)
        except StopIteration as done:
            return done.value


def prefill_layers(step: LlamaStep, layout: PromptLayout, config: BlendConfig, source: KVSource | None,
                   capacity: int | None = None, recompute: Sequence[int] = ()) -> Generator[int, None, Prefill]:
    """`prefill` as a generator that yields each layer's index once that layer is done, and returns the
    `Prefill`: a caller can stop between layers (a deadline) or let other work run (chunked prefill).

    `recompute` (blend only) lists chunks prefilled in full instead of loaded (the loading
    controller's fallback for chunks that load slower than they compute); the source may yield None
    for them, and its start for them is ignored.
    """
    n = len(layout)
    if not layout.suffix:
        raise ValueError("the prompt layout has no question tokens")
    capacity = max(capacity or n, n)
    device = step.device
    cache = step.new_cache(capacity)
    question_start = n - len(layout.suffix)
    segment_starts = [0] + layout.chunk_starts()
    old_starts = list(source.starts) if source is not None else []
    new_starts = segment_starts[: len(old_starts)]
    boundaries = segment_starts + [question_start]
    lengths = [boundaries[i + 1] - boundaries[i] for i in range(len(old_starts))]
    forced = sorted(set(recompute))
    if forced and (config.mode != "blend" or forced[0] < 0 or forced[-1] >= len(layout.chunks)):
        raise ValueError(f"recompute chunks {forced} need blend mode and indices below {len(layout.chunks)}")
    skip = {1 + index for index in forced}
    aside = config.mode == "blend" and config.ratio >= PLACE_ASIDE_FROM
    first_layers = _copy_bound_first(cache.data.device) if config.mode == "blend" and not aside else None
    # First: the copies start now.
    placed = source.into(cache.data, new_starts, aside, first_layers) if source is not None else set()
    unplaced = [index for index in range(len(new_starts)) if index not in placed]
    moving = _turn(old_starts, new_starts, lengths, skip)  # the same for every layer
    covered = boundaries[len(old_starts)]  # prompt tokens the placed segments fill
    schedule = _schedule(config, step.n_layers)
    if config.mode == "blend":
        if len(old_starts) != 1 + len(layout.chunks):
            raise ValueError("blend needs the cached system prefix and every chunk's KV")
        first = len(layout.prefix)  # the system prefix sits where it was computed: its cache is exact
    else:
        first = covered
    positions = torch.arange(first, n, device=device)
    n_chunk_tokens = question_start - len(layout.prefix) - sum(lengths[s] for s in skip)
    n_candidates = n_chunk_tokens  # computed chunk tokens the selection may drop, tracked on the host
    selection = config.selection if config.mode == "blend" else None
    # The positions' fixed ranks (`_ranks`), built on the host and sent in one copy (a GPU request's set-up is
    # bound by host calls: not one per chunk); blend only.
    ranks = None
    if selection is not None:
        ranks = _ranks(n, [slice(question_start, n)] + [slice(boundaries[s], boundaries[s + 1]) for s in skip],
                       [slice(start, start + selection.sinks) for start in layout.chunk_starts()]
                       if selection.sinks else [],
                       slice(len(layout.prefix), len(layout.prefix) + len(layout.chunks[0]))
                       if selection.skip_first and layout.chunks else None)
    early = selection is not None and selection.cached_keys
    # Before the check layer, with +cachedk, only the positions never dropped run (the question, chunks
    # prefilled in full): the others' placed layer-0 K/V are exact (a token's own), and past layer 0 their
    # placed K/V are what blend keeps for every token it does not recompute. The kept ones join them from the
    # embedding once chosen (below). Positions on the host: no device read to find them.
    fixed = (np.concatenate([np.arange(boundaries[s], boundaries[s + 1]) for s in sorted(skip)]
                            + [np.arange(question_start, n)]) if early else np.zeros(0, dtype=np.int64))
    # The request's host-built numbers in one copy: token ids, the fixed positions and their rows among the
    # computed ones, the placed tokens' positions then and now (for their re-rotation) and the ranks. The prompt's
    # ids from the chunks' packed ids (`PromptLayout.packed_ids`), not torch.tensor of a list (687 us for 6,217 ids on
    # a 2-core CPU, docs/ops/cpu_probe_prompt_s13.txt).
    token_ids = layout.packed_ids()
    ints = [token_ids, fixed, fixed - first] + ([moving[2]] if moving is not None else [])
    (ids, fixed, rows, *old_new), ranks = _send_all(device, ints, ranks)
    turn = None
    if moving is not None:
        lo, hi, _, moved = moving
        turning = step.turning(old_new[0])
        turn = (lo, hi, turning)
        # Where the source placed every moving segment itself, it may re-rotate them too, each layer once its copies
        # are done, off the compute stream (`StoreSource.turn_with`): then no layer's `_place` turns them.
        if source is not None and all(index in placed for index in moved) and source.turn_with(
                lambda layer: step.turn_keys(cache.data[layer, lo:hi, 0], turning)):
            turn = None
    if early:
        computing, positions = positions, fixed
        h = step.embed(ids[positions])
        mask, rope = _shared(step, positions, n, cache)
    else:
        h = step.embed(ids[first:])
        mask, rope = _shared(step, positions, n, cache, start=first)
    # Once a layer's compute is enqueued, the source may issue later layers' loads (`KVSource.ahead`): the host does
    # that while the GPU works, not before the layer's launches.
    ahead = source.ahead if source is not None else (lambda: None)
    for layer in range(step.n_layers):
        if source is not None:
            _place(step, cache, layer, source.layer(layer), new_starts, turn, unplaced)
        if layer not in schedule:
            h = step.step(layer, h, positions, cache, n, mask, rope)
            if not early or AHEAD_BEFORE_CHECK:
                ahead()
            yield layer
            continue
        q, k, v = step.qkv(layer, h, positions, rope)
        if early:
            # The question's fresh q against every position's K at this layer: the placed (cached) one
            # for chunk tokens not computed yet, the fresh one for the rest; ranked as usual below.
            # (`computing` is first..n-1: slices, not gathers, here and for the masks below.)
            # The fixed positions' fresh K written where the step would write it (it rewrites the same below):
            # the layer's keys then are a view of the buffer, not a copy of every placed one.
            keys = cache.data[layer, first:n, 0]
            keys[rows] = k
            score, mass = token_scores(selection, q, keys, None, cache.data[layer], computing, len(layout.suffix),
                                       step.scale, step.question_kernel)
            ranked, at = computing, slice(first, n)
        else:
            score, mass = token_scores(selection, q, k, v, cache.data[layer], positions, len(layout.suffix),
                                       step.scale, step.question_kernel)
            ranked = at = positions
        fixed_rank = ranks[at]
        score = torch.where(fixed_rank.isnan(), score, fixed_rank)
        n_always = ranked.shape[0] - n_candidates
        keep = _keep(selection, score, mass, fixed_rank, n_candidates, n_always,
                     round(schedule[layer] * n_chunk_tokens))
        n_candidates = keep.shape[0] - n_always
        if early:
            early = False
            # The kept chunk tokens and the fixed positions run every layer up to this one together, from the
            # embedding (the fixed ones again: their layer-0 K/V are a token's own, rewritten equal, and this
            # layer's q/k/v scored above are recomputed): whole steps, one graph each where graphs are on,
            # instead of catching the kept ones up apart and merging them in. Ratio 1 is full prefill.
            positions = ranked[keep]
            h = step.embed(ids[positions])
            mask, rope = _shared(step, positions, n, cache)
            for before in range(layer + 1):
                h = step.step(before, h, positions, cache, n, mask, rope)
            ahead()
            yield layer
            continue
        h, q, k, v, positions = h[keep], q[keep], k[keep], v[keep], positions[keep]
        mask, rope = _shared(step, positions, n, cache)
        cache.write(layer, positions, k, v)
        h = step.attend(layer, h, q, positions, cache, n, mask)
        ahead()
        yield layer
    recomputed = (positions < question_start).sum()
    logits = step.logits(h[-1])  # queued behind the last layer before the host waits (no idle GPU in between)
    settle(recomputed)  # the GPU is still on the last layers: wait with the GIL released
    return Prefill(cache=cache, length=n, logits=logits, recomputed=int(recomputed))


def compute_kv(step: LlamaStep, token_ids: Sequence[int], behind: ChunkKV | None = None) -> ChunkKV:
    """Per-layer K/V of `token_ids` computed on their own, right behind `behind` (e.g. the system prefix).

    The prefix's own K/V are dropped from the result; the chunk's K stays rotated at the positions it
    was computed at, recorded as `start`, so it can be re-rotated exactly to any new offset.
    """
    start = len(behind) if behind is not None else 0
    count = len(token_ids)
    cache = step.new_cache(start + count)
    if behind is not None and start:
        cache.data[:, :start].copy_(behind.kv)
    if count:
        positions = torch.arange(start, start + count, device=step.device)
        h = step.embed(torch.tensor(list(token_ids), device=step.device))
        for layer in range(step.n_layers):
            h = step.step(layer, h, positions, cache, start + count)
    return ChunkKV(token_ids=tuple(token_ids), start=start, kv=cache.data[:, start : start + count].clone())
