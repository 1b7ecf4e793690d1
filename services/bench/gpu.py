"""`kvblend bench`: GPU TTFT of full prefill, prefix, reuse and blend, chunk KV in each tier.

A Llama-3-8B-shaped model (32 layers, hidden 4096, 32/8 heads, bf16) built from its config with
random weights (timing does not depend on weight values), `--chunks` chunks of 512 tokens behind a
32-token system prefix, then a 32-token question. Every row is timed in this run, against full
prefill of the same prompt on the same GPU: request start (nothing loaded) to first-token logits,
median of `--repeats` after warm-up. Prints a table, writes JSON, a PNG plot and a profile summary.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blend.adapter import LlamaStep
from blend.cache import ChunkKV, KVCache
from blend.decode import Decoding, Sampling, advance, decode
from blend import fusor
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from blend.graphs import GraphDecoder, LayerGraphs, _record, _warm_up
from blend.loader import gate
from blend.prompt import PromptLayout, TokenIds
from services.settings import SERVED_SELECTOR
from store import dma
from store.keys import chunk_key
from store.source import StoreSource

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, rope_theta=1000000.0),
}


@dataclass(frozen=True)
class BenchConfig:
    shape: str = "llama3-8b"
    chunks: tuple[int, ...] = (10, 6, 20)
    chunk_tokens: int = 512
    question_tokens: int = 32
    ratios: tuple[float, ...] = (0.05, 0.15, 0.3)
    repeats: int = 20
    redis_url: str | None = None
    json_out: Path = Path("bench.json")
    plot: Path | None = None
    profile: Path | None = None
    # The first gets every blend row (the served default first); the others blend@0.05 and @0.15, CPU tier.
    selectors: tuple[str, ...] = (SERVED_SELECTOR,)
    layer_graphs: bool = True  # also time each cached-KV row with the per-layer CUDA graphs (blend/graphs.py)

    def __post_init__(self):
        for selector in self.selectors:
            BlendConfig("blend", selector=selector)  # a ValueError naming a bad selector, before any GPU work


def build_model(shape: str, device: str = "cuda"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", max_position_embeddings=16384, tie_word_embeddings=False,
                                  **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def make_layout(vocab: int, n_chunks: int, chunk_tokens: int, question_tokens: int, seed: int = 0) -> PromptLayout:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(10, vocab, (n,), generator=g).tolist())  # noqa: E731
    # Chunks as the server's layouts hold them (`encode_chunk`: packed too), the prefix and question as plain tuples.
    return PromptLayout(ids(32), tuple(TokenIds(ids(chunk_tokens)) for _ in range(n_chunks)), ids(question_tokens))


def served_prompt(n_chunks: int = 10, chunk_tokens: int = 512, question_tokens: int = 32, shape: str = "llama3-8b"):
    """(model, step, layout, prefix KV, chunks' KV) of the served prompt shape the benches and probes time:
    the system prefix's KV and each chunk's computed on its own behind it (call under inference_mode)."""
    model = build_model(shape)
    step = LlamaStep(model)
    layout = make_layout(model.config.vocab_size, n_chunks, chunk_tokens, question_tokens)
    prefix = compute_kv(step, layout.prefix)
    return model, step, layout, prefix, [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, warmup: int = 2) -> list[float]:
    return _interleaved([fn], repeats, warmup)[0]


# A graphed timing's calls per graph and replays (`graphed_ms`).
GRAPH_CALLS = 20
GRAPH_REPLAYS = 5


def graphed_ms(call, calls: int = GRAPH_CALLS, replays: int = GRAPH_REPLAYS) -> float:
    """Milliseconds per call of `call(i)` for a kernel probe: call(0 .. calls - 1) captured in one CUDA graph (the
    served steps are graphs, so launches cost what they cost there), after three calls on a side stream
    (compiles, workspaces); the median of `replays` replays timed by CUDA events."""
    _warm_up(*[lambda i=i: call(i) for i in range(3)])
    graph, _ = _record(lambda: [call(i) for i in range(calls)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / calls)
    return statistics.median(times)


def _interleaved(fns, rounds: int, warmup: int = 2, device: torch.device = torch.device("cuda")) -> list[list[float]]:
    """Seconds of each fn per round, the fns taking turns in every round (after `warmup` calls each)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for fn, bucket in zip(fns, times):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                bucket.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def host_us_per_launch(device: torch.device, count: int = 2000) -> float:
    """Microseconds the host takes to issue one tiny in-place op on `device` (no wait for it): the cost that
    the request's host-bound head (set-up, layer 0, the check layer's ranking) pays per operation. Taken
    at the bench's start and end, it tells a busy host from a quiet one, which full prefill's median/min
    (GPU-bound) does not."""
    x = torch.zeros(8, device=device)
    _sync(device)
    started = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    issued = time.perf_counter() - started
    _sync(device)
    return round(1e6 * issued / count, 2)


def host_us(fn, count: int = 200) -> float:
    """Median host microseconds of one call of fn over `count` calls, nothing waited for between them (the GPU,
    where there is one, synchronized before and after): what a call costs the host that issues it. One call
    first, untimed (lazy set-ups)."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    took = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        took.append(1e6 * (time.perf_counter() - started))
    if cuda:
        torch.cuda.synchronize()
    return round(statistics.median(took), 1)


def request_pool(step: LlamaStep, prompt_tokens: int, requests: int = 3):
    """A KV pool like the server's (its first block scratch) with room for `requests` caches of a prompt of
    `prompt_tokens` (a timed request's range is freed when its result is dropped, before the next is taken)."""
    from blend.cache import KVPool

    block = step.attention_buckets[1] if step.attention_buckets else 512
    per_request = step.cache_tokens(prompt_tokens)
    return KVPool(step.n_layers, block + requests * per_request, step.n_kv_heads, step.head_dim, step.dtype,
                  step.device, block, step.longest_cache)


def variant_base(label: str, labels) -> str | None:
    """The row a variant row varies (its label less the last "/" part, where that row ran too), else None: a variant
    is compared with it per round (`speedup_vs_base`), not only through each one's ratio to full prefill."""
    base = label.rsplit("/", 1)[0] if "/" in label else None
    return base if base in labels and base != label else None


def _paired(base: list[float], times: list[float]) -> float:
    """Median over rounds of base / this; rows timed apart from the rounds use medians instead."""
    if len(base) != len(times):
        return round(statistics.median(base) / statistics.median(times), 3)
    return round(statistics.median(b / t for b, t in zip(base, times)), 3)


def _with_fusion(step: LlamaStep, limit: int, fn):
    """fn() with steps of up to `limit` tokens projecting q/k/v and gate/up in one matmul each."""
    old, step.fuse_projections_up_to = step.fuse_projections_up_to, limit
    try:
        return fn()
    finally:
        step.fuse_projections_up_to = old


def _without_kernels(step: LlamaStep, fn, flags=("scattered_attention", "rerotate_kernel", "fused_kernels",
                                                  "question_kernel")):
    """fn() without the step's Triton kernels named by `flags` (default all: scattered queries attend through
    SDPA and the dense mask, placed keys re-rotate and RoPE, the KV write and SiLU x up run in PyTorch's passes)."""
    old = [getattr(step, flag) for flag in flags]
    for flag in flags:
        setattr(step, flag, False)
    try:
        return fn()
    finally:
        for flag, value in zip(flags, old):
            setattr(step, flag, value)


def _with_pool_graphs(step: LlamaStep, graphs: LayerGraphs, fn):
    """fn() with request caches taken from `graphs.kv_pool` and each layer of a bucket-sized step run as one
    whole-layer graph over it (LayerGraphs(kv_pool=)), the per-layer graphs for the rest."""
    old, (step.kv_pool, step.graphs) = (step.kv_pool, step.graphs), (graphs.kv_pool, graphs)
    try:
        return fn()
    finally:
        step.kv_pool, step.graphs = old


def _with_settings(settings, fn):
    """fn() with each (owner, name, value) of `settings` set, then set back: the request source's knobs
    (StoreSource.IN_FLIGHT, ISSUE_FIRST, PLAN_LAYERS, TURN_ASIDE, PLACE_DEVICE), the fusor's (AHEAD_BEFORE_CHECK,
    PLACE_ASIDE_FROM, COPY_BOUND_FIRST) and the layer graphs' (LayerGraphs.CHAIN) for a variant row."""
    old = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
    for owner, name, value in settings:
        setattr(owner, name, value)
    try:
        return fn()
    finally:
        for owner, name, value in old:
            setattr(owner, name, value)


def _without_batch(fn):
    """fn() with the request source's raw copies issued one cudaMemcpyAsync a block, not one batch a layer."""
    return _with_settings([(dma, "_memcpy_batch", lambda: None)], fn)


def _with_graphs(step: LlamaStep, graphs: LayerGraphs, fn):
    step.graphs = graphs
    try:
        return fn()
    finally:
        step.graphs = None


def time_decode(step: LlamaStep, model, layout: PromptLayout, steps: int = 32, repeats: int = 5,
                graphs: LayerGraphs | None = None) -> dict:
    """Decode ms/token at this prompt's context: our step (greedy, from a full prefill's cache) against the
    Hugging Face model's own `generate` with its cache, rounds interleaved. `generate` includes its
    prefill, so its per-token figure is (time for 1 + steps tokens - time for 1 token) / steps, `steps`
    forward passes of one token; ours times `steps` decode steps alone. Also says whether both picked the same tokens."""
    device = step.device
    filled = prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + steps + 1)
    ids = torch.tensor([layout.token_ids], device=device)
    hf_args = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)

    def ours():
        # `steps` tokens: the first from the prefill's logits, each followed by one decode step.
        return list(decode(step, filled.cache, filled.length, filled.logits, steps, set(), Sampling()))

    def hf(new):
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, **hf_args)[0, ids.shape[1]:].tolist()

    runs = {"ours": ours, "hf_one": lambda: hf(1), "hf_all": lambda: hf(steps + 1)}
    if graphs is not None:
        runs["ours_layer_graphs"] = lambda: _with_graphs(step, graphs, ours)
    graphed = GraphDecoder(step, filled.cache) if device.type == "cuda" else None
    if graphed is not None:
        def ours_graph():
            tokens, logits = [], filled.logits
            for offset in range(steps):
                tokens.append(int(logits.argmax()))
                logits = graphed(tokens[-1], filled.length + offset)
            return tokens

        runs["ours_graph"] = ours_graph
    pooled = flash = None
    if device.type == "cuda":
        # The served decode (pooled buffers, one graph per step, one step ahead), and the same with
        # FlashAttention's varlen kernel instead of the pool-attention kernel (the gain of that kernel, paired).
        pooled, flash = _Pooled(step, filled.cache, 1, (1,)), _Pooled(step, filled.cache, 1, (1,), kernel=False)
        cublas = _Pooled(step, filled.cache, 1, (1,), skinny=False)  # the projections through cuBLAS

        def through(p: _Pooled) -> list[int]:
            with p:
                return list(decode(step, p.caches[0], filled.length, filled.logits, steps, set(), Sampling()))

        runs["ours_pool_graphs"] = lambda: through(pooled)
        runs["ours_pool_flash"] = lambda: through(flash)
        runs["ours_pool_cublas"] = lambda: through(cublas)
    times = dict(zip(runs, _interleaved(list(runs.values()), repeats, warmup=1, device=device)))
    ours_ms = [1000 * t / steps for t in times["ours"]]
    hf_ms = [1000 * (a - b) / steps for a, b in zip(times["hf_all"], times["hf_one"])]
    return {"context_tokens": len(layout), "steps": steps, "repeats": repeats,
            "ours_ms_per_token": round(statistics.median(ours_ms), 3),
            "ours_min_ms_per_token": round(min(ours_ms), 3),
            "hf_generate_ms_per_token": round(statistics.median(hf_ms), 3),
            "speedup_vs_hf_generate": round(statistics.median(h / o for h, o in zip(hf_ms, ours_ms)), 3),
            "same_tokens": ours() == hf(steps),
            **({"layer_graphs_ms_per_token": round(statistics.median(1000 * t / steps for t in times["ours_layer_graphs"]), 3),
                "layer_graphs_same_tokens": _with_graphs(step, graphs, ours) == ours()} if graphs is not None else {}),
            **(_graph_figures(times["ours_graph"], ours_ms, steps, graphed, ours_graph() == ours())
               if graphed is not None else {}),
            **(_pool_figures(times["ours_pool_graphs"], hf_ms, steps, pooled, through(pooled) == ours())
               if pooled is not None else {}),
            **({"pool_graphs_splits": pooled.splits, "pool_graphs_attention_kernel": pooled.kernel,
                "pool_graphs_flash_ms_per_token": round(statistics.median(
                    1000 * t / steps for t in times["ours_pool_flash"]), 3),
                "pool_graphs_kernel_speedup_vs_flash": round(statistics.median(
                    f / o for f, o in zip(times["ours_pool_flash"], times["ours_pool_graphs"])), 3),
                "pool_graphs_skinny_shapes": [list(shape) for shape in step._skinny_shapes()] if pooled.skinny else [],
                "pool_graphs_cublas_ms_per_token": round(statistics.median(
                    1000 * t / steps for t in times["ours_pool_cublas"]), 3),
                "pool_graphs_skinny_speedup_vs_cublas": round(statistics.median(
                    c / o for c, o in zip(times["ours_pool_cublas"], times["ours_pool_graphs"])), 3)}
               if pooled is not None else {})}


