"""Probe (not a result): the fused elementwise kernels (blend/fused.py) against the PyTorch passes they
replace, per layer on the 8B shape (32 heads, 8 KV heads, d 128, intermediate 14,336, bf16), at the token
counts the served requests bring (reuse's question, blend@0.05 and @0.15, a full prefill), and silu_mul
for several block shapes (rows, columns, warps). Times are CUDA events, median of 30; the bandwidth is the
bytes each kernel must move over its time.

`python3 -m services.bench.probe_fused` on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blend import fused
from blend.adapter import LlamaStep
from services.bench.probe_attention import timed

H, KVH, D, INTER = 32, 8, 128, 14336
ROWS = (32, 288, 800, 5184)
MLP_SHAPES = [(fused.MLP_ROWS, fused.MLP_COLUMNS, fused.MLP_WARPS), (1, 2048, 4), (2, 2048, 8), (8, 1024, 8),
              (4, 2048, 8), (16, 512, 4), (1, 4096, 8)]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows in ROWS:
        qkv = torch.randn(rows, (H + 2 * KVH) * D, device="cuda", generator=g, dtype=torch.bfloat16)
        q, k, v = (t.view(rows, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=1))
        positions = torch.randperm(8192, device="cuda", generator=g)[:rows].sort().values
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        cos, sin = LlamaStep._cos_sin(positions.float()[:, None] * inv_freq[None, :])
        cos, signed_sin = cos.to(torch.bfloat16), LlamaStep.signed_sin(sin).to(torch.bfloat16)
        cache = torch.zeros(8192, 2, KVH, D, device="cuda", dtype=torch.bfloat16)
        q_out = torch.empty(rows, H, D, device="cuda", dtype=torch.bfloat16)

        def passes():
            qk = LlamaStep.rotate_by(q.as_strided((rows, H + KVH, D), q.stride()), cos, signed_sin)
            cache.index_copy_(0, positions, torch.stack((qk[:, H:], v), dim=1))
            return qk[:, :H]

        base = timed(passes, 30)
        ms = timed(lambda: fused.rope_qkv(q, k, v, cos, signed_sin, q_out, cache, positions), 30)
        moved = rows * ((H + 2 * KVH) * D + H * D + 2 * KVH * D) * 2
        print(f"rope+kv write  rows {rows:5d}  passes {base:.4f} ms  kernel {ms:.4f} ms ({base / ms:.2f}x, "
              f"{moved / ms / 1e9:.2f} TB/s)")
        gate_up = torch.randn(rows, 2 * INTER, device="cuda", generator=g, dtype=torch.bfloat16)
        gate, up = gate_up.chunk(2, dim=-1)
        base = timed(lambda: F.silu(gate) * up, 30)
        out = torch.empty(rows, INTER, device="cuda", dtype=torch.bfloat16)
        moved = rows * INTER * 3 * 2
        for shape in MLP_SHAPES:
            fused.MLP_ROWS, fused.MLP_COLUMNS, fused.MLP_WARPS = shape
            ms = timed(lambda: fused.silu_mul(gate, up, out), 30)
            print(f"silu x up      rows {rows:5d}  passes {base:.4f} ms  kernel {shape} {ms:.4f} ms "
                  f"({base / ms:.2f}x, {moved / ms / 1e9:.2f} TB/s)")
        fused.MLP_ROWS, fused.MLP_COLUMNS, fused.MLP_WARPS = MLP_SHAPES[0]


if __name__ == "__main__":
    main()
