"""Decode attention over a shared KV pool in one Triton kernel: one query per request, each request's keys
a range of the pool, split along the keys (flash-decoding), the heads sharing a KV head in one program.

A decode step's attention through FlashAttention's varlen kernel (`PooledDecode.attend`) gives every query
head its own walk of its KV head's keys: in the 8B shape (32 heads, 8 KV heads) each key is read four times.
Here a program holds the GROUP query heads of one KV head as the rows of one tile, so each key block it loads
serves all of them; the keys of a row are cut into `pieces` that run in parallel (one request's 8 KV heads
alone are 8 programs for 132 SMs), merged by their log-sum-exps in `scattered._merge`.

`decode(q, keys, values, starts, used, scale, pieces, longest)`: q [R, H, d], one query per row; keys/values
[N, H_kv, d] (views of a pool layer [N, 2, H_kv, d]); row r sees pool rows starts[r] .. starts[r] + used[r] - 1
-> [R, H, d] in q's dtype. Query head h reads KV head h // (H / H_kv). Nothing is read on the host, so a CUDA
graph captured once serves any starts/used written into the same tensors.

Runs on CUDA; on the CPU only under Triton's interpreter (`TRITON_INTERPRET=1` set before this module is
imported), which the tests use to check it against PyTorch.
"""
from __future__ import annotations

import torch

from blend import scattered
from blend.scattered import INTERPRETED, triton

if triton is not None:
    import triton.language as tl

    from blend.scattered import _keys_step

# Keys per inner step, warps and software-pipelining stages. H200, 8B shape, 5,184 keys a row, per layer in a
# CUDA graph (`python3 -m services.bench.probe_pool_attention`, docs/ops/h200_probe_pool_attention_s13a.txt): 1 row
# 11.36 us at pieces_for's 20 pieces (best variant 10.29: 16 pieces, 128 keys, 3 stages) against flash varlen's
# 19.47; 16 rows 83.32 us at 3 pieces (best 81.97) against 92.70. Warps other than 4 are not measured.
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
# Split each row's keys until there are about this many programs (two waves of an H200's 132 SMs), each
# piece at least MIN_PIECE_BLOCKS key blocks (shorter ones spend more on the merge than they save), at most
# MAX_PIECES (the merge holds every piece of a row in one tile).
TARGET_PROGRAMS = 264
MIN_PIECE_BLOCKS = 4
MAX_PIECES = 32
# tl.dot takes tiles of at least 16 rows: a KV head's GROUP query heads are padded up to this.
MIN_ROWS = 16


def available(device: torch.device) -> bool:
    """Can the kernel run for tensors on this device (on the CPU: only interpreted, for tests)?"""
    return scattered.available(device)


