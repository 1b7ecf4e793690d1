"""One-off equivalence check on the CPU: the fusor (and step) of this checkout against an earlier commit's on 300
configurations (13 selectors, ratios 0.1/0.3/1, gradual filtering, a chunk prefilled in full, two layouts): the
same recomputed count, logits and cache, bit for bit. Prints `identical: 300 configs`.

Twelfth session (head against bce9b81, fusor and step): `git show bce9b81:blend/fusor.py > /tmp/fusor_old.py;
git show bce9b81:blend/adapter.py > /tmp/adapter_old.py; PYTHONPATH=. python3 docs/ops/cpu_fusor_check.py
/tmp/fusor_old.py --adapter /tmp/adapter_old.py`.
Eleventh session (the rank tensor, 25602f0 against 2b4f98b, fusor only; run in a checkout of 25602f0 with this
file copied in): `git show 2b4f98b:blend/fusor.py > /tmp/fusor_old.py; PYTHONPATH=. python3
docs/ops/cpu_fusor_check.py /tmp/fusor_old.py`.
"""

import argparse
import importlib.util
import sys

import torch
from tests.helpers import model
from tests.helpers.model import random_layout

import blend.adapter as new_adapter
import blend.fusor as new

SELECTORS = ["k", "v", "qattn", "k*qattn", "qattn+sink4", "qattn+gmax", "k*qattn+sink2+gmax", "qattn+cover0.8",
             "k*qattn+sink4+cover0.9+floor0.5", "qattn+sink4+nofirst", "qattn+nofirst+cover0.8",
             "qattn+sink4+nofirst+cachedk", "qattn+sink30+nofirst"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fusor", help="the earlier commit's blend/fusor.py")
    parser.add_argument("--adapter", help="the earlier commit's blend/adapter.py (its step runs the earlier fusor)")
    args = parser.parse_args()
    old = _load("blend.fusor_old", args.fusor)
    old_adapter = _load("blend.adapter_old", args.adapter) if args.adapter else new_adapter
    weights = model.tiny_model()
    step_new, step_old = new_adapter.LlamaStep(weights), old_adapter.LlamaStep(weights)
    count = 0
    with torch.inference_mode():
        for seed, lengths in [(1, (20, 33, 17)), (2, (5, 40, 12, 9))]:
            layout = random_layout(seed, lengths)
            prefix = new.compute_kv(step_new, layout.prefix)
            chunks = [new.compute_kv(step_new, ids, behind=prefix) for ids in layout.chunks]
            for selector in SELECTORS:
                for ratio in (0.1, 0.3, 1.0):
                    for gradual in (0, 3) if "cachedk" not in selector else (0,):
                        for recompute in ((), (1,)):
                            case = (selector, ratio, gradual, recompute)
                            results = [
                                fusor.prefill(step, layout, fusor.BlendConfig("blend", ratio, selector=selector,
                                                                              gradual_layers=gradual),
                                              fusor.MemorySource([prefix, *chunks]), recompute=recompute)
                                for fusor, step in ((new, step_new), (old, step_old))]
                            a, b = results
                            assert a.recomputed == b.recomputed, case
                            assert torch.equal(a.logits, b.logits), case
                            assert torch.equal(a.cache.data, b.cache.data), case
                            count += 1
    print("identical:", count, "configs")


if __name__ == "__main__":
    main()
