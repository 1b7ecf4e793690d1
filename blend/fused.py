"""The step's elementwise passes fused into Triton kernels (issue 16).

A recompute step over ~800 tokens spent ~10 ms of an 8B-shape request's 34 ms of GPU work on small
elementwise kernels (`services.bench.probe_profile`, docs/ops/h200_probe_profile_s10b.txt): RoPE as three
passes over strided slices of the fused q/k/v output (x cos, roll, x signed sin + add), the K/V stacked
and then copied into the cache, SiLU and the product with `up` as two more. Two kernels do the same work
in one pass each:

- `rope_qkv(q, k, v, cos, signed_sin, q_out, kv_out, slots)`: q and k rotated (`LlamaStep.rotate_by`'s
  arithmetic and rounding: x cos rounded to the model's dtype, then + roll(x) signed sin, rounded once),
  q into `q_out` [T, H, d], k and v into rows `slots` of `kv_out` [N, 2, H_kv, d] (a layer of a KV
  buffer: the cache write done in the same pass; slots None: rows 0..T-1).
- `silu_mul(gate, up, out)`: SiLU(gate) rounded to the model's dtype, times up, rounded once (the
  Hugging Face MLP's `act_fn(gate_proj(x)) * up_proj(x)`).
- `rms_norm(h, weight, eps)`: `F.rms_norm`'s arithmetic (float32, scaled by the weight, rounded once), one
  program a row. PyTorch's kernel took 6.3 us a call for one row on the H200 (65 a decode step: 0.41 ms of
  a 5.9 ms token, docs/ops/h200_probe_profile_s12a.txt); a step over few rows takes this one.

Inputs may be strided views (the fused projection's column slices) with a unit last stride. Runs on
CUDA; on the CPU only under Triton's interpreter (the tests), where `LlamaStep` keeps its PyTorch passes.
"""
from __future__ import annotations

import torch

from blend import scattered

