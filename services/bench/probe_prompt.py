"""Probe: the host time a served request spends building its prompt (`blend.prompt.build_layout`), with
the passages' token ids remembered (as served) against tokenized again each time (the cache cleared
before every build, as before the cache). `python3 -m services.bench.probe_prompt` (SmolLM2's tokenizer,
the first MuSiQue question's 10 passages, a new question each build)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from blend import prompt
from blend.loader import resolve
from services.bench.evaluate import load_dataset


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/musique_dev.json"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "kvblend")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m", args.cache_dir))
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


if __name__ == "__main__":
    main()
