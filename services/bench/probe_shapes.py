"""Probe (not a result): does a new recompute-set size cost more than a repeated one on a GPU?

Issue 15's served blend@0.05, whose controller raised the ratio to a slightly different value on every
request (0.074, 0.075, ...), took 240 ms where a fixed 0.069 took 73 ms. Hypothesis: attention over an
explicit mask picks a backend that builds a plan per new shape. This times, on the 8B shape:
  1. masked SDPA (T queries over 5,184 keys) per backend, first call of a new T against a repeated T;
  2. the fusor's blend prefill at one fixed ratio against a new ratio every request, with the default
     SDPA choice and with the cuDNN backend disabled.
Run: python3 -m services.bench.probe_shapes (CUDA only).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from blend.adapter import LlamaStep, causal_mask
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from services.bench.gpu import build_model, make_layout


def _ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def sdpa_probe(length: int = 5184) -> None:
    k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    for name, backend in backends.items():
        firsts, repeats = [], []
        for t in range(400, 400 + 8 * 7, 7):  # a new T each time
            q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
            positions = torch.arange(length - t, length, device="cuda")
            mask = causal_mask(positions, length, torch.bfloat16)

            def call():
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            try:
                firsts.append(_ms(call))
                repeats.append(min(_ms(call) for _ in range(3)))
            except RuntimeError as error:
                print(f"sdpa {name}: not available ({str(error).splitlines()[0][:90]})")
                break
        if firsts:
            print(f"sdpa {name:9s}: first call of a new T median {sorted(firsts)[len(firsts) // 2]:7.2f} ms, "
                  f"repeated T {sorted(repeats)[len(repeats) // 2]:6.2f} ms")


def fusor_probe() -> None:
    model = build_model("llama3-8b")
    step = LlamaStep(model)
    layout = make_layout(model.config.vocab_size, 10, 512, 32)
    prefix = compute_kv(step, layout.prefix)
    entries = []
    for ids in layout.chunks:
        entries.append(compute_kv(step, ids, behind=prefix))
    source = lambda: MemorySource([prefix] + entries)  # noqa: E731
    for _ in range(3):
        prefill(step, layout, BlendConfig("blend", 0.08), source())
    for label, disable_cudnn in (("default SDPA", False), ("cuDNN off", True)):
        torch.backends.cuda.enable_cudnn_sdp(not disable_cudnn)
        fixed = [_ms(lambda: prefill(step, layout, BlendConfig("blend", 0.08), source())) for _ in range(8)]
        new = [_ms(lambda r=r: prefill(step, layout, BlendConfig("blend", r), source()))
               for r in [0.0701 + 0.0013 * i + (0.0003 if disable_cudnn else 0) for i in range(8)]]
        again = [_ms(lambda r=r: prefill(step, layout, BlendConfig("blend", r), source()))
                 for r in [0.0701 + 0.0013 * i + (0.0003 if disable_cudnn else 0) for i in range(8)]]
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"blend prefill, {label}: fixed ratio {med(fixed):6.1f} ms; a new ratio each request "
              f"{med(new):6.1f} ms; the same new ratios again {med(again):6.1f} ms")
    torch.backends.cuda.enable_cudnn_sdp(True)
    # A new prompt length each request (the question's length varies): full (is_causal) and reuse.
    layouts = [make_layout(model.config.vocab_size, 10, 512, 33 + i, seed=i) for i in range(6)]
    for mode in ("full", "reuse", "blend"):
        new, again = [], []
        for times in (new, again):
            for lay in layouts:
                entries = [compute_kv(step, ids, behind=prefix) for ids in lay.chunks]
                src = MemorySource([prefix] + entries)
                times.append(_ms(lambda: prefill(step, lay, BlendConfig(mode, 0.15), src)))
        print(f"{mode}: a new prompt length each request {sorted(new)[3]:6.1f} ms; the same lengths again "
              f"{sorted(again)[3]:6.1f} ms")


if __name__ == "__main__":
    print("torch", torch.__version__, torch.cuda.get_device_name())
    with torch.inference_mode():
        sdpa_probe()
        fusor_probe()
