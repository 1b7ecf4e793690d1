"""The question's attention mass on every token, in two Triton kernels (issue 16): the served selector's
ranking at the check layer.

`selectors.question_attention` is a dozen PyTorch operations (upcasts, an einsum over every key, the causal
mask, softmax, two sums): 0.34 ms of host time in a blend request's head on an H200 host, where the GPU idles
while the host issues (`python3 -m services.bench.probe_host`, docs/ops/h200_probe_host_s15b.txt). Here: one
kernel takes, per KV head and block of keys, the logits of every question row of that head's query group (the
rows share the keys, one matrix product) and writes their running max and sum; the second combines those into
each row's log-sum-exp, recomputes the block's logits and adds up exp(logit - lse) over the rows; the group
reduction (sum, or max) is one PyTorch call. Float32 sums and softmax; the products exact (16-bit inputs on
the tensor cores, float32 ones as IEEE products): the same values as the PyTorch operations (which upcast to
float32 first) up to the order of the sums.

The question's rows (its tokens x the query heads of a KV head) are taken `rows_for(dtype)` at a time, a block of them per
program: the row count is a run-time argument, so one compiled kernel serves every question length (a served
question's length varies request to request; a row tile sized to it recompiled on the request path, and past
128 tokens on the 8B shape needed more shared memory than an H200 has).

`mass(q, keys, positions, n_question, scale, groups)`: q [T, H, d] (the question its last n_question rows),
keys [T, H_kv, d] (any strides with a unit last one: a view of a KV buffer), positions [T] (sorted, each
question row sees the tokens at positions up to its own) -> [T] float32. Runs on CUDA; on the CPU only under
Triton's interpreter, for the tests.
"""
from __future__ import annotations

import torch

from blend import scattered

triton = scattered.triton
BLOCK_T = 64
# Question rows a program takes: 128 in 16-bit (the 8B shape's 32-token question, 32 x 4 heads, is one block; 126
# registers, no spills on sm_90), 16 in float32, whose exact products run outside the tensor cores and spill from 64
# rows on at head dim 64, from 32 at 128 (compiled offline as served: `python3 -m services.bench.probe_compile`).
ROWS = 128
ROWS_FLOAT32 = 16


def rows_for(dtype: torch.dtype) -> int:
    return ROWS_FLOAT32 if dtype == torch.float32 else ROWS

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _logits(Q, K, P, rows, keys, kv, T, Q0, n_rows, scale, sq_t, sq_h, sk_t, sk_h,
                SHARE: tl.constexpr, D: tl.constexpr):
        """[R, BLOCK] logits of the group's question rows (row r: question token r // SHARE, head r % SHARE of the
        group) against `keys`, -inf where not seen (a later position, or past the rows or the keys)."""
        dims = tl.arange(0, D)
        token = rows // SHARE
        head = kv * SHARE + rows % SHARE
        row_ok = rows < n_rows
        q = tl.load(Q + token[:, None] * sq_t + head[:, None] * sq_h + dims[None, :], mask=row_ok[:, None], other=0.0)
        key_ok = keys < T
        k = tl.load(K + keys[:, None] * sk_t + kv * sk_h + dims[None, :], mask=key_ok[:, None], other=0.0)
        if q.dtype == tl.float32:  # IEEE products (the tensor cores' default would round inputs to TF32)
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:  # 16-bit inputs on the tensor cores: their products exact in the float32 accumulator
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
        asked = tl.load(P + Q0 + token, mask=row_ok, other=-1)
        at = tl.load(P + keys, mask=key_ok, other=2147483647)
        seen = row_ok[:, None] & key_ok[None, :] & (at[None, :] <= asked[:, None])
        return tl.where(seen, s, float("-inf"))

    @triton.jit(do_not_specialize=["T", "Q0", "blocks", "n_rows"])
    def _partials(Q, K, P, M, L, T, Q0, blocks, n_rows, scale, sq_t, sq_h, sk_t, sk_h,
                  R: tl.constexpr, SHARE: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        """Per (KV head, key block, row block): each of the block's rows' max logit and sum of exp over the keys."""
        kv, block, row_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = row_block * R + tl.arange(0, R)
        keys = block * BLOCK + tl.arange(0, BLOCK)
        s = _logits(Q, K, P, rows, keys, kv, T, Q0, n_rows, scale, sq_t, sq_h, sk_t, sk_h, SHARE, D)
        m = tl.max(s, axis=1)
        safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.sum(tl.exp(s - safe[:, None]), axis=1)
        out = ((kv * tl.num_programs(2) + row_block) * blocks + block) * R + tl.arange(0, R)
        tl.store(M + out, m)
        tl.store(L + out, total)

    @triton.jit
    def _combine(M, L, at, m, total):
        m_o = tl.load(M + at)
        l_o = tl.load(L + at)
        new = tl.maximum(m, m_o)
        safe = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - safe)) \
            + l_o * tl.exp(tl.where(m_o == float("-inf"), float("-inf"), m_o - safe))
        return new, total

    @triton.jit(do_not_specialize=["T", "Q0", "blocks", "n_rows"])
    def _mass(Q, K, P, M, L, Out, T, Q0, blocks, n_rows, scale, sq_t, sq_h, sk_t, sk_h,
              R: tl.constexpr, SHARE: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
              INTERPRETED_BLOCKS: tl.constexpr):
        """Per (KV head, key block, row block): the block's rows' softmax mass on each key, summed over the rows."""
        kv, block, row_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.arange(0, R)
        rows = row_block * R + slot
        base = (kv * tl.num_programs(2) + row_block) * blocks
        m = tl.full((R,), float("-inf"), tl.float32)
        total = tl.zeros((R,), tl.float32)
        if INTERPRETED_BLOCKS == 0:  # each row's log-sum-exp over every block's partials
            for other in range(0, blocks):
                m, total = _combine(M, L, (base + other) * R + slot, m, total)
        else:  # Triton's interpreter loops over a constant only
            for other in range(0, INTERPRETED_BLOCKS):
                m, total = _combine(M, L, (base + other) * R + slot, m, total)
        lse = tl.where(total > 0, m + tl.log(tl.maximum(total, 1e-30)), 0.0)
        keys = block * BLOCK + tl.arange(0, BLOCK)
        s = _logits(Q, K, P, rows, keys, kv, T, Q0, n_rows, scale, sq_t, sq_h, sk_t, sk_h, SHARE, D)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - lse[:, None]))
        tl.store(Out + (kv * tl.num_programs(2) + row_block) * T + keys, tl.sum(p, axis=0), mask=keys < T)


