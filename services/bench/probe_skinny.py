"""Probe (not a result): the few-rows matmul (blend/skinny.py) against cuBLAS as the decode step calls it
(`F.linear` for q/k/v and gate/up, `torch.addmm(h, x, W.t())` for o_proj and down_proj, residual added), on
the Llama-3-8B decode shapes in bf16 at 1 and 16 rows, for each (block_n, block_k, stages) below, 4 warps.

Each time is per call: `services.bench.gpu.graphed_ms` (GRAPH_CALLS calls captured in one CUDA graph, the
served step being a graph, replayed, CUDA events, median of GRAPH_REPLAYS replays). The calls cycle through
copies of the weight adding up to CYCLE_BYTES, so no call finds its weight in the 50 MB L2 (the step reads
each layer's weights once a token). GB/s counts the
weight's bytes once; errors are the max abs difference from cuBLAS's output. Then per (shape, rows) the best
variant and its speed-up over cuBLAS, the best single setting over all shapes, and a token's total at one
row over the 32 layers.

`python3 -m services.bench.probe_skinny [--json PATH]` on a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

from blend import skinny
from services.bench.gpu import GRAPH_CALLS, GRAPH_REPLAYS, graphed_ms

SHAPES = {"qkv": (6144, 4096, False), "o_proj": (4096, 4096, True), "gate_up": (28672, 4096, False),
          "down_proj": (4096, 14336, True)}  # name: (N, K, residual added)
ROWS = (1, 16)
LAYERS = 32
CYCLE_BYTES = 256e6
VARIANTS = list(itertools.product((16, 32, 64), (128, 256, 512), (3, 4)))  # (block_n, block_k, stages)
DEFAULT = (skinny.BLOCK_N, skinny.BLOCK_K, skinny.NUM_STAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows and the best variants here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("probe_skinny times CUDA graphs on a GPU; this machine has none: nothing to do")
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    results, best, failed = [], [], set()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':<10} {'rows':>4} {'kernel':<26} {'us/call':>8} {'GB/s':>6} {'vs cuBLAS':>9}")
    for name, (n, k, residual) in SHAPES.items():
        size = n * k * 2
        copies = max(2, math.ceil(CYCLE_BYTES / size))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k ** 0.5
                   for _ in range(copies)]
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
            h = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g) if residual else None

            def cublas(i, x=x, h=h, weights=weights):
                w = weights[i % len(weights)]
                return F.linear(x, w) if h is None else torch.addmm(h, x, w.t())

            expected = cublas(0)
            variants = [("cuBLAS (served)", None, cublas)]
            for variant in VARIANTS:
                def kernel(i, x=x, h=h, weights=weights, variant=variant):
                    block_n, block_k, stages = variant
                    return skinny.linear(x, weights[i % len(weights)], h, block_n=block_n, block_k=block_k, warps=4,
                                         stages=stages)
                mark = " *" if variant == DEFAULT else ""
                variants.append((f"n {variant[0]:2d} k {variant[1]:3d} st {variant[2]}{mark}", variant, kernel))
            for label, variant, call in variants:
                row = {"shape": name, "n": n, "k": k, "rows": rows, "kernel": label.rstrip(" *"),
                       "variant": variant}
                if (variant, residual) in failed:  # out of shared memory once: everywhere
                    results.append({**row, "error": "skipped: failed at an earlier shape"})
                    continue
                try:
                    error = (call(0).float() - expected.float()).abs().max().item()
                    us = 1e3 * graphed_ms(call)
                except Exception as exc:  # a probe: say what failed (a variant out of shared memory) and go on
                    failed.add((variant, residual))
                    results.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(f"{name:<10} {rows:4d} {label:<26} FAILED {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                results.append({**row, "us": round(us, 2), "gb_per_s": round(size / us / 1e3), "max_abs_vs_cublas": error})
                print(f"{name:<10} {rows:4d} {label:<26} {us:8.2f} {size / us / 1e3:6.0f} {error:9.5f}", flush=True)
    print("(* the module's defaults)\n")
    timed = [r for r in results if "us" in r]
    for name, rows in itertools.product(SHAPES, ROWS):
        here = [r for r in timed if r["shape"] == name and r["rows"] == rows]
        base = next(r for r in here if r["variant"] is None)
        top = min((r for r in here if r["variant"] is not None), key=lambda r: r["us"])
        best.append({"shape": name, "rows": rows, "cublas_us": base["us"], "best": top["kernel"], "us": top["us"],
                     "gb_per_s": top["gb_per_s"], "speedup": round(base["us"] / top["us"], 3)})
        print(f"best {name:<10} rows {rows:2d}: {top['kernel']:<18} {top['us']:7.2f} us ({top['gb_per_s']} GB/s) "
              f"against cuBLAS {base['us']:7.2f} us: {base['us'] / top['us']:.2f}x")
    one_setting = {}
    for rows in ROWS:  # the module constants serve every shape: the variant quickest over all four
        sums = {}
        for variant in VARIANTS:
            times = [r["us"] for r in timed if r["rows"] == rows and r["variant"] == variant]
            if len(times) == len(SHAPES):
                sums[variant] = sum(times)
        if sums:
            top = min(sums, key=sums.get)
            one_setting[rows] = {"variant": top, "sum_us": round(sums[top], 2),
                                 "default_sum_us": round(sums[DEFAULT], 2) if DEFAULT in sums else None}
            print(f"one setting, rows {rows:2d}: (block_n, block_k, stages) {top}, {sums[top]:.2f} us over the four "
                  f"shapes (defaults {DEFAULT}: {sums.get(DEFAULT, float('nan')):.2f})")
    ones = [b for b in best if b["rows"] == 1]
    token = {"cublas_ms": round(sum(b["cublas_us"] for b in ones) * LAYERS / 1e3, 3),
             "kernel_ms": round(sum(b["us"] for b in ones) * LAYERS / 1e3, 3)}
    print(f"a token at one row, {LAYERS} layers of the four projections: cuBLAS {token['cublas_ms']:.3f} ms, "
          f"best kernels {token['kernel_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "calls_per_graph": GRAPH_CALLS,
                       "replays": GRAPH_REPLAYS, "cycle_bytes": CYCLE_BYTES, "rows": results, "best": best,
                       "one_setting": {str(r): v for r, v in one_setting.items()}, "token_rows_1": token}, f, indent=1)


if __name__ == "__main__":
    main()
