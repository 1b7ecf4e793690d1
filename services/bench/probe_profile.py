"""Probe (not a result): where does a blend request's time go on a GPU: kernels, launches or host syncs?

Issue 16: on an H200 (8B shape, 10 x 512 chunks) reuse, which computes only the 32 question tokens,
takes ~59 ms and blend@0.05 is no faster than @0.15. For each mode this prints the wall time, the GPU
time the kernels were busy, the kernel count, and the host-device syncs (calls that wait for the GPU:
`.item()`, `.tolist()`, nonzero, blocking copies) with the op that caused each, so the floor can be
attributed before anything is rewritten. Also runs one CUDA-graph decode against the eager step.
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
from blend.graphs import GraphDecoder, LayerGraphs
from services.bench.gpu import served_prompt

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
    """Host time to run fn without the final sync: the launch cost, if nothing inside waits for the GPU."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    issued = 1e3 * (time.perf_counter() - start)
    torch.cuda.synchronize()
    return issued


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
        runs = {
            "hf_full": lambda: model(ids, use_cache=True, logits_to_keep=1),
            "full": lambda: prefill(step, layout, BlendConfig("full"), None),
            "reuse": lambda: prefill(step, layout, BlendConfig("reuse"), source()),
            "blend@0.05": lambda: prefill(step, layout, BlendConfig("blend", 0.05), source()),
            "blend@0.15": lambda: prefill(step, layout, BlendConfig("blend", 0.15), source()),
            "blend@0.05/cachedk": lambda: prefill(step, layout, BlendConfig(
                "blend", 0.05, selector="qattn+sink4+nofirst+cachedk"), source()),
        }
        graphs = LayerGraphs(step)
        print(f"layer graphs captured in {graphs.capture_all():.2f} s")

        def graphed(fn):
            step.graphs = graphs
            try:
                return fn()
            finally:
                step.graphs = None

        for name in ("reuse", "blend@0.05", "blend@0.15"):
            runs[f"{name}+graphs"] = lambda fn=runs[name]: graphed(fn)
        filled = prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + 64)
        decoding = Decoding(filled.cache, filled.length, filled.logits)
        runs["decode x16 eager"] = lambda: [advance(step, [decoding], [7]) for _ in range(16)]
        runs["decode x16 layer graphs"] = lambda: graphed(lambda: [advance(step, [decoding], [7]) for _ in range(16)])
        # The served decode: caches as ranges of a KV pool, each step one graph (batch 1 and 16).
        from services.bench.gpu import _Pooled

        pooled = _Pooled(step, filled.cache, 16, (1, 16))
        alone = Decoding(pooled.caches[0], filled.length, filled.logits)
        batch = [Decoding(cache, filled.length, filled.logits) for cache in pooled.caches]

        def pool_steps(decodings):
            with pooled:
                for _ in range(16):
                    advance(step, decodings, [7] * len(decodings))
            for d in decodings:
                d.length = filled.length
        runs["decode x16 pool graphs"] = lambda: pool_steps([alone])
        runs["decode x16 pool graphs, batch 16"] = lambda: pool_steps(batch)
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
        try:
            graphed = GraphDecoder(step, filled.cache)
            graphed(7, filled.length)
            median, least = _wall(lambda: [graphed(7, filled.length + i) for i in range(16)])
            print(f"\n== decode x16 graph: wall median {median:.1f} ms (min {least:.1f}), capture "
                  f"{1e3 * graphed.capture_s:.0f} ms")
        except Exception as error:  # a probe: report and go on
            print(f"graph decode failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
