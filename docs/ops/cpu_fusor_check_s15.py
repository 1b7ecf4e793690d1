"""One-off check (twelfth session): the fusor and step at HEAD against the session's base (bce9b81) on 300
configurations on the CPU: the same recomputed count, logits and cache, bit for bit (the set-up's re-rotation
positions by numpy, the check layer's keys a view of the buffer, `LlamaStep.turning`, the masks made only where
a step needs them).
Run: `git show bce9b81:blend/fusor.py > /tmp/fusor_old.py; git show bce9b81:blend/adapter.py > /tmp/adapter_old.py;
PYTHONPATH=. python3 docs/ops/cpu_fusor_check_s15.py`
"""

import importlib.util
import sys

import torch
from tests.helpers import model
from tests.helpers.model import random_layout

import blend.adapter as new_adapter
import blend.fusor as new


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


old_adapter = _load("blend.adapter_old", "/tmp/adapter_old.py")
old = _load("blend.fusor_old", "/tmp/fusor_old.py")
weights = model.tiny_model()
step_new, step_old = new_adapter.LlamaStep(weights), old_adapter.LlamaStep(weights)
SELECTORS = ["k", "v", "qattn", "k*qattn", "qattn+sink4", "qattn+gmax", "k*qattn+sink2+gmax", "qattn+cover0.8",
             "k*qattn+sink4+cover0.9+floor0.5", "qattn+sink4+nofirst", "qattn+nofirst+cover0.8",
             "qattn+sink4+nofirst+cachedk", "qattn+sink30+nofirst"]
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
                        a = new.prefill(step_new, layout, new.BlendConfig("blend", ratio, selector=selector,
                                                                          gradual_layers=gradual),
                                        new.MemorySource([prefix, *chunks]), recompute=recompute)
                        b = old.prefill(step_old, layout, old.BlendConfig("blend", ratio, selector=selector,
                                                                          gradual_layers=gradual),
                                        old.MemorySource([prefix, *chunks]), recompute=recompute)
                        assert a.recomputed == b.recomputed, case
                        assert torch.equal(a.logits, b.logits), case
                        assert torch.equal(a.cache.data, b.cache.data), case
                        count += 1
print("identical:", count, "configs")
