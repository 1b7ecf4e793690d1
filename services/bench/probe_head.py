"""Probe (not a result): how many device operations the head of a served blend request issues, on any machine.

On the H200 the request's head (set-up, layer 0 with the question alone, the check layer's ranking) runs
host-bound: ~3 ms of host time on a quiet host, ~6 ms on a busy one, while the GPU does ~1 ms (docs/gpu.md,
ninth session); each device operation is a host call there. This runs the served selector's prefill of the
bench's prompt shape (10 x 512-token chunks, a 32-token question) on a tiny random model whose weights and KV
sit on the meta device, and counts per phase the operations on device tensors (views left out: they launch
nothing). The step runs its eager CPU path here (no Triton kernels, no graphs), so the layer steps' own counts
differ from a GPU's; the fusor's set-up and ranking are the same code on every device.
Run: python3 -m services.bench.probe_head; `--time [EARLIER_FUSOR]` times the set-up's host work instead (to the
first embedding; the meta device launches nothing: dispatch, Python and numpy only), against an earlier commit's
blend/fusor.py if given (`git show COMMIT:blend/fusor.py > /tmp/fusor_old.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from blend.adapter import LlamaStep
from blend.cache import ChunkKV
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill_layers
from services.settings import SERVED_SELECTOR

VIEWS = {"slice", "select", "view", "unsqueeze", "transpose", "t", "as_strided", "expand", "alias", "detach",
         "reshape", "_unsafe_view", "split_with_sizes", "unbind", "squeeze", "permute", "split", "chunk", "unflatten"}
PHASES = ("set-up and layer 0", "check layer (ranking, layers 0-1 of the kept)", "a later layer")


class _Count(TorchDispatchMode):
    """Operations touching a meta tensor (what would be device work), by name."""

    def __init__(self):
        super().__init__()
        self.device = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS and any(isinstance(t, torch.Tensor) and t.device.type == "meta"
                                     for t in tree_leaves((args, kwargs, out))):
            self.device[name] += 1
        return out


def meta_request(chunks: int = 10, chunk_tokens: int = 512, question_tokens: int = 32):
    """(step, layout, segments): a tiny random model's step with weights on the meta device, the bench's prompt
    shape, and the system prefix and chunks' K/V (computed on the host, then moved to the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.bench.gpu import make_layout

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    layout = make_layout(config.vocab_size, chunks, chunk_tokens, question_tokens)
    with torch.inference_mode():
        on_host = LlamaStep(model)
        prefix = compute_kv(on_host, layout.prefix)
        entries = [compute_kv(on_host, ids, behind=prefix) for ids in layout.chunks]
        step = LlamaStep(model.to("meta"))
        meta = [ChunkKV(token_ids=e.token_ids, start=e.start, kv=e.kv.to("meta")) for e in (prefix, *entries)]
    return step, layout, meta


def count_head(ratio: float = 0.05, selector: str = SERVED_SELECTOR, **shape) -> list[Counter]:
    """Per phase (PHASES), the device operations the fusor issues for one blend request."""
    step, layout, meta = meta_request(**shape)
    with torch.inference_mode():
        layers = prefill_layers(step, layout, BlendConfig("blend", ratio, selector=selector), MemorySource(meta))
        counts = []
        for _ in PHASES:
            with _Count() as count:
                next(layers)
            counts.append(count.device)
        layers.close()
    return counts


def time_setup(fusors: dict, ratio: float = 0.05, selector: str = SERVED_SELECTOR, rounds: int = 300) -> dict:
    """{label: median host us of the request's set-up} for each fusor module (the current and, say, an earlier
    commit's), their requests alternated on the meta device: from the call to the first embedding, the fusor's
    own host work before layer 0 runs (Python, numpy and dispatch; the meta device launches nothing)."""
    step, layout, meta = meta_request()
    embed, marks = step.embed, []

    def marked(*args, **kwargs):
        marks.append(time.perf_counter())
        return embed(*args, **kwargs)

    step.embed = marked
    times: dict = {label: [] for label in fusors}
    with torch.inference_mode():
        for _ in range(rounds):
            for label, fusor in fusors.items():
                config = fusor.BlendConfig("blend", ratio, selector=selector)
                marks.clear()
                started = time.perf_counter()
                layers = fusor.prefill_layers(step, layout, config, fusor.MemorySource(meta))
                next(layers)
                layers.close()
                times[label].append(1e6 * (marks[0] - started))
    return {label: statistics.median(t) for label, t in times.items()}


def _load(path: str):
    spec = importlib.util.spec_from_file_location("blend.fusor_earlier", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", metavar="EARLIER_FUSOR", nargs="?", const="",
                        help="time the set-up's host work instead, against an earlier commit's blend/fusor.py if given")
    args = parser.parse_args()
    if args.time is None:
        for ratio in (0.05, 0.15):
            for phase, count in zip(PHASES, count_head(ratio)):
                print(f"blend@{ratio:g} {phase}: {sum(count.values())} device operations "
                      f"{dict(count.most_common(12))}")
        return
    from blend import fusor

    fusors = {"this checkout": fusor} | ({args.time: _load(args.time)} if args.time else {})
    for ratio in (0.05, 0.15):
        setup = time_setup(fusors, ratio)
        print(f"blend@{ratio:g}, the set-up's host us (to the first embedding; median of 300 alternated requests, "
              f"meta device): " + ", ".join(f"{label} {us:.0f}" for label, us in setup.items()))


if __name__ == "__main__":
    main()
