"""Probe (not a result): where does a blend request's time go on a GPU: kernels, launches or host syncs?

Issue 16: on an H200 (8B shape, 10 x 512 chunks) reuse, which computes only the 32 question tokens,
takes ~59 ms and blend@0.05 is no faster than @0.15. For each mode this prints the wall time, the GPU
time the kernels were busy, the kernel count, and the host-device syncs (calls that wait for the GPU:
`.item()`, `.tolist()`, nonzero, blocking copies) with the op that caused each, so the floor can be
attributed before anything is rewritten. Blend rows use the served selector, eager, with the per-layer graphs
and with the whole-layer graphs over a KV pool; also the served decode (16 tokens, pool graphs).
Run: python3 -m services.bench.probe_profile (CUDA only).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from blend.decode import Decoding, advance
from blend.fusor import BlendConfig, MemorySource, prefill
from blend.graphs import LayerGraphs
from blend.cache import KVPool
from services.bench.gpu import _with_graphs, _with_pool_graphs, served_prompt, tier_store
from services.settings import SERVED_SELECTOR
from store.source import StoreSource

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")


def _wall(fn, repeats: int = 7) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times)


def _issue_ms(fn) -> float:
    """Host time to run fn without the final sync: the launch cost, if nothing inside waits for the GPU (a
    prefill does: it reads how many tokens it recomputed, so for prefill rows this is the wall time;
    `layer_timeline` separates host and GPU time per layer)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    issued = 1e3 * (time.perf_counter() - start)
    torch.cuda.synchronize()
    return issued


def layer_timeline(step, layout, config: BlendConfig, source_fn, pooled=None) -> dict:
    """Where the GPU idles in one request: the host's time to issue each layer (between the fusor's yields)
    against the GPU's time for it (CUDA events recorded at the same points: a layer the GPU finished faster
    than the host issued it leaves the GPU waiting). Also the host time before the first layer (set-up, the
    source's begin) and after the last (the result's read-back). `pooled`: run under whole-layer graphs."""
    from blend.fusor import prefill_layers

    def run():
        marks, host = [torch.cuda.Event(enable_timing=True)], [time.perf_counter()]
        marks[0].record()
        layers = prefill_layers(step, layout, config, source_fn())
        while True:
            try:
                next(layers)
            except StopIteration:
                break
            host.append(time.perf_counter())
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        torch.cuda.synchronize()
        host.append(time.perf_counter())
        return marks, host

    run() if pooled is None else _with_pool_graphs(step, pooled, run)  # warm
    marks, host = run() if pooled is None else _with_pool_graphs(step, pooled, run)
    gpu = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
    issue = [1e3 * (host[i + 1] - host[i]) for i in range(len(marks) - 1)]
    host_bound = [i for i, (g, h) in enumerate(zip(gpu, issue)) if h > g]
    return {"layers": len(gpu), "gpu_ms": round(sum(gpu), 2), "host_issue_ms": round(sum(issue), 2),
            "read_back_ms": round(1e3 * (host[-1] - host[-2]), 2), "layer0_host_ms": round(issue[0], 2),
            "layer0_gpu_ms": round(gpu[0], 2), "check_layer_host_ms": round(issue[1], 2),
            "check_layer_gpu_ms": round(gpu[1], 2),
            "later_layers_host_ms_each": round(statistics.median(issue[2:]), 3),
            "later_layers_gpu_ms_each": round(statistics.median(gpu[2:]), 3),
            "host_bound_layers": host_bound}


