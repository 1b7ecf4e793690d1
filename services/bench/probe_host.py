"""Probe (not a result): where the host's time goes in a served-shape request on a GPU (8B shape, random
weights, 10 x 512 chunks from the CPU tier through the server's StoreSource, whole-layer graphs over a KV pool
as served). Prints, per request kind, the wall time, the host's time per phase (building the source, set-up
to layer 0's end, the check layer, the rest) and the Python functions with the most own time in the head
(cProfile over the source's building, the set-up, layer 0 and the check layer of several requests); then
the host cost of a few primitives the head calls. Writes the .prof files to $OUT (or /tmp/out).

`python3 -m services.bench.probe_host` on a GPU.
"""
from __future__ import annotations

import cProfile
import gc
import importlib
import inspect
import io
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

from blend.fusor import BlendConfig, prefill_layers
from blend.graphs import LayerGraphs
from services.bench.gpu import graphed_ms, host_us, request_pool, served_prompt, tier_store
from store import dma
from store.source import StoreSource

REQUESTS = 12

# The head's parts timed apart (`_parts`): (owner, attribute) as the fusor calls them.
PARTS = [("store.source:StoreSource", n) for n in ("__init__", "begin", "into", "layer", "ahead", "_issue", "_plan",
                                                   "_copies", "_gather", "_in_flight")] + [
    ("blend.fusor", n) for n in ("_turn", "_ranks", "_send_all", "_sent", "_place", "_keep", "token_scores")] + [
    ("blend.adapter:LlamaStep", n) for n in ("new_cache", "turning", "turn_pair", "signed_sin", "embed", "mask", "cos_sin",
                                              "qkv", "step", "turn_keys")]