if triton is not None:
    @triton.jit(do_not_specialize=["scale_log2"])
    def _decode(Q, K, V, Starts, Used, Out, LSE, scale_log2,
                sq_r, sq_h, sk_t, sk_h, sv_t, sv_h, so_s, so_r, so_h, sl_s, sl_r,
                GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT: tl.constexpr, EXACT: tl.constexpr, INTERPRETED_KEYS: tl.constexpr):
        row = tl.program_id(0)
        kv = tl.program_id(1)
        piece = tl.program_id(2)
        # int64 before the multiply: a large pool's row offset overflows 32 bits (250K rows x 2 x 8 x 128).
        first = tl.load(Starts + row).to(tl.int64)
        used = tl.load(Used + row).to(tl.int32)
        # Whole key blocks per piece, so only the row's last piece has a partial block; pieces past the row's
        # keys (lo >= used: short rows, more pieces than blocks) are empty and walk nothing.
        piece_keys = tl.cdiv(tl.cdiv(used, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        lo = piece * piece_keys
        hi = tl.minimum(lo + piece_keys, used)
        lanes = tl.arange(0, ROWS)
        valid = lanes < GROUP
        head = kv * GROUP + lanes
        dims = tl.arange(0, D)
        q = tl.load(Q + row * sq_r + head[:, None] * sq_h + dims[None, :], mask=valid[:, None], other=0.0)
        keys_base = K + first * sk_t
        values_base = V + first * sv_t
        # `_keys_step` masks keys past a row's position: every head sees every key of its piece.
        last = tl.zeros([ROWS], tl.int32) + (hi - 1)
        m_run = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        if INTERPRETED_KEYS == 0:  # compiled: whole blocks without masks, then the row's partial block
            whole = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
            for start in range(lo, whole, BLOCK_N):
                m_run, total, acc = _keys_step(
                    q, keys_base, values_base, last, start + tl.arange(0, BLOCK_N), hi, kv, sk_t, sk_h, sv_t, sv_h,
                    dims, m_run, total, acc, scale_log2, EXACT, False)
            for start in range(whole, hi, BLOCK_N):
                m_run, total, acc = _keys_step(
                    q, keys_base, values_base, last, start + tl.arange(0, BLOCK_N), hi, kv, sk_t, sk_h, sv_t, sv_h,
                    dims, m_run, total, acc, scale_log2, EXACT, True)
        else:  # Triton's interpreter takes no loop bound read from a tensor: the longest piece, masked
            for start in range(0, INTERPRETED_KEYS, BLOCK_N):
                m_run, total, acc = _keys_step(
                    q, keys_base, values_base, last, lo + start + tl.arange(0, BLOCK_N), hi, kv, sk_t, sk_h, sv_t,
                    sv_h, dims, m_run, total, acc, scale_log2, EXACT, True)
        seen = total > 0.0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        dest = Out + piece * so_s + row * so_r + head[:, None] * so_h + dims[None, :]
        tl.store(dest, out.to(Out.dtype.element_ty), mask=valid[:, None])
        if SPLIT:  # log2-sum-exp of this piece's scores, -inf for an empty piece (its merge weight is 0)
            lse = tl.where(seen, m_run + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
            tl.store(LSE + piece * sl_s + row * sl_r + head, lse, mask=valid)


def pieces_for(rows: int, kv_heads: int, longest: int) -> int:
    """How many pieces each row's keys are cut into for a batch of `rows` requests of at most `longest` keys:
    enough programs (rows x kv_heads x pieces) for about two waves of the card, each piece at least
    MIN_PIECE_BLOCKS key blocks long; 1 to MAX_PIECES."""
    if kv_heads < 1 or longest < 1:
        raise ValueError(f"kv_heads {kv_heads} and longest {longest} must both be at least 1")
    wanted = -(-TARGET_PROGRAMS // (max(rows, 1) * kv_heads))
    return max(1, min(wanted, longest // (MIN_PIECE_BLOCKS * BLOCK_N), MAX_PIECES))


def workspace_for(pieces: int, rows: int, heads: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A graph's own (pieces' outputs [pieces, rows, heads, dim], log2-sum-exps [pieces, rows, heads]),
    float32, for `decode(..., workspace=)`: fixed addresses across replays (rows padded to a multiple of 16 as
    `scattered._workspace`'s, so the strides are of the class compiled at start-up)."""
    return scattered.workspace_for(pieces, rows, heads, dim, device)


def _check(q, keys, values, starts, used, pieces, longest, out, workspace) -> None:
    """Shapes, dtypes and strides only (host metadata: nothing waits for the device)."""
    if q.dim() != 3 or keys.dim() != 3 or values.shape != keys.shape or q.shape[2] != keys.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}: need q "
                         "[rows, heads, d] and keys, values [pool rows, kv_heads, d]")
    rows, heads, dim = q.shape
    if heads % keys.shape[1]:
        raise ValueError(f"q's {heads} heads are not a multiple of keys' {keys.shape[1]} KV heads")
    if dim & (dim - 1):
        raise ValueError(f"head dimension {dim} is not a power of two")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"strides q {q.stride()}, keys {keys.stride()}, values {values.stride()}: q, keys and "
                         "values need a unit stride along the head dimension")
    for name, index in (("starts", starts), ("used", used)):
        if index.shape != (rows,) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} {index.dtype} {tuple(index.shape)}: need int32 or int64 [{rows}] (one per row)")
    if pieces < 1 or longest < 1:
        raise ValueError(f"pieces {pieces} and longest {longest} must both be at least 1")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out {out.dtype} {tuple(out.shape)}: need {q.dtype} {tuple(q.shape)}, unit last stride")
    if workspace is not None:
        parts, lse = workspace
        if parts.shape != (pieces, rows, heads, dim) or lse.shape != (pieces, rows, heads) \
                or parts.dtype != torch.float32 or lse.dtype != torch.float32 \
                or parts.stride(-1) != 1 or lse.stride(-1) != 1:
            raise ValueError(f"workspace {tuple(parts.shape)}, {tuple(lse.shape)}: need float32 "
                             f"({pieces}, {rows}, {heads}, {dim}) and ({pieces}, {rows}, {heads}) (workspace_for)")


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, used: torch.Tensor,
           scale: float, pieces: int, longest: int, out: torch.Tensor | None = None,
           workspace: tuple[torch.Tensor, torch.Tensor] | None = None, *, block_n: int | None = None,
           warps: int | None = None, stages: int | None = None) -> torch.Tensor:
    """Row r's query q[r] [H, d] over pool rows starts[r] .. starts[r] + used[r] - 1 of keys/values -> [R, H, d].

    `used` must be at least 1 and at most `longest` (a static bound: the interpreter walks that many keys a
    row, masked; compiled code reads used[r] on the device and walks only that). `pieces` (`pieces_for`) is
    fixed for a graph; `out` and `workspace` (`workspace_for`) are a graph's own buffers, written in place.
    `block_n`, `warps`, `stages` override BLOCK_N, NUM_WARPS, NUM_STAGES (the probe times them)."""
    _check(q, keys, values, starts, used, pieces, longest, out, workspace)
    rows, heads, dim = q.shape
    kv_heads = keys.shape[1]
    out = torch.empty_like(q) if out is None else out
    if rows == 0:
        return out
    block_n = BLOCK_N if block_n is None else block_n
    options = (NUM_WARPS if warps is None else warps, NUM_STAGES if stages is None else stages)
    group = heads // kv_heads
    # Under the interpreter a piece's walk is a fixed length: the longest a piece of `longest` keys can be.
    longest_piece = -(-longest // pieces)
    walk = -(-longest_piece // block_n) * block_n if INTERPRETED else 0
    constexprs = dict(GROUP=group, ROWS=max(MIN_ROWS, triton.next_power_of_2(group)), D=dim, BLOCK_N=block_n,
                      SPLIT=pieces > 1, EXACT=q.dtype == torch.float32, INTERPRETED_KEYS=walk)
    scale_log2 = float(scale) * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    strides = (q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1))
    grid = (rows, kv_heads, pieces)
    if pieces == 1:  # the one piece is the answer: straight into `out`, no merge
        scattered._launch(_decode, grid, (q, keys, values, starts, used, out, out, scale_log2),
                          (*strides, 0, out.stride(0), out.stride(1), 0, 0), constexprs, options)
        return out
    # Without a graph's own workspace: scattered's per-device one, reused in stream order like its own calls.
    parts, lse = scattered._workspace(q.device, pieces, rows, heads, dim) if workspace is None else workspace
    scattered._launch(_decode, grid, (q, keys, values, starts, used, parts, lse, scale_log2),
                      (*strides, parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1)),
                      constexprs, options)
    scattered._launch(scattered._merge, (rows, heads, 1), (parts, lse, out, rows, pieces),
                      (parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
                       out.stride(0), out.stride(1)),
                      dict(D=dim, PIECES=triton.next_power_of_2(pieces)), (4, scattered.NUM_STAGES))
    return out


def compile_variants(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device,
                     longest: int) -> None:
    """Compile every variant `decode` launches for this model shape (one piece and several, each merge width
    up to MAX_PIECES, int32 and int64 starts/used), so no served step pays Triton's compile. Keys are views of
    a pool layer ([rows, 2, kv_heads, d]) so strides specialise as the served ones do."""
    length = MIN_PIECE_BLOCKS * BLOCK_N
    layer = torch.zeros(length, 2, kv_heads, dim, dtype=dtype, device=device)
    q = torch.zeros(1, heads, dim, dtype=dtype, device=device)
    widths = [1 << i for i in range(MAX_PIECES.bit_length()) if 1 << i <= MAX_PIECES]  # 1, 2, 4, ... 32
    for index_dtype in (torch.int32, torch.int64):
        starts = torch.zeros(1, dtype=index_dtype, device=device)
        used = torch.full((1,), length, dtype=index_dtype, device=device)
        for pieces in widths:
            decode(q, layer[:, 0], layer[:, 1], starts, used, 1.0, pieces, max(longest, length))
