"""The one `KVSource` (blend.fusor) of every request: segments' K/V delivered one layer at a time,
each from wherever it is, on any device.

A segment is a store key or a `ChunkKV` already in memory (the system prefix). Per layer:

- an entry already on the compute device (the GPU tier, an in-memory segment, a chunk just computed)
  is handed over in place, no copy, for the fusor to place; where the fusor asks (`into`'s device_too, from
  blend's fusor.PLACE_ASIDE_FROM on), the GPU tier's are copied into the request's buffer by this source on its
  copy stream instead (PLACE_DEVICE);
- an entry in host memory (the CPU tier, pinned on a CUDA machine) is copied as one contiguous
  asynchronous DMA per segment and layer, on a side copy stream, straight into the request's KV buffer
  (`into`, which the fusor calls once it has the buffer): no staging buffer, no device-side placement
  copy, and no buffer to recycle, so the copies run back to back from the first layer to the last
  while the compute stream works (a few layers are issued per `layer` call, so the host never spends
  a long spell issuing); a source read without `into` copies into a device buffer of its own. Where
  every such segment is read from a memory tier, a copy plan (`_plan`) looks a few layers of them up in
  one pass and lays each layer's copies out ahead, so issuing a layer is one runtime call;
- an entry in a slow tier (disk, Redis) is read by a prefetch thread `depth` layers ahead, one batch
  per layer for all such segments (from Redis pipelined GETs over a few sockets, received straight
  into pinned memory), then copied the same way (issued ahead only once read: the host never waits
  for a read the compute does not need yet).

Ordering is by CUDA events only, never a device-wide synchronize: the copy stream waits for the
buffer's allocation (an event on the compute stream at `into`), `ready[layer]` (copy stream, after
the layer's copies) is waited on by the compute stream before the fusor reads the layer, and `close`
makes the compute stream wait for every issued copy, so a buffer given back (a request dropped
mid-prefill) is never reused under a copy still writing it. On a CPU device the same object runs
without streams and hands host blocks over as they are.

A segment missing from the store (no manifest) is computed on its own by the `compute` callback,
used and written back; one whose manifest does not hold the tokens the prompt expects (a forged or
stale entry) is treated the same way; a layer that went missing after the manifest was read
(evicted, corrupt) makes that segment recompute, so the fusor never gets a partial or wrong segment.
Segments the loading controller chose to recompute in full instead (`begin(skip=...)`) are never
read: the fusor gets None for them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from blend.cache import ChunkKV
from store import dma
from store.chunks import ChunkStore, Manifest
from store.keys import layer_keys

log = logging.getLogger(__name__)

Compute = Callable[[int], ChunkKV]  # index of the segment -> its K/V computed on its own
Segment = str | ChunkKV  # a store key, or K/V already in memory


class MissingChunk(LookupError):
    pass


@dataclass
class LoadStats:
    """What one request's loading did: where each segment came from and what it cost."""

    tiers: list[str | None] = field(default_factory=list)  # per segment: the tier its layers came from
    read_s: dict[str, float] = field(default_factory=dict)  # per tier: host seconds in reads
    read_bytes: dict[str, int] = field(default_factory=dict)  # per tier: bytes read
    copy_bytes: int = 0  # bytes copied host -> device
    copy_s: float = 0.0  # GPU seconds the copy stream spent on them (CUDA only; after `finish`)
    host_wait_s: float = 0.0  # the fusor's thread blocked waiting for a prefetched layer
    stall_s: float = 0.0  # GPU seconds the compute stream waited for a copy (CUDA only; after `finish`)
    stalled_layers: int = 0  # layers whose compute waited on their copy (more than 50 us)
    computed: dict[int, str] = field(default_factory=dict)  # segment -> why it was computed on its own


def _recorded(stream: torch.cuda.Stream, timing: bool = False) -> torch.cuda.Event:
    """A new event recorded on `stream` now (`timing`: one `elapsed_time` can read)."""
    event = torch.cuda.Event(enable_timing=timing)
    event.record(stream)
    return event


def layer_views(data: torch.Tensor, starts: Sequence[int], lengths: Sequence[int],
                indices: Sequence[int]) -> Callable[[int], dict[int, torch.Tensor]]:
    """layer -> {segment index: the view of data[layer] it lands in} for the segments `indices` (segment i at
    starts[i], lengths[i] tokens). Where those segments sit back to back (a prompt's chunks do), a layer's
    views are one slice split (three view calls, where a view each took a slice per segment: ~9 against
    ~23 us a layer of 11 segments on a 2-core CPU, `python3 -m services.bench.probe_source`)."""
    order = sorted(indices, key=lambda i: starts[i])
    if order and all(starts[b] == starts[a] + lengths[a] for a, b in zip(order, order[1:])):
        lo, hi = starts[order[0]], starts[order[-1]] + lengths[order[-1]]
        sizes = [lengths[i] for i in order]
        return lambda layer: dict(zip(order, data[layer, lo:hi].split(sizes)))
    return lambda layer: {i: data[layer, starts[i] : starts[i] + lengths[i]] for i in order}


