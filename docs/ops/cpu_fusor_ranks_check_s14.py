"""One-off check (eleventh session): the fusor with one rank tensor (25602f0) against the previous commit's
(2b4f98b) on 300 configurations: the same recomputed count, logits and cache, bit for bit.
Run: `git show 2b4f98b:blend/fusor.py > /tmp/fusor_old.py; PYTHONPATH=. python3 docs/ops/cpu_fusor_ranks_check_s14.py`
Output on the 2-core CPU: `identical: 300 configs`.
"""

import importlib.util
import sys

import torch
from tests.helpers import model
from tests.helpers.model import random_layout

import blend.fusor as new
from blend.adapter import LlamaStep

spec = importlib.util.spec_from_file_location("blend.fusor_old", "/tmp/fusor_old.py")
old = importlib.util.module_from_spec(spec)
sys.modules["blend.fusor_old"] = old
spec.loader.exec_module(old)
step = LlamaStep(model.tiny_model())
SELECTORS = ["k", "v", "qattn", "k*qattn", "qattn+sink4", "qattn+gmax", "k*qattn+sink2+gmax", "qattn+cover0.8",
             "k*qattn+sink4+cover0.9+floor0.5", "qattn+sink4+nofirst", "qattn+nofirst+cover0.8",
             "qattn+sink4+nofirst+cachedk", "qattn+sink30+nofirst"]
count = 0
with torch.inference_mode():
    for seed, lengths in [(1, (20, 33, 17)), (2, (5, 40, 12, 9))]:
        layout = random_layout(seed, lengths)
        prefix = new.compute_kv(step, layout.prefix)
        chunks = [new.compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
        for selector in SELECTORS:
            for ratio in (0.1, 0.3, 1.0):
                for gradual in (0, 3) if "cachedk" not in selector else (0,):
                    for recompute in ((), (1,)):
                        case = (selector, ratio, gradual, recompute)
                        a = new.prefill(step, layout, new.BlendConfig("blend", ratio, selector=selector,
                                                                      gradual_layers=gradual),
                                        new.MemorySource([prefix, *chunks]), recompute=recompute)
                        b = old.prefill(step, layout, old.BlendConfig("blend", ratio, selector=selector,
                                                                      gradual_layers=gradual),
                                        old.MemorySource([prefix, *chunks]), recompute=recompute)
                        assert a.recomputed == b.recomputed, case
                        assert torch.equal(a.logits, b.logits), case
                        assert torch.equal(a.cache.data, b.cache.data), case
                        count += 1
print("identical:", count, "configs")