class _Pooled:
    """`count` copies of a filled cache as ranges of a KV pool, with the served whole-step decode graphs
    over it (captured for `buckets`); `with` it, the step decodes through them (what the server runs)."""

    def __init__(self, step: LlamaStep, cache: KVCache, count: int, buckets: tuple[int, ...],
                 splits: int | None = None, kernel: bool | None = None, skinny: bool | None = None):
        from blend.cache import KVPool
        from blend.graphs import DecodeGraphs

        self.step, self.splits = step, step.decode_splits if splits is None else splits
        self.kernel = step.pool_attention_kernel if kernel is None else kernel
        self.skinny = step.skinny_kernel if skinny is None else skinny
        block = step.attention_buckets[1] if step.attention_buckets else 512
        size = -(-cache.capacity // block) * block
        self.pool = KVPool(step.n_layers, (count + 1) * size, step.n_kv_heads, step.head_dim, step.dtype,
                           step.device, block, step.longest_cache)  # as the server's
        self.caches = [self.pool.take(cache.capacity) for _ in range(count)]
        for own in self.caches:
            own.data[:, : cache.capacity].copy_(cache.data)
        self.graphs = DecodeGraphs(step, self.pool, buckets)
        with self, torch.inference_mode():
            self.capture_s = self.graphs.capture_all()

    def __enter__(self):
        self._splits, self.step.decode_splits = self.step.decode_splits, self.splits
        self._kernel, self.step.pool_attention_kernel = self.step.pool_attention_kernel, self.kernel
        self._skinny, self.step.skinny_kernel = self.step.skinny_kernel, self.skinny
        self.step.kv_pool, self.step.decode_graphs = self.pool, self.graphs
        return self

    def __exit__(self, *exc):
        self.step.kv_pool, self.step.decode_graphs, self.step.decode_splits = None, None, self._splits
        self.step.pool_attention_kernel, self.step.skinny_kernel = self._kernel, self._skinny


def _pool_figures(times: list[float], hf_ms: list[float], steps: int, pooled: _Pooled, same: bool) -> dict:
    """The served decode's row (pooled caches, one graph per step, captured once at start-up)."""
    pool_ms = [1000 * t / steps for t in times]
    return {"pool_graphs_ms_per_token": round(statistics.median(pool_ms), 3),
            "pool_graphs_min_ms_per_token": round(min(pool_ms), 3),
            "pool_graphs_speedup_vs_hf_generate": round(statistics.median(h / o for h, o in zip(hf_ms, pool_ms)), 3),
            "pool_graphs_capture_ms_once": round(1000 * pooled.capture_s, 1),
            "pool_graphs_same_tokens_as_eager": same}


def time_batch_decode(step: LlamaStep, layout: PromptLayout, graphs: LayerGraphs | None, batch: int = 16,
                      steps: int = 8, repeats: int = 3) -> dict:
    """ms per batched decode step of `batch` requests at this prompt's context, the attention one call
    per request against one call for the batch (`LlamaStep.batched_attention`), layer graphs as given,
    rounds interleaved; and whether both give the same tokens."""
    filled = prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + 2 * steps * (repeats + 2))
    caches = [KVCache(filled.cache.data.clone()) for _ in range(batch)]

    def greedy_steps(buffers: list[KVCache]) -> list[list[int]]:
        decodings = [Decoding(cache, filled.length, filled.logits) for cache in buffers]
        picked = []
        for _ in range(steps):
            picked.append([d.token() for d in decodings])
            advance(step, decodings, picked[-1])
        return picked

    def run(batched: bool) -> list[list[int]]:
        step.batched_attention = batched
        return greedy_steps(caches)

    pooled = _Pooled(step, filled.cache, batch, (batch,)) if step.device.type == "cuda" else None

    def run_pooled() -> list[list[int]]:
        with pooled:
            return greedy_steps(pooled.caches)

    old, step.graphs = step.batched_attention, graphs
    try:
        timed = _interleaved([lambda: run(False), lambda: run(True)] + ([run_pooled] if pooled else []), repeats,
                             warmup=1, device=step.device)
        per_request, together, *pool_runs = ([1000 * t / steps for t in runs] for runs in timed)
        same = run(False) == run(True)
        same_pooled = pooled is not None and run_pooled() == run(True)
    finally:
        step.batched_attention, step.graphs = old, None
    return {"batch": batch, "context_tokens": len(layout), "layer_graphs": graphs is not None,
            "per_request_attention_ms_per_step": round(statistics.median(per_request), 2),
            "batched_attention_ms_per_step": round(statistics.median(together), 2),
            "speedup": round(statistics.median(a / b for a, b in zip(per_request, together)), 3),
            "same_tokens": same,
            **({"pool_graphs_ms_per_step": round(statistics.median(pool_runs[0]), 2),
                "pool_graphs_speedup_vs_batched": round(statistics.median(
                    a / b for a, b in zip(together, pool_runs[0])), 3),
                "pool_graphs_same_tokens": same_pooled} if pool_runs else {})}


