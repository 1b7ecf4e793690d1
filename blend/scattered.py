"""Attention for queries at scattered positions, causal by position, in one Triton kernel (issue 16).

Blend recomputes a few hundred tokens spread over the whole prompt, each seeing the keys at positions up
to its own. SDPA can only take that as a dense additive mask [queries, keys] and then computes every
query against every key, the masked half included. This kernel takes each query's position instead and
walks, per block of queries (sorted by position), only the keys up to the block's last position; for few
query blocks (reuse's question, blend at a small ratio) it also splits the key walk into pieces that run
in parallel and merges them by their log-sum-exp (flash-decoding).

`attention(q, keys, values, positions, scale)`: q [T, H, d], keys/values [H_kv, L, d] (any strides with a
unit last one: views into a KV buffer), positions [T] int32 (sorted ascending for speed; exact in any order),
each < L -> [T, H, d] in
q's dtype. Grouped heads: query head h reads key/value head h // (H / H_kv).

Runs on CUDA; on the CPU only under Triton's interpreter (`TRITON_INTERPRET=1` set before this module is
imported), which the tests use to check it against SDPA with the dense mask.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build has none, and the step then keeps SDPA.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Block sizes: queries per program, keys per inner step, and software-pipelining stages, chosen on the H200
# (`python3 -m services.bench.probe_scattered`, docs/gpu.md): 64 x 64 with 4 warps was the quickest of six
# for 800, 290 and 32 queries; three stages for many query blocks (800: 0.206 against 0.247 ms with two),
# two for few (290 split in two: 0.130 against 0.137; 32 split in nine: 0.093 against 0.129).
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
NUM_STAGES_MANY = 3
MANY_ROWS = 512
# Blocks hold the heads that share a KV head (BLOCK_M rows = BLOCK_M / group queries x the group's heads), so
# each key block loaded serves every head of its group: a quarter of the loads in the 8B shape (4 heads a KV
# head), and a 32-query question fills a block instead of a fraction of 32 of them.
# H200 (`probe_scattered`, session 11): 800 queries 0.181-0.188 against 0.218-0.230 ms, 290 and 32 the same.
GROUPED = True
# Split the key walk until there are about this many programs (an H200 has 132 SMs), at most MAX_SPLITS.
TARGET_PROGRAMS = 264
MAX_SPLITS = 16


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Can the kernel run for tensors on this device (on the CPU: only interpreted, for tests)?"""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


