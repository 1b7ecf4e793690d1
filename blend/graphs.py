"""CUDA graphs around the per-layer step (issue 16; the eager step is the reference and what runs on CPU):

- `LayerGraphs` (served by default on CUDA): each layer's row-wise parts captured per bucket of token
  count and shared by every request; the KV write and attention stay eager between them. With a KV pool
  (`server.pool_layer_graphs`, on by default) also each whole layer, KV write and attention inside, for a
  request whose cache is a pool range.
- `DecodeGraphs` (served by default on CUDA, with the KV pool): a whole decode step over requests whose
  caches are ranges of one `KVPool`, captured once per batch size at start-up: attention inside the
  graph through the pool's fixed address, each row's offset and length in a device tensor; each row's
  greedy token left on the device for the next step (one step ahead, blend/decode.py).
- `GraphDecoder` (`server.decode_graphs`, off; superseded by `DecodeGraphs`): one request's whole decode step as one graph, captured
  per KV buffer: one token at a position held in a device tensor, attending to the whole buffer under a
  mask from that position, so the shape never changes while the answer grows.

On CPU both run their bodies eagerly: the code the graphs record, and what the CPU tests check.
"""

from __future__ import annotations

import time
import weakref

import torch

from blend import scattered
from blend.adapter import LlamaStep, PooledDecode
from blend.cache import KVCache, KVPool