class StoreSource:
    """Segments (system prefix first, then chunks in layout order); use `begin`, then read every layer."""

    # Tiers read on the prefetch thread; every other tier is a memory lookup done inline.
    SLOW_TIERS = ("disk", "redis")

    def __init__(self, store: ChunkStore, segments: Sequence[Segment], compute: Compute | None = None,
                 device: str | torch.device = "cpu", expected: Sequence[Sequence[int] | None] | None = None,
                 depth: int = 2, timeline: bool = False):
        """`expected[i]`: the token ids segment i must hold (its manifest is checked against them). `timeline`:
        record every layer's marks for `timeline_ms` (a probe's; a served request records only what its
        figures need, see `layer`)."""
        self.store = store
        self.segments = list(segments)
        self.compute = compute
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # so cuda == cuda:0 compares equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = max(1, depth)
        self.timeline = timeline
        self.cuda = self.device.type == "cuda"
        self.stats = LoadStats(tiers=[None] * len(self.segments))
        self.computed: dict[int, ChunkKV] = {}  # segments the store could not serve, by index
        self.manifests: list[Manifest | None] = []
        expected = list(expected) if expected is not None else [None] * len(self.segments)
        for index, segment in enumerate(self.segments):  # each on its own: one miss spoils nothing else
            if isinstance(segment, ChunkKV):
                self.manifests.append(None)
                self.stats.tiers[index] = "memory"
                continue
            manifest = store.manifest(segment)
            want = expected[index]
            # (A tuple as it is, a `TokenIds` one included: tuple() of a subclass would copy it.)
            if manifest is not None and want is not None and (
                    want if isinstance(want, tuple) else tuple(want)) != manifest.token_ids:
                log.warning("store: chunk %s holds other tokens than the prompt's; recomputed", segment)
                manifest = None
            self.manifests.append(manifest)
            if manifest is None:
                self._recompute(index, "not in the store")
            else:
                # Its slowest layer's tier: a chunk with one layer left only in Redis is a Redis chunk
                # (read ahead on the prefetch thread, planned at Redis speed), not a CPU-tier one.
                self.stats.tiers[index] = store.tiered.slowest(layer_keys(segment, manifest.n_layers))
        self.starts = [self._entry_start(index) for index in range(len(self.segments))]
        counts = {self._layers_of(index) for index in range(len(self.segments))}
        if len(counts) > 1:
            raise ValueError(f"segments have different layer counts {sorted(counts)} (mixed models?)")
        self.n_layers = counts.pop() if counts else 0
        self.skip: set[int] = set()
        self._begun = False
        self._pool: ThreadPoolExecutor | None = None
        self._reads: dict[int, Future] = {}

    # -- segments -------------------------------------------------------------------------------

    def _entry_start(self, index: int) -> int:
        segment = self.segments[index]
        if isinstance(segment, ChunkKV):
            return segment.start
        manifest = self.manifests[index]
        return manifest.start if manifest is not None else self.computed[index].start

    def _layers_of(self, index: int) -> int:
        segment = self.segments[index]
        if isinstance(segment, ChunkKV):
            return segment.kv.shape[0]
        manifest = self.manifests[index]
        return manifest.n_layers if manifest is not None else self.computed[index].kv.shape[0]

    def lengths(self) -> list[int]:
        out = []
        for index, segment in enumerate(self.segments):
            manifest = self.manifests[index]
            out.append(len(segment) if isinstance(segment, ChunkKV)
                       else len(manifest.token_ids) if manifest is not None else len(self.computed[index]))
        return out

    def _recompute(self, index: int, why: str) -> ChunkKV:
        key = self.segments[index]
        if self.compute is None:
            raise MissingChunk(f"chunk {key} is {why} and no compute callback was given (ingest it first)")
        with torch.inference_mode():  # inference mode is per thread; this may run on the prefetch thread
            chunk = self.compute(index)
        manifest = self.manifests[index]
        if manifest is not None and (chunk.start, tuple(chunk.token_ids)) != (manifest.start,
                                                                               manifest.token_ids):
            raise ValueError(f"compute({index}) returned K/V of other tokens or start {chunk.start} than "
                             f"chunk {key} (start {manifest.start}) holds")
        log.info("store: chunk %s %s; computed it on its own", key, why)
        self.computed[index] = chunk
        self.stats.computed[index] = why
        self.stats.tiers[index] = None
        self.store.put(key, chunk)
        return chunk

    # -- loading --------------------------------------------------------------------------------

    def begin(self, skip: Sequence[int] = ()) -> "StoreSource":
        """Start loading; segments in `skip` are not read (the fusor prefills them in full)."""
        if self._begun:
            raise RuntimeError("begin() was already called")
        self._begun = True
        self.skip = set(skip)
        self._slow = [index for index, tier in enumerate(self.stats.tiers)
                      if tier in self.SLOW_TIERS and index not in self.skip]
        # The segments read from the store (not skipped, not held in memory), in order.
        self._stored = [index for index, segment in enumerate(self.segments)
                        if index not in self.skip and not isinstance(segment, ChunkKV)]
        if self._slow:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-prefetch")
            for layer in range(min(self.depth, self.n_layers)):
                self._reads[layer] = self._pool.submit(self._read_slow, layer)
        if self.cuda:
            # The segments this source places in the request's buffer itself, on its copy stream: those read into
            # host memory, and the GPU tier's where `into` takes them too (PLACE_DEVICE, device_too).
            self._host = [i for i in range(len(self.segments)) if i not in self.skip and self._on_host(i)]
            self._device_placed: set[int] = set()
            self._lengths = self.lengths()
            self._target = None  # layer -> {segment: the device view its copy lands in} (`into`, or our own)
            # One of PyTorch's pooled streams (no stream created); without the device argument where it is the
            # current device (PyTorch then skips switching devices around the call, which it calls expensive).
            here = self.device.index == torch.cuda.current_device()
            self._copy_stream = torch.cuda.Stream() if here else torch.cuda.Stream(self.device)
            # Each layer's events are made when its copies are issued (`_issue`), not ~160 here: begin() is on
            # the request's critical path, and most layers are issued later, while the GPU is busy.
            self._ready: list[torch.cuda.Event | None] = [None] * self.n_layers
            self._marks = {name: [None] * self.n_layers
                           for name in ("copy_start", "copy_end", "asked", "compute_start")}
            self._issued = -1
            self._asked = -1  # the last layer `layer` handed over
            self._copied = -1  # every layer up to this one is known copied (its ready event completed)
            self._pending_blocks: dict[int, list] = {}
            self._holds = dma.Holds()  # the host blocks of copies not known to be done
            # The copy plan (`_plan`): where every host segment is a store key read from a memory tier (no slow tier,
            # nothing computed; segments on the device may be anything), a few layers of every stored segment are
            # looked up in one pass and their copies laid out ahead (`dma.Prepared`), so issuing a layer is one
            # runtime call and its event.
            self._plans: dict[int, tuple] | None = {} if self._plannable() else None
            self._planned = -1  # every layer up to this one is planned (or the plan stopped before it)
            self._plan_layers = self.PLAN_LAYERS  # layers a lookup pass plans (`into` may raise it to its `first`)
            self._buffer = None  # (the buffer the host segments land in, each segment's start in it)
            self._table = None  # (`_pointers`)
            self._views_due: set[int] = set()  # planned layers whose host segments' views `layer` makes
            # Host segments' rows written on the compute stream when their layer was issued (a block found on the
            # device: promoted, or recomputed): per layer, an event after those writes, else None.
            self._written: list[torch.cuda.Event | None] = [None] * self.n_layers
            self._turner = None  # `turn_with`'s: layer -> the re-rotation enqueued on the current stream
            self._turned: list[torch.cuda.Event | None] = [None] * self.n_layers
            self._turned_upto = -1  # every layer up to this one is known re-rotated (its event completed)
            self._last_turned = -1
            self._into = False  # `into` placed the host segments into the request's buffer
            self._writes: tuple[int, ...] | None = ()  # GPU-memory tiers' puts when last waited for (`_copy_placed`)
        return self

    # Layers issued: `into` starts ISSUE_FIRST (unless its caller names a count: blend's fusor asks four below its
    # PLACE_ASIDE_FROM on the H200, fusor.COPY_BOUND_FIRST); each `ahead` call (the fusor's, once a layer's compute is
    # enqueued) tops the copy stream up to IN_FLIGHT layers not yet copied (never past AHEAD layers beyond the one
    # asked for); `layer` issues the asked layer itself if it is not yet. A layer of 10 x 512
    # 8B-shape tokens copies in ~0.41 ms on an H200 and costs the host ~0.2 ms to issue (less through store.dma):
    # a fixed two a call (the earlier rule) left the stream idle for 0.9 and 1.4 ms while the host set up and
    # ranked, then kept issuing while the stream was well ahead, during layers 3-14 of blend@0.05 that took 0.45-0.7
    # ms each against 0.385 later, their copies long done (docs/ops/h200_bench_s15a.json, timeline_served_0.05).
    # Topping up issues where the stream runs low and spares the host where it does not.
    # Two: the layers the head computes (a +cachedk check layer's 0 and 1); the rest are looked up and issued by the
    # check layer's `ahead`, once the kept tokens' steps are enqueued, so the host does it while the GPU works, not
    # on the request's critical path (the bench's `/first2` rows against four, docs/gpu.md eighteenth session).
    ISSUE_FIRST = 2
    IN_FLIGHT = 3
    AHEAD = 8
    # Layers a copy plan looks up in one pass (`_plan`; 0: each layer looked up and checked as it is issued). A layer
    # issued from the per-layer path cost the host ~0.21 ms on an H200 host (docs/ops/h200_probe_host_s18a.txt: the
    # lookup ~0.06 ms, the copies' checks and calls, two events), most of a blend@0.05 request's host time a layer.
    # Two, with ISSUE_FIRST: `into` plans only the layers it issues.
    PLAN_LAYERS = 2
    # The placed chunks' keys re-rotated on a stream of their own, each layer once its copies are done (`turn_with`),
    # not by the fusor on the compute stream ahead of the layer's compute (~8 us a layer of 10 x 512 8B-shape tokens on
    # an H200, s13b's profile): on since the bench's rows paired it with the fusor's turning (docs/gpu.md, eighteenth
    # session; its `/turn-inline` rows keep the pair).
    TURN_ASIDE = True
    # GPU-tier segments placed into the request's buffer by `into` too (where its caller asks: `device_too`, the fusor's
    # PLACE_ASIDE_FROM), each layer's as a device-to-device copy on the copy stream (and so re-rotated aside with the
    # rest), not handed to the fusor, which copies them on the compute stream ahead of each layer and turns their keys
    # there: at 0.15 the GPU tier ran 1.3% slower than the CPU tier on the H200 (s23a, docs/gpu.md nineteenth session),
    # its placement on the critical path. A GPU-tier block put since the copies last waited for the compute stream (at
    # `into`, or after an earlier put) may still be written there (promoted from a lower tier by a later lookup pass,
    # or re-put by an interleaved request), so then the copies wait for the compute stream's work enqueued when they
    # are issued, after the lookup (`_copy_placed`). The bench's `/placed-inline` rows pair it off.
    PLACE_DEVICE = True
    _turn_streams: dict = {}  # device index -> the stream the turns run on (`turn_with`)
    _gpu_tiers: list | None = None  # the store's tiers held in GPU memory (`_device_writes`), once looked for

    def turn_with(self, turner: Callable[[int], None]) -> bool:
        """Offer the placed segments' re-rotation: `turner(layer)` enqueues that layer's on the current stream (the
        fusor's, over the request buffer's range of moving segments, every one of them placed by `into`). True where
        this source takes it (CUDA, TURN_ASIDE, after `into`): each layer's then runs on a stream of its own once the
        layer's copies (and any write of its host segments on the compute stream) are done, and the compute stream
        waits for it before the layer's compute (`layer`); False: the caller turns each layer itself."""
        if not (self.cuda and self._begun and self.TURN_ASIDE and self._into and self._host):
            return False
        # One stream a device for every request's turns (a model thread runs one request's layers at a time): the
        # PyTorch fallback's temporaries stay in one stream's cache, not in one of each of PyTorch's pooled streams.
        stream = StoreSource._turn_streams.get(self.device.index)
        if stream is None:
            stream = StoreSource._turn_streams[self.device.index] = torch.cuda.Stream(self.device)
        self._turn_stream = stream
        # What the turner reads was made on the compute stream (the request's positions, sent at set-up; the rows
        # the source wrote there while issuing layers before now).
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self._turner = turner
        return True

    def _mark_written(self, layer: int) -> None:
        """Layer `layer`'s host-segment rows were just written on the compute stream: its turn (if the source turns
        keys, `turn_with`) waits for that too."""
        if self._turner is not None:
            self._written[layer] = _recorded(torch.cuda.current_stream(self.device))

    def _turn(self, layer: int) -> None:
        """Enqueue layer `layer`'s re-rotation on the turn stream (once), after its copies and writes."""
        if self._turned[layer] is not None:
            return
        stream = self._turn_stream
        stream.wait_event(self._ready[layer])
        if self._written[layer] is not None:
            stream.wait_event(self._written[layer])
        with torch.cuda.stream(stream):
            self._turner(layer)
        self._turned[layer] = _recorded(stream)
        self._last_turned = layer

    def _turned_done(self) -> int:
        """The last layer up to which every re-rotation is known done (stream order: one query a layer found done)."""
        while self._turned_upto < self._last_turned and self._turned[self._turned_upto + 1] is not None \
                and self._turned[self._turned_upto + 1].query():
            self._turned_upto += 1
        return self._turned_upto

    def into(self, data: torch.Tensor, starts: Sequence[int], device_too: bool = True,
             first: int | None = None) -> set[int]:
        """Copy the host-held segments (and with PLACE_DEVICE and `device_too` the GPU tier's) straight into `data`
        ([layers, capacity, 2, kv_heads, head_dim], the request's KV buffer) on the copy stream, segment i at positions
        starts[i]..., and place the device-held whole ones (the system prefix) there at once; returns their indices
        (the fusor does not place them). `first`: the layers whose copies start now, looked up in one pass, and each
        later lookup pass covering as many (or PLAN_LAYERS if more); None: ISSUE_FIRST start now, passes of
        PLAN_LAYERS. CUDA only (elsewhere none: the fusor copies host blocks itself); call after `begin` and before the
        first `layer`."""
        if first is not None and (isinstance(first, bool) or not isinstance(first, int) or first < 1):
            raise ValueError(f"into(): first={first!r} layers to start; need a positive int or None")
        if not self.cuda or not self._begun:
            return set()
        if self._issued >= 0:
            raise RuntimeError("into() after the first layer's copies were issued")
        if len(starts) < len(self.segments) or data.shape[0] != self.n_layers:
            raise ValueError(f"into(): {len(starts)} starts for {len(self.segments)} segments, "
                             f"{data.shape[0]} layers in the buffer for the segments' {self.n_layers}")
        if device_too and self.PLACE_DEVICE:
            self._device_placed = {i for i, segment in enumerate(self.segments)
                                   if i not in self.skip and isinstance(segment, str) and i not in self.computed
                                   and not self._on_host(i)}
            if self._device_placed:
                self._host = sorted(set(self._host) | self._device_placed)
                self._plans = {} if self._plannable() else None
        self._target = layer_views(data, starts, self._lengths, self._host)
        self._buffer = (data, starts)
        self._into = True
        # The GPU-memory tiers' puts counted before the wait below, so every one counted is written when the copies run
        # (`_copy_placed` checks none was put since).
        self._writes = self._device_writes() if self._device_placed else ()
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the buffer exists (and is zeroed)
        if self._host:  # (nothing to copy, e.g. every chunk in the GPU tier: each layer looked up when asked for)
            if first is not None:
                # The layers started now looked up in one pass, and as many a pass after (the bench's `/four-first`
                # rows: ISSUE_FIRST and PLAN_LAYERS both 4).
                self._plan_layers = max(self.PLAN_LAYERS, first)
            first = self.ISSUE_FIRST if first is None else first
            self._issue_ahead(first - 1, first)
        # Segments held whole on the device (the system prefix): every layer placed now by one copy on the
        # compute stream, not one small copy per layer by the fusor.
        resident = [i for i, segment in enumerate(self.segments)
                    if isinstance(segment, ChunkKV) and i not in self.skip and segment.kv.device == self.device]
        for i in resident:
            kv = self.segments[i].kv
            data[:, starts[i] : starts[i] + kv.shape[1]].copy_(kv)
        return set(self._host) | set(resident)

    def _plannable(self) -> bool:
        """Whether the copies of `_host` may follow a copy plan (`_plan`; `_plans`, set by `begin` and by `into`)."""
        return (self.PLAN_LAYERS > 0 and bool(self._host) and not self._slow and not self.computed
                and dma.available() and self.device.index == torch.cuda.current_device()
                and all(isinstance(self.segments[i], str) for i in self._host))

    def _on_host(self, index: int) -> bool:
        """Whether this segment's layers arrive in host memory (and so need a copy to the device)."""
        segment = self.segments[index]
        if isinstance(segment, ChunkKV):
            return segment.kv.device != self.device
        if index in self.computed:
            return self.computed[index].kv.device != self.device
        return self.stats.tiers[index] != "gpu" or self.device.type != "cuda"

    def _layout(self) -> tuple[tuple[int, ...], torch.dtype]:
        """The per-token block shape [2, kv_heads, head_dim] and dtype the segments share."""
        if not self.segments:
            return (2, 1, 1), torch.float32
        segment, manifest = self.segments[0], self.manifests[0]
        if manifest is not None:
            return manifest.block_shape[1:], manifest.dtype
        kv = segment.kv if isinstance(segment, ChunkKV) else self.computed[0].kv
        return tuple(kv.shape[2:]), kv.dtype

    def _read(self, index: int, layer: int) -> torch.Tensor:
        """Layer `layer` of segment `index`, from memory or the store (recomputing it if it went missing)."""
        segment = self.segments[index]
        if isinstance(segment, ChunkKV):
            return segment.kv[layer]
        chunk = self.computed.get(index)
        if chunk is None:
            started = time.perf_counter()
            block, tier = self.store.layer_from(segment, self.manifests[index], layer)
            if block is not None:  # timed against the tier that served it, for the controller's rates
                self.stats.read_s[tier] = self.stats.read_s.get(tier, 0.0) + time.perf_counter() - started
                self.stats.read_bytes[tier] = (self.stats.read_bytes.get(tier, 0)
                                               + block.numel() * block.element_size())
                return block
            chunk = self._recompute(index, f"missing layer {layer}")
        return chunk.kv[layer]

    def _read_slow(self, layer: int) -> dict[int, torch.Tensor | None]:
        """Layer `layer` of every slow-tier segment as one batch (from Redis: pipelined GETs, a few sockets). Runs on
        the prefetch thread, so it recomputes nothing: a segment that went missing is None, and `_gather` recomputes
        it on the model thread (the model's step is one thread's: its graphs share buffers between requests,
        `LayerGraphs`)."""
        return self._read_batch(self._slow, layer, pin=self.cuda, recompute=False)

    def _read_batch(self, indices: Sequence[int], layer: int, pin: bool = False,
                    recompute: bool = True) -> dict[int, torch.Tensor | None]:
        """Layer `layer` of the segments `indices` (store keys), the store asked once for all of them (each
        tier once: one lookup pass instead of one per chunk, which on a GPU host was ~1/4 of a blend
        request's host time); what went missing is recomputed as by `_read` (`recompute` False: None). `pin`:
        blocks in pageable host memory are pinned (a slow tier's, so each copy to the device is one asynchronous
        DMA)."""
        computed = self.computed
        stored = [index for index in indices if index not in computed] if computed else indices
        found: dict[int, torch.Tensor] = {}
        if stored:
            started = time.perf_counter()
            served = self.store.layers_from([(self.segments[i], self.manifests[i]) for i in stored], layer)
            elapsed = time.perf_counter() - started
            per_tier: dict[str, int] = {}
            for index, (block, tier) in zip(stored, served):
                if block is not None:
                    found[index] = block
                    per_tier[tier] = per_tier.get(tier, 0) + block.numel() * block.element_size()
            self._count_reads(elapsed, per_tier)
        if len(found) == len(indices) and not pin:
            return found  # every block served (the usual case): nothing to recompute or pin
        blocks = {}
        for index in indices:
            block = found.get(index)
            if block is None:  # computed already, or went missing: recomputed from this layer on
                if not recompute and index not in computed:
                    blocks[index] = None
                    continue
                block = self._read(index, layer)
            if pin and block.device.type == "cpu" and not block.is_pinned():
                block = block.pin_memory()  # so its copy to the device is one asynchronous DMA
            blocks[index] = block
        return blocks

    def _gather(self, layer: int) -> list[torch.Tensor | None]:
        """Every segment's block of one layer, wherever it is (slow tiers through the prefetch thread)."""
        slow: dict[int, torch.Tensor] = {}
        if self._slow:
            pending = self._reads.pop(layer, None) or self._pool.submit(self._read_slow, layer)
            ahead = layer + self.depth
            if ahead < self.n_layers and ahead not in self._reads:
                self._reads[ahead] = self._pool.submit(self._read_slow, ahead)
            started = time.perf_counter()
            slow = pending.result()
            self.stats.host_wait_s += time.perf_counter() - started
        # The store's segments not read above, as one batch; segments held in memory directly.
        batch = self._read_batch([index for index in self._stored if index not in slow] if slow else self._stored,
                                 layer)
        blocks: list[torch.Tensor | None] = []
        for index in range(len(self.segments)):
            if index in self.skip:
                blocks.append(None)
            elif index in slow and index not in self.computed:
                block = slow[index]
                if block is None:  # went missing (`_read_slow`): recomputed here, on the model thread, once the
                    # reads ahead are done: one of them may find a corrupt entry of it and delete it, which must not
                    # land after the recompute wrote the chunk back (the next request would miss it again).
                    for read in list(self._reads.values()):
                        read.exception()  # (waits; a read's own error is raised where its layer is gathered)
                    block = self._recompute(index, f"missing layer {layer}").kv[layer]
                blocks.append(block)
            else:
                block = batch.get(index)
                blocks.append(block if block is not None else self._read(index, layer))
        return blocks

    def _own_target(self):
        """Without `into`: one device buffer holding every layer of the host-held segments."""
        offsets, total = {}, 0
        for index in self._host:
            offsets[index] = total
            total += self._lengths[index]
        shape, dtype = self._layout()
        own = torch.empty((self.n_layers, total, *shape), dtype=dtype, device=self.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the copies follow its allocation
        starts = [offsets.get(i, 0) for i in range(len(self.segments))]
        self._buffer = (own, starts)
        return layer_views(own, starts, self._lengths, self._host)

    def _in_flight(self) -> int:
        """Issued layers whose copies are not known done (stream order: one event query a layer found done since,
        and one for the oldest still running)."""
        while self._copied < self._issued and self._ready[self._copied + 1].query():
            self._copied += 1
        return self._issued - self._copied

    def _issue_ahead(self, last: int, most: int) -> None:
        """Issue layers up to `last` (at most `most` of them), stopping at a slow-tier layer whose read is not back
        yet: the next `layer` call issues it (waiting only once it is needed)."""
        first = self._issued + 1
        for layer in range(first, min(last, self._issued + most, self.n_layers - 1) + 1):
            if self._slow and not (layer in self._reads and self._reads[layer].done()):
                return
            self._issue(layer, behind=layer > first)

    def _issue(self, layer: int, behind: bool = False) -> None:
        """Enqueue layer `layer`'s host-to-device copies on the copy stream (CUDA), layers in order. `behind`: issued
        right behind the layer before, nothing else on the copy stream between (the same `_issue_ahead` call)."""
        if layer >= self.n_layers or layer <= self._issued:
            return
        if layer > self._issued + 1:
            self._issue(layer - 1)
        if self._target is None:
            self._target = self._own_target()
        if self._plans is not None and layer > self._planned:
            self._plan(layer)
        planned = self._plans.pop(layer, None) if self._plans else None
        copy = self._copy_stream
        # A layer issued right behind the one before, whose copy is still running, starts where that one ends: its
        # end event is its start, one event fewer a layer on the host. If that copy is done already (the host took
        # longer to look this layer up than the copy took: a small model's layers), the stream idled since: a new
        # start, so the idle time is not counted as copying (`copy_s` sets the loading controller's bandwidth).
        previous = self._marks["copy_end"][layer - 1] if behind and not self.timeline else None
        start = previous if previous is not None and not previous.query() else _recorded(copy, timing=True)
        try:
            if planned is not None:
                prepared, out, sources, moves, placed = planned
                prepared.issue(copy)
                self.stats.copy_bytes += prepared.nbytes
                if placed:  # the GPU tier's blocks (held with the host blocks)
                    self._copy_placed(placed, copy)
                if moves:  # host segments found on the device (promoted to the GPU tier since): as `_copies` does
                    torch._foreach_copy_([target for target, _ in moves], [block for _, block in moves])
                    self._mark_written(layer)
                self._views_due.add(layer)
            else:
                out, sources, wrote = self._copies(layer, copy)
                if wrote:
                    self._mark_written(layer)
        except BaseException:
            # Copies of this layer may be queued with no event or hold of their own yet: none may still read a block
            # or write the buffer once the error has let them go (a buffer given back is reused at once).
            copy.synchronize()
            raise
        end = _recorded(copy, timing=True)  # also the layer's ready event (a timing event can be waited on)
        self._holds.add(end, sources)
        self._marks["copy_start"][layer], self._marks["copy_end"][layer] = start, end
        self._ready[layer] = end
        self._pending_blocks[layer] = out
        self._issued = layer

    def _pointers(self):
        """(the buffer's address, bytes a layer, {host segment: (its offset in a layer, its bytes)}) for the plan's
        copies, by arithmetic instead of a view a block; checked once that a layer's rows are contiguous and that
        each host segment's manifest (which every block read is checked against, `ChunkStore._fits`) fits its place
        in the buffer: dtype, token shape, and its rows inside the buffer (raw copies are not bounds-checked as a
        view's copy is). None where not: no plan (the per-layer path copies those)."""
        data, starts = self._buffer
        # A token's rows back to back and the layers apart (a view of a pool's range has the pool's layer stride);
        # stride(1) asked outright: `is_contiguous` ignores the stride of a dimension of size 1 (a 1-token buffer).
        per_token = math.prod(data.shape[2:])
        if (data.device != self.device or not data[0].is_contiguous() or data.stride(1) != per_token
                or data.stride(0) < data.shape[1] * per_token):
            return None
        size = data.element_size()
        token = per_token * size
        places = {}
        for index in self._host:
            manifest = self.manifests[index]
            shape = manifest.block_shape
            if (manifest.dtype != data.dtype or tuple(shape[1:]) != tuple(data.shape[2:])
                    or not 0 <= starts[index] <= data.shape[1] - shape[0]):
                return None
            places[index] = (starts[index] * token, shape[0] * token)
        return data.data_ptr(), data.stride(0) * size, places

    def _plan(self, layer: int) -> None:
        """Look layers `layer`.. (PLAN_LAYERS of them, or `into`'s `first` if more) of every stored segment up in one
        pass and lay their copies out (`dma.Prepared`), with the blocks the fusor is handed (the host segments' views
        made by `layer`) and the host blocks to hold. The plan stops for good at the first layer it cannot carry as a
        plain copy (a block missing, not contiguous or on an unexpected device): that layer and the rest take the
        per-layer path, which recomputes what went missing. A block found here is held from now on, so one evicted
        before its turn is still copied intact. (Where the plan stops, the pass's later layers were looked up for
        nothing: the store counts those hits twice and the pass's time goes to the layers planned; a request stopped
        early counts the bytes of layers planned and never issued.)"""
        if self._table is None:
            self._table = self._pointers()
            if self._table is None:
                self._plans = None
                return
        base, layer_bytes, places = self._table
        last = min(layer + self._plan_layers, self.n_layers) - 1
        layers = list(range(self._planned + 1, last + 1))
        self._planned = last
        stored = self._stored
        started = time.perf_counter()
        found = self.store.blocks_from([(self.segments[i], self.manifests[i]) for i in stored], layers)
        elapsed = time.perf_counter() - started
        per_tier: dict[str, int] = {}
        device, skip, segments = self.device, self.skip, self.segments
        held = [i for i in range(len(segments)) if i not in skip and isinstance(segments[i], ChunkKV)]
        for index, served in zip(layers, found):
            at = base + index * layer_bytes
            out: list[torch.Tensor | None] = [None] * len(segments)
            for segment in held:  # held in memory (the system prefix, on the device: `_plans` needs it so)
                out[segment] = segments[segment].kv[index]
            targets, sources, sizes, blocks, moves, placed = [], [], [], [], [], []
            views = None
            bytes_in: dict[str, int] = {}
            for segment, (block, tier) in zip(stored, served):
                if block is None:
                    break
                place = places.get(segment)
                if place is not None:  # a host segment: its view is `layer`'s to make
                    offset, size = place
                    if block.is_cpu:
                        if not block.is_contiguous():
                            break
                        targets.append(at + offset)
                        sources.append(block.data_ptr())
                        sizes.append(size)
                        blocks.append(block)
                    elif block.device == device:
                        views = self._target(index) if views is None else views
                        if segment in self._device_placed:  # the GPU tier's: copied on the copy stream, held
                            placed.append((views[segment], block))
                            blocks.append(block)
                        else:
                            # Promoted to the GPU tier since the request began: `into` claimed the segment, so its
                            # block goes into the buffer on the compute stream when the layer is issued.
                            moves.append((views[segment], block))
                    else:
                        break
                elif block.device == device:
                    size = block.nbytes
                    out[segment] = block
                else:
                    break
                bytes_in[tier] = bytes_in.get(tier, 0) + size
            else:
                self._plans[index] = (dma.Prepared(targets, sources, sizes), out, blocks, moves, placed)
                for tier, size in bytes_in.items():
                    per_tier[tier] = per_tier.get(tier, 0) + size
                continue
            self._planned = self.n_layers - 1  # this layer and the rest: the per-layer path (read again there)
            break
        self._count_reads(elapsed, per_tier)

    def _count_reads(self, elapsed: float, per_tier: dict[str, int]) -> None:
        """One lookup pass's seconds and bytes into the request's figures, its time shared among the tiers that
        served it by bytes (the loading controller's read rates)."""
        total = sum(per_tier.values())
        read_s, read_bytes = self.stats.read_s, self.stats.read_bytes
        for tier, size in per_tier.items():
            read_s[tier] = read_s.get(tier, 0.0) + elapsed * size / total
            read_bytes[tier] = read_bytes.get(tier, 0) + size

    def _copies(self, layer: int, copy: torch.cuda.Stream) -> tuple[list[torch.Tensor | None], list[torch.Tensor], bool]:
        """The per-layer path: look the layer up, enqueue its copies on `copy`; (the blocks the fusor is handed, the
        host blocks to hold until the copies are done, whether a host segment's rows were written on the compute
        stream)."""
        blocks = self._gather(layer)
        views = self._target(layer)
        out: list[torch.Tensor | None] = []
        targets, sources, placed = [], [], []
        wrote = False
        for index, block in enumerate(blocks):
            target = views.get(index)
            if block is None or (block.device == self.device and target is None):
                out.append(block)
                continue
            if block.device == self.device and index in self._device_placed and index not in self.computed:
                placed.append((target, block))  # the GPU tier's: device to device on the copy stream, held
                out.append(target)
                continue
            if block.device == self.device:
                # A host segment recomputed on the device mid-request (a layer evicted or corrupt after its manifest
                # was read): `into` claimed it, so the fusor does not place it; its block goes into the buffer here,
                # on the compute stream that computed it, ahead of the layer's compute.
                target.copy_(block)
                out.append(target)
                wrote = True
                continue
            if target is None:  # a segment that arrived on the host unexpectedly (recomputed on CPU)
                with torch.cuda.stream(copy):
                    moved = block.to(self.device, non_blocking=True)
                # Allocated on the copy stream, read on the compute stream: not reused before that read is done.
                moved.record_stream(torch.cuda.current_stream(self.device))
                out.append(moved)
                continue
            targets.append(target)
            sources.append(block)
            self.stats.copy_bytes += block.numel() * block.element_size()
            out.append(target)
        # The layer's copies as runtime calls on raw pointers (store.dma: no PyTorch dispatch or pinned-memory
        # event a block; the blocks are held here until the copies are done); the rest through PyTorch in one call.
        left = dma.copy_async(targets, sources, copy) if targets else []
        if left:
            with torch.cuda.stream(copy):
                torch._foreach_copy_([targets[i] for i in left], [sources[i] for i in left], non_blocking=True)
        if placed:
            self._copy_placed(placed, copy)
        return out, sources + [block for _, block in placed], wrote

    def _copy_placed(self, placed: list[tuple[torch.Tensor, torch.Tensor]], copy: torch.cuda.Stream) -> None:
        """The GPU tier's (target view, block) pairs copied device to device on the copy stream (PLACE_DEVICE). The copy
        stream waited at `into` for the compute stream's work then, so for every block put before; a block put since the
        copies last waited (promoted by a lookup pass, or re-put by an interleaved request) may be written on the
        compute stream after that, so then the copies also wait for the compute stream's work enqueued so far (it was
        written before the host looked it up). Not waiting where nothing was put keeps the copies off the compute
        stream's path: a copy waiting for the layer just enqueued held every layer's compute behind its own copy and
        turn (s24a's `/placed-aside` rows, 0.9x the served GPU-tier row at 0.05). The count is read before the event is
        recorded, so it becomes the count waited for: a later put makes only the copies after it wait. (Every thread
        that puts into a GPU tier does so on the device's default stream, the compute stream here: serving and blend set
        no other.)"""
        writes = self._device_writes()
        if writes is None or writes != self._writes:
            copy.wait_event(_recorded(torch.cuda.current_stream(self.device)))
            self._writes = writes
        with torch.cuda.stream(copy):
            torch._foreach_copy_([target for target, _ in placed], [block for _, block in placed], non_blocking=True)

    def _device_writes(self) -> tuple[int, ...] | None:
        """GPU-memory blocks put so far into each tier held in GPU memory (`MemoryTier.writes`); None where such a tier
        does not count its puts (then every copy of the GPU tier's blocks waits)."""
        tiers = self._gpu_tiers
        if tiers is None:  # found once (the counts are read for each layer issued, on the host's critical path)
            tiers = self._gpu_tiers = [tier for tier in self.store.tiered.tiers if getattr(tier, "device", None)
                                       is not None and torch.device(tier.device).type == "cuda"]
        counts = tuple(getattr(tier, "writes", None) for tier in tiers)
        return None if None in counts else counts

    def layer(self, index: int) -> list[torch.Tensor | None]:
        if not self._begun:
            self.begin()
        if not 0 <= index < self.n_layers:
            raise IndexError(f"layer {index} is outside the segments' {self.n_layers} layers")
        if not self.cuda:
            blocks = self._gather(index)
            if index + 1 == self.n_layers:
                self.close()
            return [b.to(self.device) if b is not None and b.device != self.device else b for b in blocks]
        compute = torch.cuda.current_stream(self.device)
        self._issue(index)
        self._asked = index
        self._in_flight()
        gate, done = self._ready[index], index <= self._copied
        if self._turner is not None:  # the layer is ready once re-rotated (after its copies)
            self._turn(index)
            gate, done = self._turned[index], index <= self._turned_done()
        if self.timeline or not done:
            # The copy may still run: the compute stream waits for it, between two marks that time the stall.
            self._marks["asked"][index] = _recorded(compute, timing=True)
            compute.wait_event(gate)
            self._marks["compute_start"][index] = _recorded(compute, timing=True)
        # else its copy is done already (the usual case past the first layers): nothing to wait for and no stall
        # to time, so no wait and no two events on the host's critical path (a layer without marks stalled 0 s).
        blocks = self._pending_blocks.pop(index)
        if index in self._views_due:  # a planned layer: the host segments' views (the fusor places none of them)
            self._views_due.discard(index)
            for segment, view in self._target(index).items():
                blocks[segment] = view
        if index + 1 == self.n_layers:
            self.close()
        return blocks

    def ahead(self) -> None:
        """Issue later layers' copies now: the fusor calls this once it has enqueued the asked layer's compute, so
        the host issues them while the GPU works, not before its next work (on an H200 the request's head is bound
        by its host time). Tops the copy stream up to IN_FLIGHT layers not yet copied, never past AHEAD beyond the
        layer asked for last (a source with nothing to copy issues none: each layer is looked up when asked for)."""
        if not (self.cuda and self._begun and self._host):
            return
        if self._issued + 1 < self.n_layers:
            self._issue_ahead(self._asked + self.AHEAD, self.IN_FLIGHT - self._in_flight())
            self._holds.release_done()
        if self._turner is not None:  # each issued layer's re-rotation queued behind its copies, ahead of its turn
            for layer in range(self._last_turned + 1, self._issued + 1):
                self._turn(layer)

    def finish(self) -> LoadStats:
        """After the prefill's results were read back (a synchronize happened): the GPU-side figures."""
        self.close()
        if self.cuda and self._begun and self.n_layers:
            torch.cuda.current_stream(self.device).synchronize()  # after close: every copy is done
            self._holds.release_all()
            # Over the layers read (and issued): a request stopped early has the rest unrecorded.
            stalls = [start.elapsed_time(end) / 1000 for start, end in self._spans("asked", "compute_start")]
            self.stats.stall_s = sum(stalls)
            self.stats.stalled_layers = sum(s > 5e-5 for s in stalls)
            self.stats.copy_s = self._copy_seconds()
        return self.stats

    def _copy_seconds(self) -> float:
        """The copy stream's busy seconds: one event read per run of layers issued back to back (a layer whose start
        is the previous one's end event continues that one's run), not one per layer; the same sum."""
        starts, ends = self._marks["copy_start"], self._marks["copy_end"]
        total, run = 0.0, None
        for layer in range(self.n_layers):
            start, end = starts[layer], ends[layer]
            if start is None or end is None:
                continue
            if run is None or start is not ends[layer - 1]:
                if run is not None:
                    total += run[0].elapsed_time(run[1])
                run = [start, end]
            else:
                run[1] = end
        if run is not None:
            total += run[0].elapsed_time(run[1])
        return total / 1000

    def _spans(self, first: str, last: str):
        return [(start, end) for start, end in zip(self._marks[first], self._marks[last])
                if start is not None and end is not None]

    def timeline_ms(self) -> list[dict]:
        """Per layer (CUDA, after `finish`): when its copy ran, when the fusor asked for it and when its
        compute could begin, in ms from the first copy."""
        marks = self._marks
        origin = marks["copy_start"][0]
        return [{name: round(origin.elapsed_time(marks[name][layer]), 3) for name in marks} | {"layer": layer}
                for layer in range(self.n_layers) if all(marks[name][layer] is not None for name in marks)]

    def close(self) -> None:
        if self.cuda and self._begun:
            self._plans = None  # planned layers never issued (a request stopped early): their blocks let go
        if self.cuda and self._begun and self._issued >= 0:
            # Work the compute stream enqueues from now on (a buffer given back and taken again) follows
            # every copy issued into it.
            torch.cuda.current_stream(self.device).wait_event(self._ready[self._issued])
            if self._last_turned >= 0:  # and every re-rotation (the buffer's rows it rewrites, the positions it reads)
                torch.cuda.current_stream(self.device).wait_event(self._turned[self._last_turned])
            self._turner = None
            self._holds.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._reads.clear()

    def __enter__(self) -> "StoreSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