if triton is not None:
    @triton.jit
    def _keys_step(q, K, V, pos, keys, hi, kv, sk_t, sk_h, sv_t, sv_h, dims, m, total, acc, scale_log2,
                   EXACT: tl.constexpr, MASKED: tl.constexpr):
        """One block of keys into the running softmax (m, total, acc) of a block of queries. MASKED=False:
        a block every row sees whole (each key at most the block's smallest position): no masks at all."""
        if MASKED:
            inside = keys < hi
            k = tl.load(K + keys[None, :] * sk_t + kv * sk_h + dims[:, None], mask=inside[None, :], other=0.0)
        else:
            k = tl.load(K + keys[None, :] * sk_t + kv * sk_h + dims[:, None])
        if EXACT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if MASKED:
            s = tl.where((keys[None, :] <= pos[:, None]) & inside[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at 0
        else:
            s = s * scale_log2
            m_new = tl.maximum(m, tl.max(s, 1))
            base = m_new
        p = tl.exp2(s - base[:, None])
        alpha = tl.exp2(m - base)
        total = total * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V + keys[:, None] * sv_t + kv * sv_h + dims[None, :], mask=inside[:, None], other=0.0)
        else:
            v = tl.load(V + keys[:, None] * sv_t + kv * sv_h + dims[None, :])
        if EXACT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, total, acc

    @triton.jit(do_not_specialize=["scale_log2", "T", "piece_keys"])
    def _pieces(Q, K, V, P, Out, LSE, Bounds, scale_log2, T, piece_keys,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_s, so_t, so_h, sl_s, sl_t,
                GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT: tl.constexpr, EXACT: tl.constexpr, INTERPRETED_KEYS: tl.constexpr,
                DEVICE_BOUNDS: tl.constexpr, GROUPED: tl.constexpr):
        # Blocks of queries with the largest positions (the longest walks) first: the tail runs short ones.
        block = tl.num_programs(0) - 1 - tl.program_id(0)
        piece = tl.program_id(2)
        if GROUPED:  # a block's BLOCK_M rows are BLOCK_M // GROUP queries x the GROUP heads sharing a KV head
            kv = tl.program_id(1)
            m = tl.arange(0, BLOCK_M)
            rows = block * (BLOCK_M // GROUP) + m // GROUP
            head = kv * GROUP + m % GROUP
            valid = (rows < T) & (m < (BLOCK_M // GROUP) * GROUP)
        else:  # one head, BLOCK_M queries
            head = tl.program_id(1)
            kv = head // GROUP
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = rows < T
        pos = tl.load(P + rows, mask=valid, other=-1)
        dims = tl.arange(0, D)
        if GROUPED:
            q = tl.load(Q + rows[:, None] * sq_t + head[:, None] * sq_h + dims[None, :], mask=valid[:, None], other=0.0)
        else:
            q = tl.load(Q + rows[:, None] * sq_t + head * sq_h + dims[None, :], mask=valid[:, None], other=0.0)
        # No row of the block sees a key past its largest position (sorted positions keep it near the others:
        # the walk then stops early; unsorted ones stay exact, each row masked by its own position).
        last = tl.max(pos, axis=0)
        if DEVICE_BOUNDS:  # keys from row Bounds[0], Bounds[1] of them: read on the device (a CUDA graph)
            first = tl.load(Bounds)
            length = tl.load(Bounds + 1)
            piece_keys = tl.cdiv(tl.cdiv(length, tl.num_programs(2)), BLOCK_N) * BLOCK_N
            lo = first + piece * piece_keys
        else:
            lo = piece * piece_keys
        hi = tl.minimum(lo + piece_keys, last + 1)
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if INTERPRETED_KEYS == 0:  # compiled: walk only up to the block's last position
            # Key blocks at or below the block's smallest position are seen whole by every row: walked first,
            # without masks (rows past T count as seeing everything there: their output is never stored).
            least = tl.min(tl.where(valid, pos, 2147483647), axis=0)
            whole = lo + tl.maximum(tl.minimum(hi, least + 1) - lo, 0) // BLOCK_N * BLOCK_N
            for start in range(lo, whole, BLOCK_N):
                m_run, total, acc = _keys_step(q, K, V, pos, start + tl.arange(0, BLOCK_N), hi, kv, sk_t, sk_h,
                                               sv_t, sv_h, dims, m_run, total, acc, scale_log2, EXACT, False)
            for start in range(whole, hi, BLOCK_N):
                m_run, total, acc = _keys_step(q, K, V, pos, start + tl.arange(0, BLOCK_N), hi, kv, sk_t, sk_h,
                                               sv_t, sv_h, dims, m_run, total, acc, scale_log2, EXACT, True)
        else:  # Triton's interpreter takes no loop bound read from a tensor: the whole piece, masked
            for start in range(0, INTERPRETED_KEYS, BLOCK_N):
                m_run, total, acc = _keys_step(q, K, V, pos, lo + start + tl.arange(0, BLOCK_N), hi, kv, sk_t,
                                               sk_h, sv_t, sv_h, dims, m_run, total, acc, scale_log2, EXACT, True)
        seen = total > 0.0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        if GROUPED:
            dest = Out + piece * so_s + rows[:, None] * so_t + head[:, None] * so_h + dims[None, :]
        else:
            dest = Out + piece * so_s + rows[:, None] * so_t + head * so_h + dims[None, :]
        tl.store(dest, out.to(Out.dtype.element_ty), mask=valid[:, None])
        if SPLIT:  # log2-sum-exp of this piece's scores (-inf where the row saw none of its keys)
            lse = tl.where(seen, m_run + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
            tl.store(LSE + piece * sl_s + rows * sl_t + head, lse, mask=valid)

    @triton.jit(do_not_specialize=["T", "pieces"])
    def _merge(Parts, LSE, OUT, T, pieces, so_s, so_t, so_h, sl_s, sl_t, st_t, st_h,
               D: tl.constexpr, PIECES: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        index = tl.arange(0, PIECES)
        used = index < pieces
        lse = tl.load(LSE + index * sl_s + row * sl_t + head, mask=used, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # a row no piece saw (graph padding): zeros, not NaN
        weight = tl.exp2(lse - top)
        weight = weight / tl.maximum(tl.sum(weight, 0), 1e-30)
        dims = tl.arange(0, D)
        parts = tl.load(Parts + index[:, None] * so_s + row * so_t + head * so_h + dims[None, :],
                        mask=used[:, None], other=0.0)
        out = tl.sum(parts * weight[:, None], 0)
        tl.store(OUT + row * st_t + head * st_h + dims, out.to(OUT.dtype.element_ty))


# Compiled kernels by what they were specialised on, launched directly (`CompiledKernel[grid]`): Triton's
# own `kernel[grid](...)` binds and specialises every argument on every call, and the step launches this
# kernel once per layer on a host-bound path (`probe_scattered`'s host time per call, H200 hosts: one piece
# 0.057 ms against SDPA's 0.052 through Triton's launch, 0.041-0.050 against 0.042-0.047 launched here).
_COMPILED: dict = {}


def _launch(kernel, grid, args: tuple, strides: tuple, constexprs: dict, options: tuple[int, int]) -> None:
    """kernel[grid](*args, *strides, **constexprs) with (num_warps, num_stages) = options. `args` are the
    tensors and the values Triton does not specialise on (`do_not_specialize`); `strides` the integers it
    does (so what it specialises them on is part of the key, with the tensors' dtypes and 16-byte alignment)."""
    if INTERPRETED:
        kernel[grid](*args, *strides, **constexprs, num_warps=options[0], num_stages=options[1])
        return
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    # Triton specialises an integer on being 1, on dividing by 16 and on its width (triton 3.6's
    # native_specialize_impl: 1 -> constexpr, else i32/i64 with "D" or not), not on its value: so does the key.
    key = (kernel, options, tuple((v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31)) for v in strides),
           tuple(constexprs.values()),
           tensors[0].device.index,
           tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors))
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, *strides, **constexprs, num_warps=options[0], num_stages=options[1])
        return
    # The current stream's raw handle, as Triton's own launch reads it (torch.cuda.current_stream costs more).
    stream = torch._C._cuda_getCurrentRawStream(tensors[0].device.index)
    compiled[grid](*args, *strides, *constexprs.values(), stream=stream)


# Per device: the pieces' float32 outputs and log-sum-exps, grown as needed and reused by every call (two
# allocations fewer per split launch on a host-bound path). Calls run in one stream's order, each merge
# reading its pieces before the next call writes them. Their rows are padded to a multiple of 16: the
# log-sum-exps' piece stride (rows x heads) is a specialised launch argument, and with a head count no multiple of
# 16 (SmolLM2's 9) it divided by 16 only for some row counts, a class the start-up compile had not met: a compile on
# a request (the served path's shapes vary).
_WORKSPACE: dict = {}


def _padded(rows: int) -> int:
    """Rows a workspace holds for `rows`: a multiple of 16, so every stride is one (above)."""
    return -(-rows // 16) * 16


def _workspace(device: torch.device, pieces: int, rows: int, heads: int, dim: int):
    padded = _padded(rows)
    size = pieces * padded * heads
    held = _WORKSPACE.get(device)
    if held is None or held[1].numel() < size or held[0].numel() < size * dim:  # (a model of larger heads)
        held = _WORKSPACE[device] = (torch.empty(size * dim, dtype=torch.float32, device=device),
                                     torch.empty(size, dtype=torch.float32, device=device))
    return (held[0][: size * dim].view(pieces, padded, heads, dim)[:, :rows],
            held[1][:size].view(pieces, padded, heads)[:, :rows])


def workspace_for(pieces: int, rows: int, heads: int, dim: int, device: torch.device):
    """A graph's own (pieces' outputs, log-sum-exps) for `attention(..., workspace=)`: fixed addresses; rows padded
    as `_workspace`'s."""
    padded = _padded(rows)
    return (torch.empty(pieces, padded, heads, dim, dtype=torch.float32, device=device)[:, :rows],
            torch.empty(pieces, padded, heads, dtype=torch.float32, device=device)[:, :rows])


def _grouped(heads: int, kv_heads: int) -> bool:
    """Does a block of the kernel hold the heads sharing a KV head (`GROUPED`, where they fit a block)?"""
    return GROUPED and heads // kv_heads <= BLOCK_M


def _grid_rows(rows: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(query blocks, programs per block along the heads) of the kernel's grid."""
    if _grouped(heads, kv_heads):
        return triton.cdiv(rows, BLOCK_M // (heads // kv_heads)), kv_heads
    return triton.cdiv(rows, BLOCK_M), heads


def splits_for(rows: int, heads: int, kv_heads: int, length: int) -> int:
    """How many pieces the key walk is split into: enough programs for the card, each piece at least
    four key blocks long."""
    blocks, across = _grid_rows(rows, heads, kv_heads)
    programs = blocks * across
    wanted = max(1, -(-TARGET_PROGRAMS // programs))
    return max(1, min(wanted, MAX_SPLITS, length // (4 * BLOCK_N)))


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              scale: float, splits: int | None = None, bounds: torch.Tensor | None = None,
              out: torch.Tensor | None = None, workspace: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """q [T, H, d] over keys/values [H_kv, L, d], query t seeing the keys at positions <= positions[t].

    For a CUDA graph over a KV pool (nothing read on the host, every buffer fixed): `bounds`, a device
    int64 [2] (first key row, key count), makes the keys rows bounds[0] .. positions[t] of the given view
    (positions then count from the view's row 0, like the first key row); `splits` is then required and
    fixed, and `out` and `workspace` (`workspace_for`) are the graph's own buffers."""
    rows, heads, dim = q.shape
    kv_heads, length, _ = keys.shape
    if heads % kv_heads or values.shape != keys.shape or positions.shape != (rows,):
        raise ValueError(f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                         f"positions {tuple(positions.shape)}: shapes do not match")
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("q, keys and values need a unit stride along the head dimension")
    if bounds is not None and (splits is None or bounds.dtype != torch.int64 or bounds.shape != (2,)):
        raise ValueError(f"bounds {None if bounds is None else (bounds.dtype, tuple(bounds.shape))} with splits "
                         f"{splits}: device bounds need an int64 [2] tensor and a fixed number of pieces")
    out = torch.empty(rows, heads, dim, dtype=q.dtype, device=q.device) if out is None else out
    if rows == 0:
        return out
    if positions.dtype != torch.int32:
        positions = positions.to(torch.int32)
    pieces = splits_for(rows, heads, kv_heads, length) if splits is None else max(1, int(splits))
    piece_keys = -(-length // pieces)
    piece_keys = -(-piece_keys // BLOCK_N) * BLOCK_N  # whole key blocks per piece
    if bounds is None:
        pieces = -(-length // piece_keys)
    grid = (*_grid_rows(rows, heads, kv_heads), pieces)
    scale_log2 = float(scale) * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    options = (NUM_WARPS, NUM_STAGES_MANY if rows >= MANY_ROWS else NUM_STAGES)
    fixed = dict(GROUP=heads // kv_heads, D=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    grouped = dict(GROUPED=_grouped(heads, kv_heads))
    # Under the interpreter a piece's walk is a fixed length: with device bounds, the whole view (an upper bound).
    walk = (-(-length // BLOCK_N) * BLOCK_N if bounds is not None else piece_keys) if INTERPRETED else 0
    tail = dict(EXACT=q.dtype == torch.float32, INTERPRETED_KEYS=walk, DEVICE_BOUNDS=bounds is not None)
    strides = (q.stride(0), q.stride(1), keys.stride(1), keys.stride(0), values.stride(1), values.stride(0))
    bounds_arg = positions if bounds is None else bounds  # any pointer where the kernel reads none
    if pieces == 1:
        _launch(_pieces, grid, (q, keys, values, positions, out, out, bounds_arg, scale_log2, rows, piece_keys),
                (*strides, 0, out.stride(0), out.stride(1), 0, 0), dict(**fixed, SPLIT=False, **tail, **grouped), options)
        return out
    part, lse = _workspace(q.device, pieces, rows, heads, dim) if workspace is None else workspace
    _launch(_pieces, grid, (q, keys, values, positions, part, lse, bounds_arg, scale_log2, rows, piece_keys),
            (*strides, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1)),
            dict(**fixed, SPLIT=True, **tail, **grouped), options)
    _launch(_merge, (rows, heads, 1), (part, lse, out, rows, pieces),
            (part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1)),
            dict(D=dim, PIECES=triton.next_power_of_2(pieces)), (4, NUM_STAGES))
    return out


def compile_variants(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every variant `attention` launches from the step for this model shape (one and several pieces,
    both stage counts, each merge width), so no served request pays Triton's compile (~0.3-1 s per variant).
    Keys are laid out as in a KV buffer ([tokens, 2, kv_heads, d]) so strides specialise as the served ones
    do. (The whole-layer graphs' device-bounds variant compiles in their warm-up, before capture.)"""
    length = 16 * BLOCK_N  # 16 pieces of one key block each at most
    buffer = torch.zeros(length, 2, kv_heads, dim, dtype=dtype, device=device)
    keys, values = buffer[:, 0].transpose(0, 1), buffer[:, 1].transpose(0, 1)
    for rows in (1, MANY_ROWS):  # two stages below MANY_ROWS, three from it
        q = torch.zeros(rows, heads, dim, dtype=dtype, device=device)
        positions = torch.arange(rows, dtype=torch.int32, device=device)
        for splits in (1, 2, 4, 8, 16):  # merge widths 2, 4, 8 and 16
            attention(q, keys, values, positions, 1.0, splits=splits)
