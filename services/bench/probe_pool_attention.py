"""Probe (not a result): one decode step's attention over a shared KV pool, per layer on the 8B shape (32 heads,
8 KV heads, d 128, bf16), rows of 5,184 keys each at different starts of a 40,000-row pool layer: FlashAttention's
varlen call as `PooledDecode.attend` makes it (one split) against the pooled kernel (blend/pool_attention.py)
for each (pieces, BLOCK_N, stages). Each time is per call: 20 calls captured in one CUDA graph (the served
step is a graph), replayed, CUDA events, median of 5 replays. Errors are the max abs difference from the flash
output. GB/s counts each row's keys and values once. 16 rows of 5,184 keys need more than 40,000 rows: their
ranges overlap (evenly spaced starts), as they would not in service, so part of the reads may hit L2.

`python3 -m services.bench.probe_pool_attention [--json PATH]` on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch

from blend import pool_attention
from blend.adapter import PooledDecode
from blend.cache import KVPool
from services.bench.gpu import GRAPH_CALLS, graphed_ms

H, KVH, D, L = 32, 8, 128, 5184
POOL_ROWS = 40_000
SCALE = D ** -0.5
ROWS = (1, 16)
PIECES = (4, 8, 16, 32)
BLOCKS = (64, 128)
STAGES = (2, 3)


def batch(pool: KVPool, rows: int) -> PooledDecode:
    """The step's PooledDecode for `rows` requests of L keys, evenly spread over the pool past its scratch."""
    spacing = (pool.tokens - pool.block - L) // max(rows - 1, 1)
    caches = [SimpleNamespace(offset=pool.block + r * spacing) for r in range(rows)]  # what `layout` reads
    raw = PooledDecode.layout(caches, [0] * rows, [L - 1] * rows, rows, pool)
    return PooledDecode.over(pool, raw.to("cuda"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_pool_attention times CUDA graphs on a GPU; this machine has none")
    pool = KVPool(1, POOL_ROWS, KVH, D, torch.bfloat16, "cuda", longest=L)
    pool.data.normal_()
    layer = pool.layer_rows(0)
    keys, values = layer[:, 0], layer[:, 1]
    results = []
    print(f"{'rows':>4} {'kernel':<28} {'us/call':>8} {'GB/s':>6} {'vs flash':>9}")
    for rows in ROWS:
        step = batch(pool, rows)
        q = torch.randn(rows, H, D, device="cuda", dtype=torch.bfloat16)
        gigabytes = rows * L * KVH * D * 2 * 2 / 1e9  # keys and values, bf16

        def flash(step=step, q=q):
            return torch.ops.aten._flash_attention_forward(
                q, keys, values, step.queries, step.starts, 1, pool.longest, 0.0, False, False, scale=SCALE,
                seqused_k=step.used)[0]

        expected = flash()
        variants = [("flash varlen (served)", flash)]
        chosen = pool_attention.pieces_for(rows, KVH, L)
        for pieces in sorted({*PIECES, chosen}):
            workspace = pool_attention.workspace_for(pieces, rows, H, D, "cuda")
            out = torch.empty_like(q)
            for block_n in BLOCKS:
                if -(-L // pieces) < block_n:  # a piece shorter than one key block: nothing to learn
                    continue
                for stages in STAGES:
                    def kernel(pieces=pieces, workspace=workspace, out=out, block_n=block_n, stages=stages, q=q):
                        return pool_attention.decode(q, keys, values, step.starts[:rows], step.used, SCALE, pieces,
                                                     pool.longest, out=out, workspace=workspace, block_n=block_n,
                                                     stages=stages)
                    mark = " *" if pieces == chosen else ""
                    variants.append((f"pieces {pieces:2d} block {block_n:3d} st {stages}{mark}", kernel))
        for name, call in variants:
            try:
                error = (call().float() - expected.float()).abs().max().item()
                ms = graphed_ms(lambda i, call=call: call())
            except Exception as exc:  # a probe: say what failed (a variant out of shared memory) and go on
                results.append({"rows": rows, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"{rows:4d} {name:<28} FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            results.append({"rows": rows, "kernel": name, "us": round(ms * 1e3, 2),
                            "gb_per_s": round(gigabytes / (ms / 1e3)), "max_abs_vs_flash": error})
            print(f"{rows:4d} {name:<28} {ms * 1e3:8.2f} {gigabytes / (ms / 1e3):6.0f} {error:9.5f}", flush=True)
    print("(* pieces_for's choice)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [H, KVH, D, L],
                       "pool_rows": POOL_ROWS, "calls_per_graph": GRAPH_CALLS, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