def mass(q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, n_question: int, scale: float,
         groups: str = "sum") -> torch.Tensor:
    tokens, heads, dim = q.shape
    length, kv_heads = keys.shape[0], keys.shape[1]
    if (keys.shape[2] != dim or heads % kv_heads or q.stride(-1) != 1 or keys.stride(-1) != 1
            or positions.shape != (length,) or not 0 < n_question <= tokens):
        raise ValueError(f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, positions {tuple(positions.shape)}, "
                         f"{n_question} question rows: need [T, H, d] and [L, H_kv, d] (unit last strides), [L]")
    if positions.dtype != torch.int64 or not positions.is_contiguous():
        raise ValueError("positions must be contiguous int64")
    share = heads // kv_heads
    n_rows = n_question * share
    tile = rows_for(q.dtype)
    row_blocks = triton.cdiv(n_rows, tile)
    blocks = triton.cdiv(length, BLOCK_T)
    m = torch.empty(kv_heads * row_blocks * blocks * tile, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    out = torch.empty(kv_heads, row_blocks, length, dtype=torch.float32, device=q.device)
    # The question rows of q are its last n_question; positions hold theirs at the end too (from `first`).
    q_rows = q[tokens - n_question :]
    first = length - n_question
    strides = (q_rows.stride(0), q_rows.stride(1), keys.stride(0), keys.stride(1))
    consts = dict(R=tile, SHARE=share, D=dim, BLOCK=BLOCK_T)
    grid = (kv_heads, blocks, row_blocks)
    scattered._launch(_partials, grid, (q_rows, keys, positions, m, total, length, first, blocks, n_rows, scale),
                      strides, consts, (4, 1))
    scattered._launch(_mass, grid, (q_rows, keys, positions, m, total, out, length, first, blocks, n_rows, scale),
                      strides, consts | dict(INTERPRETED_BLOCKS=blocks if scattered.INTERPRETED else 0), (4, 1))
    per_kv = out[:, 0] if row_blocks == 1 else out.sum(dim=1)  # [kv_heads, length]: the group's rows summed
    return per_kv.amax(dim=0) if groups == "max" else per_kv.sum(dim=0)

def compile_variants(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device,
                     reference) -> None:
    """Compile both kernels for this model shape now (start-up; one compiled pair serves every question length): keys a
    view of a KV buffer, a 32-token question;
    checked against `reference` (the PyTorch operations they replace, `selectors.question_attention`): a kernel
    that computes otherwise here raises, and `LlamaStep.compile_kernels` turns it off, so it is never served."""
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(3 * BLOCK_T, 2, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(32, heads, dim, generator=g).to(device, dtype)
    positions = torch.arange(3 * BLOCK_T, device=device)
    got = mass(q, buffer[:, 0], positions, 32, dim ** -0.5)
    want = reference(q, buffer[:, 0], positions, 32, dim ** -0.5)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-5):
        worst = (got - want).abs().max().item()
        raise RuntimeError(f"question mass differs from the PyTorch operations by {worst:.3g}")
