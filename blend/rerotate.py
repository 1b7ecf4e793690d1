"""Re-rotating placed keys in one Triton kernel (issue 16).

Every request that places cached chunks moves their keys from the positions they were computed at to
where they sit now, in every layer: 5,120 keys x 8 heads x 128 in the 8B shape. In PyTorch that is five
passes over float32 copies (`LlamaStep.turn_in_place`: to float, x cos, roll, x signed sin + add, back),
~3 ms of a request's GPU time on an H200 (`services.bench.probe_profile`,
docs/ops/h200_probe_profile_s10b.txt) and five launches per layer on a host-bound path. This kernel reads each key once, rotates it in float32 and writes it back rounded once.

`turn(keys, cos, signed_sin)`: keys [T, H_kv, d] (a view into a KV buffer, unit stride along d), cos and
signed_sin [T, 1, d] float32 (`LlamaStep.turn_between`, `signed_sin`); in place, the arithmetic of
`turn_in_place` (x cos + roll(x, d/2) signed_sin in float32), to within its rounding (one fused multiply-add where
PyTorch rounds both products). Runs on CUDA; on the CPU only under Triton's
interpreter, for the tests.

`turn_at(keys, old_new, inv_freq)`: the same, each token's cos and signed sin computed in the kernel from its
positions then and now (old_new [2, T] int64) exactly as `LlamaStep.turn_pair` computes them (float32 angles,
their difference and its cos/sin in float64, rounded to float32): a request's set-up then builds no cos/sin
tables (~10 launches, 0.23 ms of host time in its head on an H200 host: `python3 -m services.bench.probe_host`,
docs/ops/h200_probe_host_s15b.txt), and a layer's pass reads 16 bytes a token instead of two float32 rows of d.
"""
from __future__ import annotations

import torch

from blend import scattered

