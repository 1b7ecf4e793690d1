"""Probe (not a result): the scattered-query attention kernel (blend/scattered.py) against the step's
fallback, SDPA with the dense causal mask, per layer on the 8B shape (32 heads, 8 KV heads, d 128, keys
a 5,184-token view of a KV buffer, bf16), for the block sizes below. Each is checked against a float32
reference; times are CUDA events, median of 30 after warm-up.

  blend@0.15   800 scattered queries (15% of the chunks, the question at the end)
  blend@0.05   290 scattered queries
  reuse        the 32 question queries at the end

`python3 -m services.bench.probe_scattered` on a GPU.
"""
import time

import torch
import torch.nn.functional as F

from blend import scattered
from blend.adapter import causal_mask
from services.bench.probe_attention import timed

H, KVH, D, L = 32, 8, 128, 5184
# (BLOCK_M, BLOCK_N, warps, stages below MANY_ROWS, stages from it, GROUPED): the first is the default.
CONFIGS = [(scattered.BLOCK_M, scattered.BLOCK_N, scattered.NUM_WARPS, scattered.NUM_STAGES, scattered.NUM_STAGES_MANY,
            scattered.GROUPED),
           (64, 64, 4, 2, 3, False), (128, 64, 8, 2, 3, True), (128, 64, 8, 3, 3, True), (64, 128, 4, 2, 3, True),
           (64, 128, 8, 2, 3, True), (128, 128, 8, 2, 2, True), (32, 64, 4, 2, 3, True)]
FIELDS = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES", "NUM_STAGES_MANY", "GROUPED")


def use(config) -> None:
    for field, value in zip(FIELDS, config):
        setattr(scattered, field, value)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    buffer = torch.randn(L, 2, KVH, D, device="cuda", generator=g, dtype=torch.bfloat16)
    keys, values = buffer[:, 0].transpose(0, 1), buffer[:, 1].transpose(0, 1)
    question = torch.arange(L - 32, L, device="cuda")
    cases = {}
    for name, count in (("blend@0.15", 768), ("blend@0.05", 258)):
        chosen = torch.randperm(L - 32, device="cuda", generator=g)[:count]
        cases[name] = torch.cat((chosen.sort().values, question))
    cases["reuse"] = question
    for name, positions in cases.items():
        n = positions.shape[0]
        q = torch.randn(n, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
        mask = causal_mask(positions, L, torch.bfloat16)
        reference = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], keys.float()[None],
                                                   values.float()[None], attn_mask=mask.float(), scale=D ** -0.5,
                                                   enable_gqa=True)[0].transpose(0, 1)

        def dense():
            return F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                                  scale=D ** -0.5, enable_gqa=True)[0].transpose(0, 1)
        base = timed(dense, 30)
        print(f"{name:<11} queries {n:4d}  dense mask (SDPA) {base:.3f} ms  err {(dense().float() - reference).abs().max():.4f}")
        positions32 = positions.to(torch.int32)
        for config in CONFIGS:
            use(config)
            for splits in (None, 1, 2):
                out = scattered.attention(q, keys, values, positions32, D ** -0.5, splits=splits)
                err = (out.float() - reference).abs().max().item()
                ms = timed(lambda: scattered.attention(q, keys, values, positions32, D ** -0.5, splits=splits), 30)
                pieces = scattered.splits_for(n, H, KVH, L) if splits is None else 1
                print(f"{'':11} kernel {config} pieces {pieces:2d}  {ms:.3f} ms  ({base / ms:.2f}x)  err {err:.4f}")
        # The host's cost per call: many calls issued back to back, against the GPU's time for them.
        use(CONFIGS[0])
        for label, fn in (("kernel", lambda: scattered.attention(q, keys, values, positions32, D ** -0.5)),
                          ("dense", dense)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                fn()
            issued = (time.perf_counter() - start) / 200 * 1e3
            torch.cuda.synchronize()
            print(f"{'':11} {label}: host issue {issued:.3f} ms per call")


if __name__ == "__main__":
    main()
