"""Probe (not a result): where the host's time goes in a served-shape request on a GPU (8B shape, random
weights, 10 x 512 chunks from the CPU tier through the server's StoreSource, layer graphs on as served).
Prints, per request kind, the wall time, the host's issue time and the Python functions with the most
own time (cProfile over several requests); writes the .prof files to $OUT (or /tmp/out).

`python3 -m services.bench.probe_host` on a GPU.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import torch

from blend.fusor import BlendConfig, prefill
from blend.graphs import LayerGraphs
from services.bench.gpu import served_prompt, tier_store
from store.source import StoreSource

REQUESTS = 8


def main() -> None:
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with torch.inference_mode():
        _, step, layout, prefix, chunks = served_prompt()
        store, keys = tier_store("cpu", chunks, "probe-host")
        step.graphs = LayerGraphs(step)
        step.graphs.capture_all()

        def source():
            return StoreSource(store, [prefix, *keys], device="cuda").begin()

        kinds = {
            "reuse": BlendConfig("reuse"),
            "blend@0.05": BlendConfig("blend", 0.05),
            "blend@0.05/cachedk": BlendConfig("blend", 0.05, selector="qattn+sink4+nofirst+cachedk"),
            "blend@0.15/cachedk": BlendConfig("blend", 0.15, selector="qattn+sink4+nofirst+cachedk"),
        }
        for name, config in kinds.items():
            run = lambda: prefill(step, layout, config, source())  # noqa: E731
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            walls, issues = [], []
            for _ in range(REQUESTS):
                start = time.perf_counter()
                run()
                issues.append(1e3 * (time.perf_counter() - start))
                torch.cuda.synchronize()
                walls.append(1e3 * (time.perf_counter() - start))
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(REQUESTS):
                run()
            torch.cuda.synchronize()
            profiler.disable()
            # A plain file name (the device tool leaves out names with '@'): host_blend_0.05_cachedk.prof
            profiler.dump_stats(out / f"host_{name.replace('/', '_').replace('@', '_')}.prof")
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
            stats.print_stats(28)
            print(f"\n== {name}: wall median {sorted(walls)[REQUESTS // 2]:.1f} ms (min {min(walls):.1f}), "
                  f"host issue median {sorted(issues)[REQUESTS // 2]:.1f} ms")
            body = text.getvalue().split("ncalls", 1)[-1]
            print("ncalls" + "\n".join(line[:150] for line in body.splitlines()[:32]))
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(r"(blend|store)/", 24)
            body = text.getvalue().split("ncalls", 1)[-1]
            print("cumulative, ours: ncalls" + "\n".join(line[:150] for line in body.splitlines()[:26]))


if __name__ == "__main__":
    main()