class _Parts:
    """Host seconds inside each of PARTS while on (inclusive: a part called inside another counts in both;
    `top` sums only the outermost calls, so head minus top is the fusor's own lines)."""

    def __init__(self):
        self.total, self.calls, self.top, self.depth, self.on, self.saved = {}, {}, 0.0, 0, False, []
        for where, name in PARTS:
            module, _, cls = where.partition(":")
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            original = inspect.getattr_static(owner, name)
            self.saved.append((owner, name, original))
            static = isinstance(original, staticmethod)
            timed = self._wrap(f"{cls or module.split('.')[-1]}.{name}", original.__func__ if static else original)
            setattr(owner, name, staticmethod(timed) if static else timed)

    def _wrap(self, label, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            self.depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                self.depth -= 1
                self.total[label] = self.total.get(label, 0.0) + took
                self.calls[label] = self.calls.get(label, 0) + 1
                if self.depth == 0:
                    self.top += took
        return timed

    def restore(self):
        for owner, name, original in self.saved:
            setattr(owner, name, original)


def _enter(stream) -> None:
    with torch.cuda.stream(stream):
        pass


def timed_request(step, layout, config, make_source, profiler=None, parts=None, later=None) -> list[float]:
    """One request through `prefill_layers` on a source from `make_source()`: host ms at the source built, layer 0
    done, the check layer done, every layer issued and the GPU done, then a later layer's median host ms (not the
    last, whose call waits for the GPU's end; above the GPU's ~0.385 ms a layer of blend@0.05, s15a's timeline, the
    host paces the request). `profiler` (cProfile) and `parts` (`_Parts`) time the head; `later` (another `_Parts`)
    layers 2 to the one before the last, their host time added to `later.span`."""
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    if parts is not None:
        parts.on = True
    source = make_source()
    built = time.perf_counter()
    layers = prefill_layers(step, layout, config, source)
    next(layers)
    first = time.perf_counter()
    next(layers)
    check = time.perf_counter()
    if profiler is not None:
        profiler.disable()
    if parts is not None:
        parts.on = False
    marks = [check]
    if later is not None:
        later.on = True
    for index in layers:
        marks.append(time.perf_counter())
        if later is not None and later.on and index == step.n_layers - 2:
            later.on = False
            later.span += marks[-1] - check
    issued = time.perf_counter()
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    each = statistics.median(b - a for a, b in zip(marks[:-2], marks[1:-1])) if len(marks) > 2 else 0.0
    return [1e3 * (t - start) for t in (built, first, check, issued, done)] + [1e3 * each]


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with torch.inference_mode():
        _, step, layout, prefix, chunks = served_prompt()
        store, keys = tier_store("cpu", chunks, "probe-host")
        step.compile_kernels()
        step.kv_pool = request_pool(step, len(layout) + 64)
        step.graphs = LayerGraphs(step, kv_pool=step.kv_pool)
        step.graphs.capture_all()
        kinds = {
            "reuse": BlendConfig("reuse"),
            "blend@0.05/cachedk": BlendConfig("blend", 0.05, selector="qattn+sink4+nofirst+cachedk"),
            "blend@0.15/cachedk": BlendConfig("blend", 0.15, selector="qattn+sink4+nofirst+cachedk"),
            "blend@0.05": BlendConfig("blend", 0.05),
        }
        # The collector off while requests are timed, as `kvblend bench` times them (services/bench/gpu.py
        # `_interleaved`): a collection landing in one of the 12 requests a part's mean is taken over inflates it (s20a's
        # parts, e.g. `_turn` at ~0.1 ms a request, were taken with it on).
        gc.collect()
        gc.disable()
        for name, config in kinds.items():
            gc.collect()

            def request(profiler=None, parts=None, later=None, config=config):
                return timed_request(step, layout, config, lambda: StoreSource(store, [prefix, *keys],
                                                                               device=step.device).begin(),
                                     profiler, parts, later)

            for _ in range(3):
                request()
            marks = [request() for _ in range(REQUESTS)]
            med = [statistics.median(m[i] for m in marks) for i in range(6)]
            print(f"\n== {name}: wall median {med[4]:.2f} ms (min {min(m[4] for m in marks):.2f}); host at: source "
                  f"built {med[0]:.2f}, layer 0 done {med[1]:.2f}, check layer done {med[2]:.2f}, "
                  f"all issued {med[3]:.2f} ms; a later layer's host time {med[5]:.3f} ms")
            parts = _Parts()
            try:
                for _ in range(3):
                    request()
                heads = [request(parts=parts)[2] for _ in range(REQUESTS)]
            finally:
                parts.restore()
            head = statistics.fmean(heads)
            print(f"   head by part (host us a request, inclusive; mean of {REQUESTS}; head {1e3 * head:.0f} us, of it "
                  f"outside every part {1e3 * head - 1e6 * parts.top / REQUESTS:.0f} us):")
            for label, total in sorted(parts.total.items(), key=lambda item: -item[1]):
                print(f"     {label:28s} {1e6 * total / REQUESTS:7.0f} us in {parts.calls[label] / REQUESTS:4.1f} calls")
            later = _Parts()
            later.span = 0.0
            try:
                for _ in range(REQUESTS):
                    request(later=later)
            finally:
                later.restore()
            count = REQUESTS * (step.n_layers - 3)
            print(f"   a later layer by part (layers 2-{step.n_layers - 2}; host us a layer, inclusive; mean of {REQUESTS} "
                  f"requests; {1e6 * later.span / count:.0f} us a layer, of it outside every part "
                  f"{1e6 * (later.span - later.top) / count:.0f} us):")
            for label, total in sorted(later.total.items(), key=lambda item: -item[1]):
                print(f"     {label:28s} {1e6 * total / count:7.0f} us in {later.calls[label] / count:4.1f} calls")
            profiler = cProfile.Profile()
            for _ in range(REQUESTS):
                request(profiler)
            profiler.dump_stats(out / f"head_{name.replace('/', '_').replace('@', '_')}.prof")
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            print(f"   head under cProfile: {1e3 * stats.total_tt / REQUESTS:.2f} ms a request")
            stats.sort_stats("tottime").print_stats(30)
            body = text.getvalue().split("ncalls", 1)[-1]
            print("ncalls" + "\n".join(line[:150] for line in body.splitlines()[:32]))
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(r"(blend|store)/", 30)
            body = text.getvalue().split("ncalls", 1)[-1]
            print("cumulative, ours: ncalls" + "\n".join(line[:150] for line in body.splitlines()[:32]))

        gc.enable()
        # The host cost of primitives the head calls, each alone.
        host = torch.empty(512, 2, 8, 128, dtype=torch.bfloat16, pin_memory=True)
        dev = torch.empty(512, 2, 8, 128, dtype=torch.bfloat16, device="cuda")
        sources, targets = [host] * 11, [dev] * 11
        event = torch.cuda.Event()
        stream = torch.cuda.Stream()
        small = torch.arange(6000)
        prims = {
            "torch.cuda.Stream()": lambda: torch.cuda.Stream(),
            "Event() + record": lambda: torch.cuda.Event().record(),
            "Event(timing) + record": lambda: torch.cuda.Event(enable_timing=True).record(),
            "event.record (made)": lambda: event.record(),
            "event.query (done)": lambda: event.query(),
            "wait_event": lambda: torch.cuda.current_stream().wait_event(event),
            "one H2D copy_ of a 2 MB block (pinned)": lambda: dev.copy_(host, non_blocking=True),
            "_foreach_copy_ of 11 blocks H2D": lambda: torch._foreach_copy_(targets, sources, non_blocking=True),
            "dma.copy_async of 11 blocks H2D (the per-layer path)": lambda: dma.copy_async(targets, sources, stream),
            "with torch.cuda.stream(s): pass": lambda: _enter(stream),
            "small tensor .to(cuda, non_blocking)": lambda: small.to("cuda", non_blocking=True),
            "empty on cuda": lambda: torch.empty(6000, device="cuda"),
            "an elementwise kernel": lambda: dev.add_(0),
            "store.manifest": lambda: store.manifest(keys[0]),
            "store.layers_from (10 chunks)": lambda: store.layers_from([(k, store.manifest(k)) for k in keys], 3),
            "StoreSource(...) (11 segments)": lambda: StoreSource(store, [prefix, *keys], device="cuda"),
        }
        print("\n== primitives, host us a call (median of 200):")
        for label, fn in prims.items():
            print(f"   {label}: {host_us(fn)}")
        _kernels(step, layout)


def _kernels(step, layout) -> None:
    """The head's replaced operations against their kernels at the served shape: host and GPU time a call."""
    from blend import question_mass, rerotate
    from blend.selectors import question_attention

    n, first, question = len(layout), len(layout.prefix), len(layout.suffix)
    cache = torch.randn(n, 2, step.n_kv_heads, step.head_dim, device="cuda").to(step.dtype)
    keys = cache[first:, 0]
    old_new = torch.stack((torch.arange(first, n) - 300, torch.arange(first, n))).cuda()
    inv_freq = step.inv_freq.cuda()

    cos, signed_sin = step.turn_tables(old_new)
    q = torch.randn(question, step.n_heads, step.head_dim, device="cuda").to(step.dtype)
    positions = torch.arange(first, n, device="cuda")
    calls = {
        "re-rotation tables (LlamaStep.turn_tables), once a request": lambda: step.turn_tables(old_new),
        "re-rotation by tables (rerotate.turn), a layer": lambda: rerotate.turn(keys, cos, signed_sin),
        "re-rotation from positions (rerotate.turn_at, served), a layer": lambda: rerotate.turn_at(keys, old_new,
                                                                                                  inv_freq),
        "question mass, PyTorch (selectors.question_attention)": lambda: question_attention(
            q, keys, positions, question, step.scale),
        "question mass, kernels (question_mass.mass, served)": lambda: question_mass.mass(
            q, keys, positions, question, step.scale),
    }
    print(f"\n== the head's replaced operations at the served shape ({n - first} keys), a call: host us / GPU us "
          f"(in a CUDA graph)")
    for label, fn in calls.items():
        print(f"   {label}: {host_us(fn)} / {1000 * graphed_ms(lambda _, fn=fn: fn()):.1f}")


if __name__ == "__main__":
    main()