def _graph_figures(times: list[float], eager_ms: list[float], steps: int, graphed, same: bool) -> dict:
    """The CUDA-graph decode's row: ms/token (its loop reads each token back, as serving does), its
    gain over the eager step in the same rounds, the one-off capture time, and token agreement."""
    graph_ms = [1000 * t / steps for t in times]
    return {"graph_ms_per_token": round(statistics.median(graph_ms), 3),
            "graph_speedup_vs_eager": round(statistics.median(e / g for e, g in zip(eager_ms, graph_ms)), 3),
            "graph_capture_ms": round(1000 * graphed.capture_s, 1), "graph_same_tokens_as_eager": same}


def tier_store(tier: str, entries: list[ChunkKV], fingerprint: str, redis_url: str | None = None):
    """A store holding only `tier` ("gpu", "cpu" or "redis") with every chunk entry put in it, and the
    chunks' keys: what the server's store holds when the chunks sit in that tier."""
    from store.chunks import ChunkStore
    from store.memory_tier import MemoryTier
    from store.tiered import TieredStore

    if tier == "redis":
        from store.redis_tier import RedisTier

        layer = RedisTier(redis_url, f"kvblend-bench-{fingerprint}:")
    else:
        layer = MemoryTier(tier, "cuda" if tier == "gpu" else "cpu")
    store = ChunkStore(TieredStore([layer], [None]))
    keys = [chunk_key(fingerprint, (), e.token_ids, str(e.kv.dtype)) for e in entries]
    for key, entry in zip(keys, entries):
        store.put(key, entry)
    return store, keys