triton = scattered.triton
ROPE_ROWS = 16  # tokens per program (one head each)
MLP_ROWS = 4  # tokens per program of silu_mul
MLP_COLUMNS = 1024  # columns per program of silu_mul
MLP_WARPS = 4
# Steps over at most this many rows normalise through `rms_norm` (decode, reuse's question, blend's recompute
# sets); larger ones keep PyTorch's kernel, measured at full prefill's size.
NORM_ROWS = 1024
# H200 (docs/ops/h200_probe_profile_s11c.txt): silu_mul over a full prefill's 5,184 x 14,336 ran at ~2 TB/s
# (0.229 ms a layer for 446 MB), about half the card's bandwidth, with the column bound unspecialised (scalar
# loads: `_silu_mul`); `services.bench.probe_fused` times it and other block shapes (nineteenth session on).

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["T"])
    def _rope_qkv(Q, K, V, C, S, QO, KVO, Slots, T,
                  sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, so_t, so_h, skv_t, skv_s, skv_h,
                  HEADS: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, SLOTS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        head = tl.program_id(1)  # 0 .. HEADS - 1: a query head; then the key/value heads
        valid = rows[:, None] < T
        lo = tl.arange(0, HALF)[None, :]
        hi = lo + HALF
        cos_lo = tl.load(C + rows[:, None] * sc_t + lo, mask=valid, other=0.0).to(tl.float32)
        cos_hi = tl.load(C + rows[:, None] * sc_t + hi, mask=valid, other=0.0).to(tl.float32)
        sin_lo = tl.load(S + rows[:, None] * sc_t + lo, mask=valid, other=0.0).to(tl.float32)
        sin_hi = tl.load(S + rows[:, None] * sc_t + hi, mask=valid, other=0.0).to(tl.float32)
        if head < HEADS:
            src = Q + rows[:, None] * sq_t + head * sq_h
            dst = QO + rows[:, None] * so_t + head * so_h
        else:
            kv = head - HEADS
            src = K + rows[:, None] * sk_t + kv * sk_h
            if SLOTS:
                slot = tl.load(Slots + rows, mask=rows < T, other=0)
            else:
                slot = rows
            dst = KVO + slot[:, None] * skv_t + kv * skv_h
            value = tl.load(V + rows[:, None] * sv_t + kv * sv_h + lo, mask=valid, other=0.0)
            tl.store(dst + skv_s + lo, value.to(KVO.dtype.element_ty), mask=valid)
            value = tl.load(V + rows[:, None] * sv_t + kv * sv_h + hi, mask=valid, other=0.0)
            tl.store(dst + skv_s + hi, value.to(KVO.dtype.element_ty), mask=valid)
        x_lo = tl.load(src + lo, mask=valid, other=0.0)
        x_hi = tl.load(src + hi, mask=valid, other=0.0)
        dtype = x_lo.dtype
        # rotate_by: addcmul(x * cos, roll(x, d/2), signed sin): the product x cos rounded to the model's dtype
        # first, then the sum with the (exact in float32) product of the rolled x and the signed sine.
        out_lo = (x_lo * cos_lo.to(dtype)).to(tl.float32) + x_hi.to(tl.float32) * sin_lo
        out_hi = (x_hi * cos_hi.to(dtype)).to(tl.float32) + x_lo.to(tl.float32) * sin_hi
        tl.store(dst + lo, out_lo.to(QO.dtype.element_ty), mask=valid)
        tl.store(dst + hi, out_hi.to(QO.dtype.element_ty), mask=valid)

    # N (the MLP's width, one value a model) is specialised: with it a runtime value of unknown divisibility the
    # column mask's constancy was one element, so every load and store was scalar (2 bytes a lane), not 16-byte vectors.
    @triton.jit(do_not_specialize=["T"])
    def _silu_mul(G, U, Out, T, N, sg_t, su_t, so_t, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        inside = (rows[:, None] < T) & (columns[None, :] < N)
        gate = tl.load(G + rows[:, None] * sg_t + columns[None, :], mask=inside, other=0.0)
        up = tl.load(U + rows[:, None] * su_t + columns[None, :], mask=inside, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # SiLU, rounded as the module's own output is
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(Out + rows[:, None] * so_t + columns[None, :], out.to(Out.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["eps"])
    def _rms_norm(X, W, Out, eps, sx_t, so_t, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        inside = columns < N
        x = tl.load(X + row * sx_t + columns, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(W + columns, mask=inside, other=0.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        tl.store(Out + row * so_t + columns, (x * scale * w).to(Out.dtype.element_ty), mask=inside)


def rope_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
             q_out: torch.Tensor, kv_out: torch.Tensor, slots: torch.Tensor | None = None) -> None:
    """Rotate q [T, H, d] and k [T, H_kv, d] by cos and signed_sin [T, 1, d] (`LlamaStep.cos_sin`) into q_out
    [T', H, d] (T' >= T) and rows `slots` [T] (int64; None: 0..T-1) of kv_out [N, 2, H_kv, d], v beside k."""
    rows, heads, dim = q.shape
    kv_heads = k.shape[1]
    if (k.shape != (rows, kv_heads, dim) or v.shape != k.shape or cos.shape != (rows, 1, dim)
            or signed_sin.shape != cos.shape or q_out.shape[0] < rows or q_out.shape[1:] != q.shape[1:]
            or kv_out.shape[1:] != (2, kv_heads, dim) or dim % 2
            or (slots is not None and (slots.shape != (rows,) or slots.dtype != torch.int64))):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos {tuple(cos.shape)}, "
                         f"q_out {tuple(q_out.shape)}, kv_out {tuple(kv_out.shape)}, slots "
                         f"{None if slots is None else (tuple(slots.shape), slots.dtype)}: shapes do not match")
    if any(t.stride(-1) != 1 for t in (q, k, v, q_out, kv_out)) or not (cos.is_contiguous() and signed_sin.is_contiguous()):
        raise ValueError("rope_qkv needs a unit stride along the head dimension and contiguous cos and sin")
    if rows == 0:
        return
    grid = (triton.cdiv(rows, ROPE_ROWS), heads + kv_heads, 1)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
               q_out.stride(0), q_out.stride(1), kv_out.stride(0), kv_out.stride(1), kv_out.stride(2))
    scattered._launch(_rope_qkv, grid, (q, k, v, cos, signed_sin, q_out, kv_out, q if slots is None else slots, rows),
                      strides, dict(HEADS=heads, HALF=dim // 2, ROWS=ROPE_ROWS, SLOTS=slots is not None), (4, 2))


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) x up for gate and up [T, N] (row-strided views allowed) -> out [T, N] (new if None)."""
    rows, columns = gate.shape
    if up.shape != gate.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must match, with unit column stride")
    out = torch.empty(rows, columns, dtype=gate.dtype, device=gate.device) if out is None else out
    if out.shape != gate.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} does not match gate {tuple(gate.shape)}")
    if rows == 0:
        return out
    grid = (triton.cdiv(rows, MLP_ROWS), triton.cdiv(columns, MLP_COLUMNS), 1)
    scattered._launch(_silu_mul, grid, (gate, up, out, rows), (columns, gate.stride(0), up.stride(0), out.stride(0)),
                      dict(ROWS=MLP_ROWS, COLUMNS=MLP_COLUMNS), (MLP_WARPS, 2))
    return out


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h [T, N] (row-strided allowed) normalised by its rows' root mean square and scaled by weight [N] -> a new
    [T, N] in h's dtype."""
    rows, columns = h.shape
    if weight.shape != (columns,) or h.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError(f"h {tuple(h.shape)} (unit column stride) and weight {tuple(weight.shape)} do not match")
    out = torch.empty(rows, columns, dtype=h.dtype, device=h.device)
    if rows == 0:
        return out
    block = triton.next_power_of_2(columns)
    scattered._launch(_rms_norm, (rows, 1, 1), (h, weight, out, float(eps)), (h.stride(0), out.stride(0)),
                      dict(N=columns, BLOCK=block), (min(16, max(1, block // 512)), 1))
    return out


def compile_variants(heads: int, kv_heads: int, dim: int, intermediate: int, dtype: torch.dtype,
                     device: torch.device, hidden: int | None = None) -> None:
    """Compile both kernels as the step launches them (start-up): q/k/v as column slices of one fused
    projection, K/V into a KV buffer's layer by slot and into a graph's own rows, gate/up as halves."""
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.zeros(ROPE_ROWS, width, dtype=dtype, device=device)
    q = qkv[:, : heads * dim].view(ROPE_ROWS, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(ROPE_ROWS, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(ROPE_ROWS, kv_heads, dim)
    cos = torch.ones(ROPE_ROWS, 1, dim, dtype=dtype, device=device)
    q_out = torch.empty(ROPE_ROWS, heads, dim, dtype=dtype, device=device)
    kv_out = torch.zeros(ROPE_ROWS, 2, kv_heads, dim, dtype=dtype, device=device)
    slots = torch.arange(ROPE_ROWS, device=device)
    for each in (slots, None):
        rope_qkv(q, k, v, cos, torch.zeros_like(cos), q_out, kv_out, each)
    gate_up = torch.zeros(MLP_ROWS, 2 * intermediate, dtype=dtype, device=device)
    silu_mul(*gate_up.chunk(2, dim=-1))
    hidden = hidden or heads * dim
    rms_norm(torch.zeros(MLP_ROWS, hidden, dtype=dtype, device=device), torch.ones(hidden, dtype=dtype, device=device),
             1e-5)