def idle_gaps(fn, least_us: float = 15.0, top: int = 14) -> dict:
    """Where the compute stream sits idle in one run of fn, and why: for each gap between two kernels (or
    copies) on the stream that does most of the work, whether the next one was launched late (the host was
    busy: `host_late`, with the line of kvblend's code that launched it) or launched in time and held back
    (waiting on an event, e.g. a KV copy: `held`). Totals by launching line, longest first. Read from the
    profiler's Chrome trace (its format links launches to kernels by correlation id in every torch). Stack
    tracing slows the host several times (H200: a 30 ms request spanned 77 ms), so host-late gaps are
    inflated: read the ranking of the lines, not the milliseconds (`layer_timeline` has those)."""
    import json
    import tempfile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = [e for e in json.load(open(trace.name))["traceEvents"] if e.get("ph") == "X"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not device:
        return {}
    busy = Counter()
    for e in device:
        busy[e["tid"]] += e["dur"]
    stream = busy.most_common(1)[0][0]
    work = sorted((e for e in device if e["tid"] == stream), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    frames = sorted((e for e in events if e.get("cat") == "python_function"
                     and any(part in e["name"] for part in ("blend/", "store/", "services/"))),
                    key=lambda e: e["ts"])

    def site(launch) -> str:
        """kvblend's innermost two frames around a launch (the Python calls enclosing it in time)."""
        at, tid = launch["ts"], launch["tid"]
        around = [f for f in frames if f["tid"] == tid and f["ts"] <= at <= f["ts"] + f["dur"]]
        around.sort(key=lambda f: -f["ts"])  # innermost first
        return " < ".join(f["name"].rsplit("/", 1)[-1] for f in around[:2]) or "?"

    by_site, late, held, gaps = Counter(), 0.0, 0.0, []
    for before, after in zip(work, work[1:]):
        end = before["ts"] + before["dur"]
        gap = after["ts"] - end
        if gap < least_us:
            continue
        launch = launches.get(after.get("args", {}).get("correlation"))
        where = site(launch) if launch is not None else "?"
        kind = "host_late" if launch is not None and launch["ts"] > end else "held"
        if kind == "host_late":
            late += gap
        else:
            held += gap
        gaps.append((round(gap / 1e3, 3), kind, before["name"][:28], after["name"][:28], where))
        by_site[f"{kind}: {where}"] += gap
    span = work[-1]["ts"] + work[-1]["dur"] - work[0]["ts"]
    return {"stream_busy_ms": round(busy[stream] / 1e3, 2), "span_ms": round(span / 1e3, 2),
            "idle_host_late_ms": round(late / 1e3, 2), "idle_held_ms": round(held / 1e3, 2),
            "by_site_ms": [(k, round(v / 1e3, 3)) for k, v in by_site.most_common(top)],
            "longest": sorted(gaps, key=lambda x: -x[0])[:top]}


def _profile(fn) -> dict:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    syncs = Counter()
    for e in events:
        if any(e.name.startswith(s.strip()) for s in SYNC_CALLS) or e.name in ("aten::item", "aten::_local_scalar_dense",
                                                                               "aten::nonzero"):
            syncs[e.name] += 1
    top_cpu = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:12]
    top_gpu = sorted(prof.key_averages(), key=lambda a: a.self_device_time_total, reverse=True)[:14]
    return {"kernels": len(kernels), "gpu_busy_ms": busy_us / 1e3, "syncs": dict(syncs),
            "top_cpu": [(a.key[:60], a.count, round(a.self_cpu_time_total / 1e3, 2)) for a in top_cpu],
            "top_gpu": [(a.key[:60], a.count, round(a.self_device_time_total / 1e3, 2)) for a in top_gpu]}


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with torch.inference_mode():
        model, step, layout, prefix, entries = served_prompt()
        source = lambda: MemorySource([prefix] + entries)  # noqa: E731
        ids = torch.tensor([layout.token_ids], device="cuda")
        served = dict(selector=SERVED_SELECTOR)  # the server's default selector
        runs = {
            "hf_full": lambda: model(ids, use_cache=True, logits_to_keep=1),
            "full": lambda: prefill(step, layout, BlendConfig("full"), None),
            "reuse": lambda: prefill(step, layout, BlendConfig("reuse"), source()),
            "blend@0.05": lambda: prefill(step, layout, BlendConfig("blend", 0.05, **served), source()),
            "blend@0.15": lambda: prefill(step, layout, BlendConfig("blend", 0.15, **served), source()),
        }
        graphs = LayerGraphs(step)
        print(f"layer graphs captured in {graphs.capture_all():.2f} s")
        # The whole-layer graphs over a KV pool (server.pool_layer_graphs), room for two requests.
        per_request = step.cache_tokens(len(layout) + 64)
        kv_pool = KVPool(step.n_layers, 512 + 2 * per_request, step.n_kv_heads, step.head_dim, step.dtype,
                         step.device, 512, step.longest_cache)
        pool_graphs = LayerGraphs(step, kv_pool=kv_pool)
        print(f"whole-layer graphs captured in {pool_graphs.capture_all():.2f} s")

        def graphed(fn):
            return _with_graphs(step, graphs, fn)

        for name in ("reuse", "blend@0.05", "blend@0.15"):
            runs[f"{name}+graphs"] = lambda fn=runs[name]: graphed(fn)
            runs[f"{name}+poolgraphs"] = lambda fn=runs[name]: _with_pool_graphs(step, pool_graphs, fn)
        filled = prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + 64)
        decoding = Decoding(filled.cache, filled.length, filled.logits)
        # The served decode: caches as ranges of a KV pool, each step one graph (batch 1).
        from services.bench.gpu import _Pooled

        pooled = _Pooled(step, filled.cache, 16, (1, 16))
        alone = Decoding(pooled.caches[0], filled.length, filled.logits)

        def pool_steps(decodings):
            with pooled:
                for _ in range(16):
                    advance(step, decodings, [7] * len(decodings))
            for d in decodings:
                d.length = filled.length
        runs["decode x16 pool graphs"] = lambda: pool_steps([alone])
        # Per layer, the served selector: host issue against GPU time (layer 0 includes the set-up before it),
        # before any profiling (a profiler's tracing can linger and slow the host).
        for ratio in (0.05, 0.15):
            config = BlendConfig("blend", ratio, **served)
            for label, whole in (("eager", None), ("poolgraphs", pool_graphs)):
                print(f"\n== layers blend@{ratio:g} {label}:", layer_timeline(step, layout, config, source, whole))
        for name, fn in runs.items():
            for _ in range(3):
                fn()
            decoding.length = filled.length
            median, least = _wall(fn)
            if name.startswith("decode"):
                decoding.length = filled.length
            issued = _issue_ms(fn)
            if name.startswith("decode"):
                decoding.length = filled.length
            p = _profile(fn)
            if name.startswith("decode"):
                decoding.length = filled.length
            print(f"\n== {name}: wall median {median:.1f} ms (min {least:.1f}), host issue {issued:.1f} ms, "
                  f"GPU busy {p['gpu_busy_ms']:.1f} ms in {p['kernels']} kernels, syncs {p['syncs']}")
            print("  top host ops (name, calls, self ms):", p["top_cpu"])
            print("  top GPU ops (name, calls, self ms):", p["top_gpu"])
        # The compute stream's idle gaps, KV in GPU memory and from the CPU tier through the server's source.
        store, keys = tier_store("cpu", entries, "probe")
        from_cpu = lambda: StoreSource(store, [prefix, *keys], device="cuda").begin()  # noqa: E731
        gap_runs = {
            "blend@0.05 poolgraphs gpu": lambda: _with_pool_graphs(
                step, pool_graphs, lambda: prefill(step, layout, BlendConfig("blend", 0.05, **served), source())),
            "blend@0.05 poolgraphs cpu": lambda: _with_pool_graphs(
                step, pool_graphs, lambda: prefill(step, layout, BlendConfig("blend", 0.05, **served), from_cpu())),
            # (as served: the whole-layer graphs; the eager rows' gaps were the host's launches, s13b)
            "blend@0.15 poolgraphs gpu": lambda: _with_pool_graphs(
                step, pool_graphs, lambda: prefill(step, layout, BlendConfig("blend", 0.15, **served), source())),
            "blend@0.15 poolgraphs cpu": lambda: _with_pool_graphs(
                step, pool_graphs, lambda: prefill(step, layout, BlendConfig("blend", 0.15, **served), from_cpu())),
            "reuse poolgraphs gpu": lambda: _with_pool_graphs(
                step, pool_graphs, lambda: prefill(step, layout, BlendConfig("reuse"), source())),
        }
        for name, fn in gap_runs.items():
            fn()
            gaps = idle_gaps(fn)
            print(f"\n== gaps {name}: " + ", ".join(f"{k} {v}" for k, v in gaps.items() if k not in ("by_site_ms", "longest")))
            for site, ms in gaps.get("by_site_ms", ()):
                print(f"  {ms:7.3f} ms  {site}")
            print("  longest:")
            for row in gaps.get("longest", ()):
                print("   ", row)


if __name__ == "__main__":
    main()