def copy_timeline(step, layout, store, prefix, keys, config: BlendConfig | None = None,
                  pool_graphs: LayerGraphs | None = None) -> dict:
    """CUDA-event timeline of one blend request served from the CPU tier by the server's source (`config`,
    default blend@0.15 with the default selector; `pool_graphs`: under the whole-layer graphs): for each
    layer, did its compute wait for its copy? Also where the request's wall time goes: the host's time to
    build and begin the source, to reach the first layer's end, and the GPU's time from the request's start
    to its last layer (second request: the first warms)."""
    from blend.fusor import prefill_layers

    config = config or BlendConfig(mode="blend", ratio=0.15)

    def one():
        torch.cuda.synchronize()
        start, origin = time.perf_counter(), torch.cuda.Event(enable_timing=True)
        origin.record()
        source = StoreSource(store, [prefix, *keys], device="cuda", timeline=True).begin()
        built = time.perf_counter()
        layers = prefill_layers(step, layout, config, source)
        next(layers)
        first = time.perf_counter()
        while True:
            try:
                next(layers)
            except StopIteration:
                break
        issued, end = time.perf_counter(), torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        done = time.perf_counter()
        first_copy = source._marks["copy_start"][0]
        return source, {"host_build_begin_ms": round(1e3 * (built - start), 3),
                        "host_to_first_layer_ms": round(1e3 * (first - start), 3),
                        "host_issue_all_ms": round(1e3 * (issued - start), 3),
                        # The request's GPU origin to the first copy's start: the layers' marks count from that copy.
                        "first_copy_ms": round(origin.elapsed_time(first_copy), 3) if first_copy is not None else None,
                        "gpu_span_ms": round(origin.elapsed_time(end), 3), "wall_ms": round(1e3 * (done - start), 3)}

    run = one if pool_graphs is None else (lambda: _with_pool_graphs(step, pool_graphs, one))
    run()
    source, request = run()
    stats = source.finish()
    return {"config": config.label, "request": request, "layers": source.timeline_ms(),
            "layers_that_waited_for_their_copy": stats.stalled_layers,
            "stall_ms": round(1000 * stats.stall_s, 3), "copy_ms": round(1000 * stats.copy_s, 3),
            "copy_bytes": stats.copy_bytes, "layers_checked": source.n_layers}