def _warm_up(*bodies) -> None:
    """Run each body once on a side stream before capturing it (cuBLAS workspaces, lazy inits)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for body in bodies:
            body()
    torch.cuda.current_stream().wait_stream(side)


def _record(body, pool=None):
    """(graph, body's output) of one capture of `body` into `pool` (None: a pool of its own)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = body()
    return graph, out


class _Buckets:
    """State captured per bucket size (a token count, a batch size), made at its first use or all at
    start-up (`capture_all`); a size n runs in the smallest bucket >= n."""

    def __init__(self, buckets: tuple[int, ...]):
        self.buckets = tuple(sorted(buckets))
        self._sets: dict = {}
        self.capture_s = 0.0

    def bucket(self, n: int) -> int | None:
        """The bucket n runs in, or None (eager) past the largest."""
        for rows in self.buckets:
            if rows >= n:
                return rows
        return None

    def _make(self, rows: int):
        raise NotImplementedError

    def _set(self, rows: int):
        made = self._sets.get(rows)
        if made is None:
            start = time.perf_counter()
            made = self._sets[rows] = self._make(rows)
            self.capture_s += time.perf_counter() - start
        return made

    def capture_all(self) -> float:
        """Capture every bucket now (start-up), not at the first step that needs it; seconds taken."""
        before = self.capture_s
        for rows in self.buckets:
            self._set(rows)
        return self.capture_s - before


class GraphDecoder:
    """Next-token logits for one request whose KV buffer is `cache`, one token at a time."""

    def __init__(self, step: LlamaStep, cache: KVCache, warmup: int = 2):
        self.step = step
        self.cache = cache
        device = step.device
        self._token = torch.zeros(1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)
        self._keys = torch.arange(cache.capacity, device=device)
        self._logits: torch.Tensor | None = None
        self.graph = None
        self.capture_s = 0.0
        if device.type == "cuda":
            self._capture(warmup)

    def _body(self) -> torch.Tensor:
        step, cache, position = self.step, self.cache, self._position
        mask = torch.zeros(cache.capacity, dtype=step.dtype, device=position.device)
        mask = mask.masked_fill(self._keys > position, float("-inf"))[None, None, None, :]
        h, rope = step.embed(self._token), step.cos_sin(position)
        for layer in range(step.n_layers):
            q, k, v = step.qkv(layer, h, position, rope)
            cache.write(layer, position, k, v)
            h = step._project(layer, h, step.attention(q, *cache.keys_values(layer, cache.capacity), mask))
        return step.logits(h)[0]

    def _capture(self, warmup: int) -> None:
        start = time.perf_counter()
        # The position the warm-up runs write to is the buffer's last: never a filled one (a request's
        # prompt and answer end before it, or the buffer is full and decode has stopped).
        self._position.fill_(self.cache.capacity - 1)
        _warm_up(*[self._body] * warmup)
        self.graph, self._logits = _record(self._body)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start

    def __call__(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Feed `token` at `position` (its K/V written there) and return the next token's logits [vocab]."""
        if not 0 <= position < self.cache.capacity:
            raise ValueError(f"position {position} is outside the KV buffer of {self.cache.capacity} tokens")
        self._token.fill_(int(token))
        self._position.fill_(position)
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self._logits.clone()


# Token counts the per-layer graphs are captured for: a step over n tokens runs in the smallest bucket
# >= n (its padded rows are computed and dropped: every op in the captured parts is row by row). Small
# ones serve decode batches and reuse's question, the rest small recompute sets; above the last, the
# step is compute-bound and runs eagerly. On the H200 (kvblend bench, session 8, two runs, eager
# against graphs in the same rounds) graphs gained 8 ms at 32 tokens (reuse), nothing at ~290 (blend@0.05:
# 29.9 / 30.1 ms, 31.1 / 30.7) and lost ~3 ms at ~800 (blend@0.15: 44.8 / 47.3, 45.7 / 48.2), padding
# to 896 rows costing more than the launches saved: so no bucket above 256. Session 10: on slower hosts
# blend@0.05 (~290 rows) is host-bound (H200 host issue 26.8 ms against 16.6 ms of GPU work,
# `services.bench.probe_profile`; 55 ms on another call's host, `probe_host`), where padding 290 rows to
# 320 costs ~10% of two matmul-light parts and saves ~15 launches a layer: buckets up to 384. Session 11: every
# 32 rows from 64 on (blend@0.05's 288 rows had padded to 320: 11% more of every matmul of the request), and up
# to 1,024, so blend@0.15's 800-row steps can run as graphs too (padding at most 31 rows, not to 896): with the
# fused kernels its GPU work was 23.1 ms of a 28.5 ms request (H200 probe_profile). Measured: no gain at 0.15 yet
# (30.64 against 30.18 ms eager, s11f), so those 5 ms of idle GPU are not the per-layer launches.
LAYER_BUCKETS = (1, 2, 4, 8, 16) + tuple(range(32, 1025, 32))


class _Bucket:
    """Static input/output buffers of one bucket, shared by its layers' graphs (they run one at a time)."""

    def __init__(self, step: LlamaStep, rows: int):
        dims = dict(dtype=step.dtype, device=step.device)
        # The layer's input (pre's, and post's residual), then its output: post writes it back here, so a
        # caller running every layer at once (a decode step) chains them without a copy.
        self.h = torch.zeros(rows, step.config.hidden_size, **dims)
        self.positions = torch.zeros(rows, dtype=torch.long, device=step.device)
        self.q = torch.zeros(rows, step.n_heads, step.head_dim, **dims)
        self.kv = torch.zeros(rows, 2, step.n_kv_heads, step.head_dim, **dims)
        self.attended = torch.zeros(rows, step.n_heads * step.head_dim, **dims)
        self.pre: list = []  # per layer: a CUDA graph; empty where the bodies run eagerly (CPU)
        self.post: list = []
        self.last_positions: torch.Tensor | None = None  # the positions tensor `positions` holds
        self.whole: list = []  # per layer, with a KV pool: the whole layer as one graph (`LayerGraphs.whole`)
        self.last_rows: tuple | None = None  # (positions tensor, cache offset) `pool_rows` was made from
        self.last_bounds: tuple[int, int] | None = None
        self.held: weakref.ref | None = None  # the view of `h` handed over as a layer's output (`LayerGraphs.CHAIN`)
        self.moved_out = 0  # handed-over views given storage of their own before another use of the bucket (`take`)

    def take(self, h: torch.Tensor) -> bool:
        """Before this bucket's `h` is written: True where `h` is the view it handed over last (the caller's previous
        layer's output: its rows are in place, and passing it back consumes it). Otherwise that view, if its holder
        still has it, first moves its rows into storage of its own (`Tensor.set_`: the holder's tensor keeps its
        values; a copy is enqueued, ordered before this bucket's next write), and False."""
        held = self.held() if self.held is not None else None
        self.held = None
        if held is None:
            return False
        if held is h:
            return True
        held.set_(held.clone())
        self.moved_out += 1
        return False

    def pooled(self, step: LlamaStep, keys_hint: int) -> None:
        """The whole-layer graphs' own buffers: each token's pool row (padding rows: scratch row 0), as
        the KV write's index and as the attention's positions (made int32 inside the graph); the request's
        (first key row, key count);
        the attention's output and, split in `pieces`, its workspace."""
        rows, device = self.h.shape[0], step.device
        self.pool_rows = torch.zeros(rows, dtype=torch.long, device=device)
        self.bounds = torch.zeros(2, dtype=torch.int64, device=device)
        self.out = torch.zeros(rows, step.n_heads, step.head_dim, dtype=step.dtype, device=device)
        # Pieces sized for a typical prompt (`keys_hint` keys; a shorter one walks shorter pieces).
        self.pieces = scattered.splits_for(rows, step.n_heads, step.n_kv_heads, keys_hint)
        self.workspace = (scattered.workspace_for(self.pieces, rows, step.n_heads, step.head_dim, device)
                          if self.pieces > 1 else None)


class LayerGraphs(_Buckets):
    """Each layer's row-wise parts as CUDA graphs, per bucket of token count (issue 16): `pre` (input
    norm, q/k/v projections, RoPE) and `post` (o_proj, residual, MLP, residual). The KV write and the
    attention stay eager between them: they touch the request's own buffer at its own length, so the
    graphs serve every request, prefill and decode batches alike, and a layer costs ~8 launches
    instead of ~45. The bodies are `LlamaStep.qkv` and `LlamaStep._project` themselves; on CPU they
    run eagerly on the same buffers (what the CPU tests check). One model thread uses them at a time.
    """

    # `whole` hands its output over as a view of the bucket's buffer, not a copy, and the caller's next layer of the
    # same bucket takes it in place: two copies of h a layer fewer (the clone out, the copy back in; ~8 us a layer of
    # an 800-row step on an H200, two launches on the host). The bucket remembers that view, and any other use of the
    # bucket first gives its holder the rows in storage of its own (`_Bucket.take`): a prefill yields between layers
    # and the server may run another request's steps on the same bucket then. On as served since the nineteenth
    # session (the H100's bench paired it, s22a, docs/gpu.md eighteenth session: with the other two defaults 1.085 and
    # 1.011 at 0.05 and 0.15 against 1.061 and 1.002 without it); its CUDA test (two requests alternating on the
    # captured whole-layer graphs) runs first in every bench call (`measure.sh bench`); the bench's `/unchained` rows
    # keep the pair.
    CHAIN = True

    def __init__(self, step: LlamaStep, buckets: tuple[int, ...] = LAYER_BUCKETS, kv_pool: KVPool | None = None,
                 keys_hint: int = 8192):
        super().__init__(buckets)
        self.step = step
        self._pool = torch.cuda.graph_pool_handle() if step.device.type == "cuda" else None
        # With a KV pool (and the scattered-attention kernel): also each whole layer as one graph for a
        # request whose cache is a range of it (`whole`): KV write and attention inside, addressed through
        # the pool with the request's offset in a device tensor: one launch a layer instead of ~6.
        self.kv_pool = kv_pool if kv_pool is not None and step.scattered_attention else None
        self.keys_hint = keys_hint  # the prompt length the whole-layer attention's pieces are sized for

    def _pre_body(self, b: _Bucket, layer: int) -> None:
        self.step.qkv_into(layer, b.h, b.positions, None, b.q, b.kv)

    def _post_body(self, b: _Bucket, layer: int) -> None:
        b.h.copy_(self.step._project(layer, b.h, b.attended))

    def _whole_body(self, b: _Bucket, layer: int) -> None:
        step, rows = self.step, self.kv_pool.layer_rows(layer)  # [pool tokens, 2, kv_heads, d]
        step.qkv_into(layer, b.h, b.positions, None, b.q, rows, b.pool_rows)  # the KV write into the pool with it
        out = scattered.attention(b.q, rows[:, 0].transpose(0, 1), rows[:, 1].transpose(0, 1), b.pool_rows,
                                  step.scale, splits=b.pieces, bounds=b.bounds, out=b.out, workspace=b.workspace)
        b.h.copy_(step._project(layer, b.h, out.view(out.shape[0], -1)))

    def _make(self, rows: int) -> _Bucket:
        b = _Bucket(self.step, rows)
        bodies = (self._pre_body, self._post_body)
        if self.kv_pool is not None:
            b.pooled(self.step, self.keys_hint)
            b.bounds.copy_(torch.tensor([self.kv_pool.block, 1]))  # warm-up and capture: scratch rows only
            bodies += (self._whole_body,)
        if self._pool is not None:
            layers = range(self.step.n_layers)
            _warm_up(*[lambda layer=layer, body=body: body(b, layer) for layer in layers for body in bodies])
            for layer in layers:
                # All graphs share one pool: they replay one at a time, and each copies its results
                # into the bucket's buffers, which live outside the pool.
                b.pre.append(_record(lambda layer=layer: self._pre_body(b, layer), self._pool)[0])
                b.post.append(_record(lambda layer=layer: self._post_body(b, layer), self._pool)[0])
                if self.kv_pool is not None:
                    b.whole.append(_record(lambda layer=layer: self._whole_body(b, layer), self._pool)[0])
            torch.cuda.synchronize()
        return b

    def pooled_for(self, n: int, cache: KVCache) -> bool:
        """Does a step of n tokens over `cache` run as whole-layer graphs (`whole`)?"""
        return self.kv_pool is not None and cache.pool is self.kv_pool and self.bucket(n) is not None

    def whole(self, layer: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, length: int) -> torch.Tensor:
        """`LlamaStep.step` for h [n, hidden] at positions [n] of `cache` (a range of the KV pool, keys
        0..length-1) as one graph: q/k/v, the KV write into the pool, attention over the request's rows
        (each token seeing positions up to its own), o_proj and MLP. Returns the layer's output [n, hidden]: a
        fresh tensor, or with `CHAIN` the bucket's rows, handed over (the bucket's buffers are shared: a prefill may
        yield between layers to other requests, and any other use of the bucket first moves those rows out, `take`)."""
        n = h.shape[0]
        b = self._set(self.bucket(n))
        if not b.take(h) and h.data_ptr() != b.h.data_ptr():
            b.h[:n].copy_(h)
        if b.last_rows is None or b.last_rows[0] is not positions or b.last_rows[1] != cache.offset:
            b.positions[:n].copy_(positions)
            b.last_positions = positions
            torch.add(b.positions[:n], cache.offset, out=b.pool_rows[:n])
            b.pool_rows[n:].zero_()  # padding rows: scratch row 0, below every request's first key row
            b.last_rows = (positions, cache.offset)
        if b.last_bounds != (cache.offset, length):
            # Two fills, not a copy from a host tensor: a blocking host-to-device copy waits for the GPU to
            # drain, and this runs at the first layer of each bucket a request uses (mid-request: the GPU then
            # idles while the host issues the next layer).
            b.bounds[0].fill_(cache.offset)
            b.bounds[1].fill_(length)
            b.last_bounds = (cache.offset, length)
        if b.whole:
            b.whole[layer].replay()
        else:
            self._whole_body(b, layer)
        if not self.CHAIN:
            return b.h[:n].clone()
        out = b.h[:n]
        b.held = weakref.ref(out)
        return out

    def pre(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """(bucket, q, kv) for h [n, hidden] at positions [n]: the layer's rotated q [rows, heads, d] (the
        bucket's rows; those past n are padding, for attention to use or drop) and stacked K/V [n, 2,
        kv_heads, d], as views of the bucket's buffers (valid until its next replay)."""
        n = h.shape[0]
        b = self._set(self.bucket(n))
        # (Not the previous layer's output, handed over or chained: already in place.)
        if not b.take(h) and h.data_ptr() != b.h.data_ptr():
            b.h[:n].copy_(h)
        if b.last_positions is not positions:
            b.positions[:n].copy_(positions)
            b.last_positions = positions
            b.last_rows = None  # `whole`'s pool rows were made from other positions
        if b.pre:
            b.pre[layer].replay()
        else:
            self._pre_body(b, layer)
        return b, b.q, b.kv[:n]

    def post(self, b: _Bucket, layer: int, attended: torch.Tensor, chain: bool = False) -> torch.Tensor:
        """The layer's output [n, hidden] from attention's output [n, heads x d] (or [n, heads, d]), the residual being the
        h `pre` took: a fresh tensor, or (`chain`) the bucket's own buffer, for a caller that passes it
        straight to the next layer's `pre` with nothing run in between (valid until the bucket's next use)."""
        n = attended.shape[0]
        b.attended[:n].view(attended.shape).copy_(attended)  # [n, heads x d] or [n, heads, d]
        if b.post:
            b.post[layer].replay()
        else:
            self._post_body(b, layer)
        return b.h[:n] if chain else b.h[:n].clone()


# Batch sizes the whole-step decode graphs are captured for: a step over n requests replays the
# smallest >= n (its extra rows decode a dummy token at the pool's scratch position, then are dropped).
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32)


class _DecodeSet:
    def __init__(self, step: LlamaStep, pool: KVPool, rows: int):
        self.rows = rows
        # [tokens | positions | pool rows | offsets (rows + 1) | keys seen | fed | slot]: the graph's one input.
        # fed: 1 where the row's token is not in `tokens` but in its request's slot of `DecodeGraphs.slots`.
        self.raw = DecodeGraphs.layout([], [], [], rows, pool).to(step.device)
        self.graph = None
        self.logits: torch.Tensor | None = None
        self.picks: torch.Tensor | None = None


class DecodeGraphs(_Buckets):
    """One decode step of up to 32 requests as one CUDA graph per batch size (issue 16's decode and
    issue 18's batched decode): embedding, every layer (the plain step: `LlamaStep.decode_pooled`, the
    new K/V written into the pool and one varlen attention call over it), the logits and each row's
    greedy token. Requests' caches must be ranges of `pool`; a step with any other cache, or more
    requests than the largest bucket, returns None and runs eagerly. Captured once (start-up), never per
    request. One model thread uses it at a time. On CPU the body runs eagerly on the same input (what
    the CPU tests check).

    Each request's greedy token is also left in its slot on the device (`slots`, one per pool block: a
    request's slot is its range's first block), where the next step may take it as its input without
    the host reading it first (`run` with None): so the host can enqueue a step before reading the token
    the one before made (blend.decode: one step ahead)."""

    def __init__(self, step: LlamaStep, pool: KVPool, buckets: tuple[int, ...] = DECODE_BUCKETS):
        super().__init__(buckets)
        self.step, self.pool = step, pool
        self._graph_pool = torch.cuda.graph_pool_handle() if step.device.type == "cuda" else None
        self.slots = torch.zeros(pool.tokens // pool.block, dtype=torch.long, device=step.device)
        self.last_picks: torch.Tensor | None = None  # the last step's greedy tokens [rows] (the bucket's buffer)

    @staticmethod
    def layout(caches: list[KVCache], tokens: list[int | None], ends: list[int], rows: int, pool: KVPool) -> torch.Tensor:
        """The host input of a batch: `PooledDecode.layout`, then per row whether its token is fed from its slot
        (None in `tokens`) and its slot (padding rows: slot 0, the pool's scratch block)."""
        fed = [int(token is None) for token in tokens] + [0] * (rows - len(caches))
        slots = [cache.offset // pool.block for cache in caches] + [0] * (rows - len(caches))
        pooled = PooledDecode.layout(caches, [0 if token is None else token for token in tokens], ends, rows, pool)
        return torch.cat((pooled, torch.tensor(fed + slots, dtype=torch.long)))

    def _body(self, d: _DecodeSet) -> tuple[torch.Tensor, torch.Tensor]:
        rows, raw = d.rows, d.raw
        pooled, fed, slot = raw[: 5 * rows + 1], raw[5 * rows + 1 : 6 * rows + 1], raw[6 * rows + 1 :]
        tokens = raw[:rows]
        tokens.copy_(torch.where(fed.bool(), self.slots[slot], tokens))
        logits = self.step.decode_pooled(PooledDecode.over(self.pool, pooled, rows, self.step.decode_splits),
                                         layer_graphs=False)
        picks = logits.argmax(-1)
        self.slots.index_copy_(0, slot, picks)  # padding rows all write slot 0 (scratch): any of theirs wins
        return logits, picks

    def _make(self, rows: int) -> _DecodeSet:
        d = _DecodeSet(self.step, self.pool, rows)
        if self._graph_pool is not None:
            _warm_up(lambda: self._body(d))  # writes the pool's scratch rows only
            d.graph, (d.logits, d.picks) = _record(lambda: self._body(d), self._graph_pool)
            torch.cuda.synchronize()
        return d

    def run(self, tokens: list[int | None], ends: list[int], caches: list[KVCache]) -> torch.Tensor | None:
        """Logits [n, vocab] of the next token of each request (token i fed at position ends[i] of
        caches[i]; None: the request's greedy token of its previous step through these graphs, from its
        slot), or None when this step cannot replay a graph. Each row's greedy token is then in
        `last_picks` (and in its slot)."""
        rows = self.bucket(len(caches))
        if rows is None or any(cache.pool is not self.pool for cache in caches):
            return None
        d = self._set(rows)
        raw = self.layout(caches, tokens, ends, rows, self.pool)
        if d.raw.is_cuda:
            # From pinned memory, not waiting for the GPU: a step may be enqueued while the one before runs.
            d.raw.copy_(raw.pin_memory(), non_blocking=True)
        else:
            d.raw.copy_(raw)
        if d.graph is None:
            logits, self.last_picks = self._body(d)
            return logits[: len(caches)]
        d.graph.replay()
        self.last_picks = d.picks
        return d.logits[: len(caches)].clone()
