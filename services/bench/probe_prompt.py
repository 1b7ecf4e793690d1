"""Probe: the host time a served request spends on its prompt before the first layer, on the host alone:
building it (`blend.prompt.build_layout`) with the passages' token ids remembered (as served) against
tokenized again each time (the cache cleared before every build, as before the cache); its chunks' keys
(`Precompute.key`) remembered (as served) against hashed each time; and its token ids made a tensor as
`prefill_layers` does (the layout's packed ids, `PromptLayout.packed_ids`: the chunks carry theirs from the
tokenizer's cache) against through an array of the list (before) and `torch.tensor` of the list.
`python3 -m services.bench.probe_prompt` (SmolLM2 on the CPU, the first MuSiQue question's 10 passages, a new
question each build)."""

from __future__ import annotations

import argparse
import statistics
import time
from array import array
from pathlib import Path

import torch

from blend import prompt
from blend.loader import load
from services.bench.evaluate import load_dataset
from services.precompute import Precompute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/musique_dev.json"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "kvblend")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    model = load("smollm2-135m", args.cache_dir)
    tokenizer = model.tokenizer
    passages = list(load_dataset(args.dataset, 1, 10)[0].passages)
    layout = prompt.build_layout(tokenizer, passages, "Warm up?", prompt.DEFAULT_SYSTEM)
    times = {"tokenized each time": [], "ids remembered": []}
    for turn in range(args.repeats):
        for name in times:
            if name == "tokenized each time":
                prompt._chunk_ids.cache_clear()
            began = time.perf_counter()
            prompt.build_layout(tokenizer, passages, f"Question {turn}?", prompt.DEFAULT_SYSTEM)
            times[name].append(1000 * (time.perf_counter() - began))
    print(f"{len(passages)} passages, {sum(map(len, layout.chunks))} chunk tokens; build_layout ms, median of "
          f"{args.repeats}: " + ", ".join(f"{name} {statistics.median(t):.2f}" for name, t in times.items()))
    precompute = Precompute(model.step, tokenizer, model.fingerprint)
    ids = layout.token_ids
    steps = {"chunk keys, hashed each time": lambda: (precompute._keys.clear(), [precompute.key(c) for c in layout.chunks]),
             "chunk keys, remembered (served)": lambda: [precompute.key(c) for c in layout.chunks],
             "token ids, torch.tensor of the list": lambda: torch.tensor(ids),
             "token ids, through an array": lambda: torch.frombuffer(array("q", layout.token_ids), dtype=torch.int64),
             "token ids, packed (served)": lambda: torch.from_numpy(layout.packed_ids())}
    for name, fn in steps.items():
        fn()
        took = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            fn()
            took.append(1e6 * (time.perf_counter() - began))
        print(f"{name}: {statistics.median(took):.0f} us a request (median of {args.repeats}; {len(ids)} prompt tokens)")


if __name__ == "__main__":
    main()