def profile_overlap(step, layout, source_factory, trace: Path) -> dict:
    """Profile one pipelined blend request; how much of the host-to-device copy time overlaps kernels."""
    from torch.profiler import ProfilerActivity, profile

    config = BlendConfig(mode="blend", ratio=0.15)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill(step, layout, config, source_factory())
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    copies = [(e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel")
    overlapped = 0.0
    for start, end in copies:
        covered, cursor = 0.0, start
        for k_start, k_end in kernels:
            if k_end <= cursor or k_start >= end:
                continue
            lo, hi = max(cursor, k_start), min(end, k_end)
            if hi > lo:
                covered += hi - lo
                cursor = hi
        overlapped += covered
    total = sum(end - start for start, end in copies)
    streams = sorted({e.get("tid") for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")})
    kernel_streams = sorted({e.get("tid") for e in events if e.get("cat") == "kernel"})
    return {"htod_copies": len(copies), "htod_copy_ms": round(total / 1000, 3),
            "htod_overlapped_with_kernels_ms": round(overlapped / 1000, 3),
            "overlap_fraction": round(overlapped / total, 3) if total else None,
            "copy_streams": streams, "kernel_streams": kernel_streams, "trace": trace.name}


def run_bench(config: BenchConfig) -> dict:
    if not torch.cuda.is_available():
        raise ValueError("kvblend bench measures GPU TTFT and needs a CUDA device (on CPU use kvblend eval)")
    model = build_model(config.shape)
    step = LlamaStep(model)
    vocab = model.config.vocab_size
    probe = make_layout(vocab, 1, 64, 16, seed=99).token_ids
    gate_error = gate(step, probe)
    rows, meta = [], {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": config.shape,
                      "gate_relative_error": gate_error,
                      "host_us_per_launch": [host_us_per_launch(step.device)]}  # start; end appended below
    with torch.inference_mode():
        meta["triton_compile_s"] = round(step.compile_kernels(), 2)  # once, at start-up, as the server does
    graphs = pool_graphs = None
    if config.layer_graphs:
        graphs = LayerGraphs(step)
        with torch.inference_mode():
            meta["layer_graphs_capture_s"] = round(graphs.capture_all(), 2)
        if step.scattered_attention:
            # Whole-layer graphs over a KV pool with room for three requests of the main prompt.
            kv_pool = request_pool(step, max(config.chunks) * config.chunk_tokens + 2 * config.question_tokens + 64)
            try:  # a capture failure costs these rows, not the run (the server falls back the same way)
                pool_graphs = LayerGraphs(step, kv_pool=kv_pool)
                with torch.inference_mode():
                    meta["pool_layer_graphs_capture_s"] = round(pool_graphs.capture_all(), 2)
            except Exception as err:  # noqa: BLE001
                pool_graphs, meta["pool_layer_graphs_error"] = None, f"{type(err).__name__}: {err}"
                print(f"whole-layer graphs over the KV pool: no rows ({meta['pool_layer_graphs_error']})")
    fingerprint = f"bench-{config.shape}"
    with torch.inference_mode():
        for n_chunks in config.chunks:
            main = n_chunks == config.chunks[0]
            layout = make_layout(vocab, n_chunks, config.chunk_tokens, config.question_tokens, seed=n_chunks)
            prefix = compute_kv(step, layout.prefix)
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            # Chunk KV in one tier of a store like the server's, read by the server's source.
            tiers = ["gpu", "cpu"] + (["redis"] if config.redis_url and main else [])
            stores = {tier: tier_store(tier, chunks, fingerprint, config.redis_url) for tier in tiers}

            def source(tier):
                store, keys = stores[tier]
                return StoreSource(store, [prefix, *keys], device="cuda").begin()

            ids = torch.tensor([layout.token_ids], device="cuda")
            plan = [("hf_full", "hf_full", None, None, lambda: model(ids, use_cache=True, logits_to_keep=1)),
                    ("full", "full", None, None, lambda: prefill(step, layout, BlendConfig("full"), None))]
            if main:
                plan.append(("prefix", "prefix", None, "gpu",
                             lambda: prefill(step, layout, BlendConfig("prefix"), MemorySource([prefix, chunks[0]]))))
                plan.append(("reuse", "reuse", None, "gpu",
                             lambda: prefill(step, layout, BlendConfig("reuse"), source("gpu"))))
            slow = []
            for tier in tiers:
                for ratio in config.ratios if main else (0.15,):
                    if tier == "redis" and ratio != 0.15:
                        continue
                    row = (f"blend@{ratio:g}/{tier}", "blend", ratio, tier,
                           lambda blend=BlendConfig("blend", ratio=ratio, selector=config.selectors[0]), tier=tier:
                           prefill(step, layout, blend, source(tier)))
                    (slow if tier == "redis" else plan).append(row)
            for selector in config.selectors[1:] if main else ():
                # The selector's own cost: the same requests as blend@0.05 and @0.15/cpu, another ranking.
                for ratio in (0.05, 0.15):
                    plan.append((f"blend@{ratio:g}/cpu/{selector}", "blend", ratio, "cpu",
                                 lambda blend=BlendConfig("blend", ratio=ratio, selector=selector):
                                 prefill(step, layout, blend, source("cpu"))))
            if graphs is not None:
                # The same requests with the per-layer graphs on (issue 16): eager and graph in one run.
                for label, mode, ratio, tier, fn in list(plan[2:]):
                    plan.append((f"{label}+graphs", mode, ratio, tier, lambda fn=fn: _with_graphs(step, graphs, fn)))
            if pool_graphs is not None and main:
                # Each layer as one graph over a KV pool (served by default: server.pool_layer_graphs) against the rows above;
                # the GPU tier's too, so issue 16's tier item compares the two tiers as served.
                for label, mode, ratio, tier, fn in [r for r in plan if r[0] in (
                        "reuse", "blend@0.05/cpu", "blend@0.15/cpu", "blend@0.05/gpu", "blend@0.15/gpu")]:
                    plan.append((f"{label}+poolgraphs", mode, ratio, tier,
                                 lambda fn=fn: _with_pool_graphs(step, pool_graphs, fn)))
                # The GPU tier's rows with its chunks placed by the source on its copy stream (and their keys turned
                # aside) at every ratio, and by the fusor on the compute stream at every ratio: served, the first from
                # fusor.PLACE_ASIDE_FROM on (StoreSource.PLACE_DEVICE), so at each ratio one of the two pairs the
                # served row against itself (a check of the rounds' noise).
                for label, mode, ratio, tier, fn in [r for r in plan if r[0] in (
                        "blend@0.05/gpu+poolgraphs", "blend@0.15/gpu+poolgraphs")]:
                    plan.append((f"{label}/placed-aside", mode, ratio, tier, lambda fn=fn: _with_settings(
                        [(StoreSource, "PLACE_DEVICE", True), (fusor, "PLACE_ASIDE_FROM", 0.0)], fn)))
                    plan.append((f"{label}/placed-inline", mode, ratio, tier, lambda fn=fn: _with_settings(
                        [(StoreSource, "PLACE_DEVICE", False)], fn)))
                    if ratio >= fusor.PLACE_ASIDE_FROM:
                        # Two layers' copies in flight, not three, for the GPU tier placed aside, as for the CPU tier
                        # below (`/in-flight2`: 1.012-1.033 of the served row at 0.15 in six runs, s23a and s24a-g).
                        plan.append((f"{label}/in-flight2", mode, ratio, tier, lambda fn=fn: _with_settings(
                            [(StoreSource, "IN_FLIGHT", 2)], fn)))
                card = fusor._card_name(torch.device(step.device))  # (fusor.COPY_BOUND_FIRST's key)
                # The served rows with fewer and more layers' copies kept in flight than served (StoreSource.IN_FLIGHT):
                # where the copy stream runs dry against where issuing costs the host more than it gives.
                for label, mode, ratio, tier, fn in [r for r in plan if r[0] in (
                        "blend@0.05/cpu+poolgraphs", "blend@0.15/cpu+poolgraphs")]:
                    for layers in (2, 5):
                        plan.append((f"{label}/in-flight{layers}", mode, ratio, tier,
                                     lambda fn=fn, layers=layers: _with_settings(
                                         [(StoreSource, "IN_FLIGHT", layers)], fn)))
                    # What the copy plan gives the served row (a few layers looked up in one pass, each layer's copies
                    # one prepared runtime call): each layer looked up and checked as it is issued, in the same rounds.
                    plan.append((f"{label}/looked-up-a-layer", mode, ratio, tier,
                                 lambda fn=fn: _with_settings([(StoreSource, "PLAN_LAYERS", 0)], fn)))
                    plan.append((f"{label}/plan8", mode, ratio, tier,
                                 lambda fn=fn: _with_settings([(StoreSource, "PLAN_LAYERS", 8)], fn)))
                    # Each of the eighteenth and nineteenth sessions' served defaults set back, and all three together
                    # (`/as-s21`: the request as s20a and s21 served it), against the served row in the same rounds:
                    # - `/four-first`: `into` looks up and issues four layers (StoreSource.ISSUE_FIRST, PLAN_LAYERS 4;
                    #   below fusor.PLACE_ASIDE_FROM, fusor.COPY_BOUND_FIRST for this card), not the head's two; the
                    #   head's host time against the copy stream's idle spell it spares. Where this card is served
                    #   more below PLACE_ASIDE_FROM (the H200: four), `/two-first` there sets the source's two back
                    #   (the other rows there keep the card's count: e.g. `/looked-up-a-layer` issues four at first);
                    # - `/turn-inline`: the placed keys re-rotated by the fusor on the compute stream before each
                    #   layer (StoreSource.TURN_ASIDE off), not on the source's stream once the layer's copies are done;
                    # - `/unchained`: each whole-layer graph's output cloned out of its bucket and copied back in by
                    #   the next layer (LayerGraphs.CHAIN off), not handed over as the bucket's rows (served since the
                    #   nineteenth session).
                    if ratio < fusor.PLACE_ASIDE_FROM and fusor.COPY_BOUND_FIRST.get(card) is not None:
                        plan.append((f"{label}/two-first", mode, ratio, tier, lambda fn=fn: _with_settings(
                            [(fusor, "COPY_BOUND_FIRST", {})], fn)))
                    else:
                        plan.append((f"{label}/four-first", mode, ratio, tier, lambda fn=fn, card=card: _with_settings(
                            [(StoreSource, "ISSUE_FIRST", 4), (StoreSource, "PLAN_LAYERS", 4),
                             (fusor, "COPY_BOUND_FIRST", {card: 4})], fn)))
                    plan.append((f"{label}/turn-inline", mode, ratio, tier, lambda fn=fn: _with_settings(
                        [(StoreSource, "TURN_ASIDE", False)], fn)))
                    plan.append((f"{label}/unchained", mode, ratio, tier, lambda fn=fn: _with_settings(
                        [(LayerGraphs, "CHAIN", False)], fn)))
                    plan.append((f"{label}/as-s21", mode, ratio, tier, lambda fn=fn: _with_settings(
                        [(StoreSource, "ISSUE_FIRST", 4), (StoreSource, "PLAN_LAYERS", 4),
                         (StoreSource, "TURN_ASIDE", False), (LayerGraphs, "CHAIN", False)], fn)))
                    # As the sixteenth session's s20a served it: `ahead` after the question-only layer 0 too, three
                    # layers' copies started by `into`.
                    plan.append((f"{label}/early-ahead", mode, ratio, tier, lambda fn=fn: _with_settings(
                        [(fusor, "AHEAD_BEFORE_CHECK", True), (fusor, "COPY_BOUND_FIRST", {}),
                         (StoreSource, "ISSUE_FIRST", 3)], fn)))
            if main:
                # Where one matmul for q/k/v (and for gate/up) pays: full prefill projected apart above 1,024
                # tokens against the default (fused everywhere with the fused kernels: LlamaStep._apart).
                for label, mode, ratio, tier, fn in list(plan[1:2]):
                    plan.append((f"{label}/apart", mode, ratio, tier, lambda fn=fn: _with_fusion(step, 1024, fn)))
                # The step's Triton kernels (scattered-query attention, re-rotation) against SDPA with the
                # dense mask and PyTorch's passes (LlamaStep.scattered_attention, rerotate_kernel).
                if step.scattered_attention:
                    for label, mode, ratio, tier, fn in [r for r in plan if r[0] in (
                            "reuse", "blend@0.05/cpu", "blend@0.15/cpu")]:
                        plan.append((f"{label}/no-triton", mode, ratio, tier,
                                     lambda fn=fn: _without_kernels(step, fn)))
                # The fused elementwise kernels alone (RoPE + KV write, SiLU x up; blend/fused.py), eager rows.
                if step.fused_kernels:
                    for label, mode, ratio, tier, fn in [r for r in plan if r[0] in (
                            "full", "blend@0.05/cpu", "blend@0.15/cpu")]:
                        plan.append((f"{label}/no-fused", mode, ratio, tier,
                                     lambda fn=fn: _without_kernels(step, fn, ("fused_kernels",))))
            # Rows interleaved round by round, so a slow spell of the machine hits every row alike; each
            # row's speed-up is the median over rounds of full's time / its time in the same round.
            times = _interleaved([fn for *_, fn in plan], config.repeats)
            times += [_time(fn, 3, warmup=1) for *_, fn in slow]
            by_label = {label: t for (label, *_), t in zip(plan + slow, times)}
            for (label, mode, ratio, tier, _), t in zip(plan + slow, times):
                rows.append({"chunks": n_chunks, "tokens": len(layout), "label": label, "mode": mode,
                             "ratio": ratio, "tier": tier, "ttft_ms": round(1000 * statistics.median(t), 2),
                             "ttft_min_ms": round(1000 * min(t), 2), "repeats": len(t),
                             "median_over_min": round(statistics.median(t) / min(t), 3),
                             "speedup_vs_full": _paired(by_label["full"], t),
                             "speedup_vs_hf": _paired(by_label["hf_full"], t)})
                base = variant_base(label, by_label)
                if base is not None:  # > 1: the variant is faster than the row it varies, in the same rounds
                    rows[-1]["base"], rows[-1]["speedup_vs_base"] = base, _paired(by_label[base], t)
            if main:
                full = by_label["full"]
                meta["full_median_over_min"] = round(statistics.median(full) / min(full), 3)
                meta["timeline"] = copy_timeline(step, layout, stores["cpu"][0], prefix, stores["cpu"][1])
                # The acceptance's blend rows as served (their selector, whole-layer graphs): where their time goes.
                for ratio in (0.05, 0.15):
                    meta[f"timeline_served_{ratio:g}"] = copy_timeline(
                        step, layout, stores["cpu"][0], prefix, stores["cpu"][1],
                        BlendConfig("blend", ratio=ratio, selector=config.selectors[0]), pool_graphs)
                meta["decode"] = time_decode(step, model, layout, repeats=max(3, config.repeats // 4), graphs=graphs)
                meta["decode_batch"] = time_batch_decode(step, layout, graphs)
                if config.profile:
                    meta["profile"] = profile_overlap(step, layout, lambda: source("cpu"), config.profile)
            stores.clear()
            torch.cuda.empty_cache()
    meta["host_us_per_launch"].append(host_us_per_launch(step.device))
    # The brief's rule for a noisy run (median over 1.3x its minimum), applied to every row: host-bound rows
    # (blend's head, HF's decode) show a busy host where full prefill (GPU-bound) does not.
    meta["noisy_rows"] = [row["label"] for row in rows if row["median_over_min"] > 1.3]
    return {"meta": meta, "config": {k: str(v) for k, v in config.__dict__.items()}, "rows": rows}


def format_table(rows: list[dict]) -> str:
    columns = ["chunks", "tokens", "label", "ttft_ms", "ttft_min_ms", "speedup_vs_full", "speedup_vs_hf",
               "speedup_vs_base"]
    cells = [[str(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    return "\n".join(["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
                     + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ("hf_full", "full", "blend@0.15/gpu", "blend@0.15/cpu"):
        points = sorted((r["tokens"], r["ttft_ms"]) for r in rows if r["label"] == label)
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: BenchConfig) -> int:
    """The bench as a program: prints the table and a summary, writes the JSON (and the plot)."""
    report = run_bench(config)
    print(format_table(report["rows"]))
    summary = {k: ({n: x for n, x in v.items() if n != "layers"} if k.startswith("timeline") else v)
               for k, v in report["meta"].items()}
    print(json.dumps(summary, indent=1))
    config.json_out.write_text(json.dumps(report, indent=1))
    if config.plot:
        plot(report["rows"], config.plot)
    return 0


def write_bench_model(folder: Path, shape: str, cache_dir: Path) -> Path:
    """A timing-only checkpoint of `shape` (random weights drawn at load) with the embedded model's
    tokenizer and chat template, so `kvblend serve --model FOLDER` serves an 8B-shaped model."""
    from transformers import AutoConfig, AutoTokenizer

    from blend.loader import resolve, write_random_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m", cache_dir))
    config = AutoConfig.for_model("llama", max_position_embeddings=16384, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **SHAPES[shape])
    return write_random_checkpoint(folder, config, tokenizer)
