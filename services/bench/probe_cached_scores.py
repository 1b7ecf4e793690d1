"""Probe (issue 16): can blend rank tokens on the *cached* K of the check layer instead of the recomputed K?

If it can, blend need not run layer 0 over every token: layer-0 K/V depend on a token's embedding alone,
so the cached layer-0 K/V are exact and only the question (to get its check-layer q) and the kept tokens
would run layer 0. That is ~4.6 ms of the 8B-shape request on an H200 (layer 0 over 5,184 tokens) and
the check layer's q/k/v for every token. Everything else blend computes is the same either way: the only
difference is which K the question's attention is scored against at the check layer.

This measures that difference's cost in fidelity: for each question, first-token KL(full || blend) with
the default selector scored on recomputed K (as served) and on the cached K (chunk tokens; the question's
own K stays fresh), at two ratios. `python3 -m services.bench.probecached_key_scores --limit 12 --json out.json`
(SmolLM2-135M, float32, CPU by default). A probe: nothing here is on the request path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blend import fusor
from blend.cache import ChunkKV
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from blend.loader import load
from blend.prompt import DEFAULT_SYSTEM, build_layout
from blend.quality import kl_divergence
from services.bench.evaluate import load_dataset

_served_scores = fusor.token_scores


def cached_key_scores(selector, q, k, v, cached, positions, n_question, scale, kernel=False):
    """`token_scores` with the chunk tokens' K taken from the placed (cached) buffer, the question's fresh."""
    placed = cached.index_select(0, positions)[:, 0].to(k.dtype)
    question = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
    question[-n_question:] = True
    k = torch.where(question[:, None, None], k, placed)
    return _served_scores(selector, q, k, v, cached, positions, n_question, scale, kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/musique_dev.json"))
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--first", type=int, default=0, help="skip the questions before this index")
    parser.add_argument("--ratios", default="0.05,0.15")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "kvblend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--time", type=int, default=0,
                        help="also time blend with the default selector against +cachedk (the real option), "
                             "this many interleaved rounds per question and ratio")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    model = load(args.model, args.cache_dir, torch.float32, args.device)
    step = model.step
    records = []
    with torch.inference_mode():
        prefix: ChunkKV | None = None
        for index, question in enumerate(load_dataset(args.dataset, args.limit, 10)):
            if index < args.first:
                continue
            began = time.perf_counter()
            layout = build_layout(model.tokenizer, list(question.passages), question.question, DEFAULT_SYSTEM)
            if step.max_positions and len(layout) > step.max_positions:
                continue
            if prefix is None or prefix.token_ids != layout.prefix:
                prefix = compute_kv(step, layout.prefix)
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            full = prefill(step, layout, BlendConfig("full"), None).logits
            reuse = prefill(step, layout, BlendConfig("reuse"), MemorySource([prefix, *chunks])).logits
            row = {"index": index, "tokens": len(layout), "reuse": kl_divergence(full, reuse)}
            for ratio in ratios:
                for name, scores in (("recomputed", _served_scores), ("cached", cached_key_scores)):
                    fusor.token_scores = scores
                    try:
                        logits = prefill(step, layout, BlendConfig("blend", ratio), MemorySource([prefix, *chunks])).logits
                    finally:
                        fusor.token_scores = _served_scores
                    row[f"{name}@{ratio:g}"] = kl_divergence(full, logits)
                if args.time:
                    times = {"default": [], "cachedk": []}
                    for _ in range(args.time):
                        for name, selector in (("default", BlendConfig.selector),
                                               ("cachedk", BlendConfig.selector + "+cachedk")):
                            began_run = time.perf_counter()
                            prefill(step, layout, BlendConfig("blend", ratio, selector=selector),
                                    MemorySource([prefix, *chunks]))
                            times[name].append(time.perf_counter() - began_run)
                    row[f"seconds_default@{ratio:g}"] = statistics.median(times["default"])
                    row[f"seconds_cachedk@{ratio:g}"] = statistics.median(times["cachedk"])
            records.append(row)
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}),
                  f"{time.perf_counter() - began:.0f} s", flush=True)
    labels = [k for k in records[0] if k not in ("index", "tokens") and not k.startswith("seconds_")]
    summary = {label: {"mean_kl": statistics.fmean(r[label] for r in records),
                       "median_kl": statistics.median(r[label] for r in records)} for label in labels}
    for ratio in ratios:
        summary[f"cached_not_worse@{ratio:g}"] = sum(
            r[f"cached@{ratio:g}"] <= r[f"recomputed@{ratio:g}"] * 1.1 + 1e-4 for r in records) / len(records)
        if args.time:
            summary[f"speedup_cachedk@{ratio:g}"] = statistics.median(
                r[f"seconds_default@{ratio:g}"] / r[f"seconds_cachedk@{ratio:g}"] for r in records)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": args.device, "n": len(records),
                                         "summary": summary, "questions": records}, indent=1))


if __name__ == "__main__":
    main()