triton = scattered.triton
BLOCK_T = 32
# Tokens a `turn_at` program takes: its float64 cos/sin of 8 tokens x d/2 angles fit the registers (8B shape, 4 warps:
# 74 registers, no spills, compiled offline for sm_90 as served by `python3 -m services.bench.probe_compile`); 32
# tokens x d angles (the twelfth session's first version) took all 255 registers and spilled 2.8 KB a thread.
TURN_AT_ROWS = 8

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["T"])
    def _turn(K, C, S, T, sk_t, sk_h, HEADS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = rows[:, None] < T
        dims = tl.arange(0, D)
        partner = (dims + D // 2) % D  # torch.roll(x, D / 2)[i] = x[(i - D / 2) mod D] = x[(i + D / 2) mod D]
        cos = tl.load(C + rows[:, None] * D + dims[None, :], mask=valid, other=0.0)
        sin = tl.load(S + rows[:, None] * D + dims[None, :], mask=valid, other=0.0)
        for head in tl.static_range(HEADS):
            base = K + rows[:, None] * sk_t + head * sk_h
            x = tl.load(base + dims[None, :], mask=valid, other=0.0).to(tl.float32)
            rolled = tl.load(base + partner[None, :], mask=valid, other=0.0).to(tl.float32)
            # One explicit fused multiply-add (x cos unrounded, plus the rolled half's product rounded), not left to
            # the compiler's contraction, which may pick either product: `_turn_at` spells the same one, so the two
            # kernels round alike to the bit on CUDA.
            tl.store(base + dims[None, :], tl.fma(x, cos, rolled * sin).to(K.dtype.element_ty), mask=valid)


    from triton.language.extra import libdevice

    @triton.jit(do_not_specialize=["T"])
    def _turn_at(K, P, F, T, sk_t, sk_h, HEADS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                 INTERPRETED: tl.constexpr):
        # Each token's D/2 angles once (dims d and d + D/2 share a frequency: emb = cat(angles, angles)), then each
        # head's two halves: lo' = lo cos + hi (-sin), hi' = hi cos + lo sin, which is x cos + roll(x, D/2) signed_sin
        # (`turn`'s arithmetic, operation for operation, its fused multiply-add spelled out alike).
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = rows < T
        valid = inside[:, None]
        half = tl.arange(0, D // 2)
        freq = tl.load(F + half)
        old = tl.load(P + rows, mask=inside, other=0).to(tl.float32)
        new = tl.load(P + T + rows, mask=inside, other=0).to(tl.float32)
        turned = (new[:, None] * freq[None, :]).to(tl.float64) - (old[:, None] * freq[None, :]).to(tl.float64)
        if INTERPRETED:  # numpy's float64 cos/sin (Triton's interpreter runs no libdevice)
            cos = tl.cos(turned).to(tl.float32)
            sin = tl.sin(turned).to(tl.float32)
        else:  # the CUDA math library's __nv_cos/__nv_sin, as PyTorch's float64 cos/sin on CUDA
            cos = libdevice.cos(turned).to(tl.float32)
            sin = libdevice.sin(turned).to(tl.float32)
        negated = -sin  # `LlamaStep.signed_sin`'s first half
        for head in tl.static_range(HEADS):
            base = K + rows[:, None] * sk_t + head * sk_h + half[None, :]
            lo = tl.load(base, mask=valid, other=0.0).to(tl.float32)
            hi = tl.load(base + D // 2, mask=valid, other=0.0).to(tl.float32)
            tl.store(base, tl.fma(lo, cos, hi * negated).to(K.dtype.element_ty), mask=valid)
            tl.store(base + D // 2, tl.fma(hi, cos, lo * sin).to(K.dtype.element_ty), mask=valid)

def turn(keys: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    rows, heads, dim = keys.shape
    if keys.stride(-1) != 1 or cos.shape != (rows, 1, dim) or signed_sin.shape != cos.shape:
        raise ValueError(f"keys {tuple(keys.shape)} (strides {keys.stride()}), cos {tuple(cos.shape)}, "
                         f"signed sin {tuple(signed_sin.shape)}: need [T, H, d] with unit stride and [T, 1, d]")
    if cos.dtype != torch.float32 or not cos.is_contiguous() or not signed_sin.is_contiguous():
        raise ValueError("cos and signed sin must be contiguous float32")
    if rows == 0:
        return
    scattered._launch(_turn, (triton.cdiv(rows, BLOCK_T), 1, 1), (keys, cos, signed_sin, rows),
                      (keys.stride(0), keys.stride(1)), dict(HEADS=heads, D=dim, BLOCK_T=BLOCK_T), (4, 2))


def turn_at(keys: torch.Tensor, old_new: torch.Tensor, inv_freq: torch.Tensor) -> None:
    rows, heads, dim = keys.shape
    if keys.stride(-1) != 1 or old_new.shape != (2, rows) or inv_freq.shape != (dim // 2,):
        raise ValueError(f"keys {tuple(keys.shape)} (strides {keys.stride()}), positions {tuple(old_new.shape)}, "
                         f"inverse frequencies {tuple(inv_freq.shape)}: need [T, H, d] with unit stride, [2, T], [d/2]")
    if old_new.dtype != torch.int64 or not old_new.is_contiguous() or inv_freq.dtype != torch.float32:
        raise ValueError("positions must be contiguous int64 and inverse frequencies float32")
    if rows == 0:
        return
    scattered._launch(_turn_at, (triton.cdiv(rows, TURN_AT_ROWS), 1, 1), (keys, old_new, inv_freq, rows),
                      (keys.stride(0), keys.stride(1)),
                      dict(HEADS=heads, D=dim, BLOCK_T=TURN_AT_ROWS, INTERPRETED=scattered.INTERPRETED), (4, 2))


def compile_variants(kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device, inv_freq: torch.Tensor,
                     tables) -> None:
    """Compile the kernels for this model shape now (start-up), keys laid out as in a KV buffer. `turn_at` is checked
    against `turn` by `tables(old_new)` (the step's cos and signed sin, `LlamaStep.turn_tables`) on a small case with
    positions as a request's: a kernel whose angles differ here raises, and `LlamaStep.compile_kernels` turns it
    off, so it is never served."""
    old_new = torch.stack((torch.arange(BLOCK_T) * 37 % 4096, torch.arange(BLOCK_T) * 101 + 5000)).to(device)
    keys = torch.randn(BLOCK_T, 2, kv_heads, dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    expected = keys.clone()
    turn(expected[:, 0], *tables(old_new))
    turn_at(keys[:, 0], old_new, inv_freq.to(device).float().contiguous())
    if not torch.allclose(keys.float(), expected.float(), rtol=1e-2, atol=1e-2):
        raise RuntimeError(f"turn_at differs from turn by {(keys.float() - expected.float()).abs().max().item():.3g}")
