"""A matmul for few rows ("skinny GEMM") in one Triton kernel: out = x @ W^T (+ residual) for x of at most
MAX_ROWS rows, the decode step's projections.

A decode step multiplies one to a few rows by each weight matrix once, so its time is the time to read the
weights; cuBLAS reads them well short of the card's ~4.3 TB/s at these shapes (H200, Llama-3-8B shape, bf16,
one row): q/k/v fused (N 6,144, K 4,096, 50 MB) 15.5 us, 3.2 TB/s; o_proj with the residual added
(`torch.addmm(h, x, W.t())`, N 4,096, K 4,096) 11 us plus a 2 us split-K reduce kernel, 2.6 TB/s; gate/up
fused (N 28,672, K 4,096) 56.7 us, 4.1 TB/s; down_proj with the residual (N 4,096, K 14,336) 29.7 us plus
2 us, 3.7 TB/s. Here each program owns BLOCK_N output columns for all the rows and streams its BLOCK_N x K
slice of W once, K in BLOCK_K steps through a software pipeline, with the residual added in the epilogue
(no reduce kernel, no second pass over the output).

`linear(x, weight, residual=None)`: x [M, K] (any row stride, unit column stride), weight [N, K] contiguous,
residual [M, N] or None -> a new [M, N] in x's dtype: x @ weight^T accumulated in float32, plus the residual
in float32, rounded once (torch.addmm's rounding). M from 1 to MAX_ROWS. Each output row depends only on its
own input row, summed in the same order whatever the other rows: a batch of requests gets, bit for bit, what
each gets alone (cuBLAS picks its kernel, hence its summation order, by the row count). Calls of up to 16
rows and of 17 to 32 run different row tiles; the tests check that those agree too.

Runs on CUDA; on the CPU only under Triton's interpreter (`TRITON_INTERPRET=1` set before this module is
imported), which the tests use to check it against PyTorch.
"""
from __future__ import annotations

import torch

from blend import scattered

triton = scattered.triton
MAX_ROWS = 32
# tl.dot takes tiles of at least 16 rows: calls of up to 16 rows run a 16-row tile, larger ones a 32-row tile
# (padding rows are masked loads of zeros: rows read once, a tile is cheap next to the weights).
ROW_TILES = (16, 32)
# Output columns per program, K per pipeline step, warps, stages: `python3 -m services.bench.probe_skinny`
# times a sweep against cuBLAS on the 8B decode shapes; these are its starting point, not yet measured.
BLOCK_N = 32
BLOCK_K = 256
NUM_WARPS = 4
NUM_STAGES = 4
# Weight shapes (N, K) the step sends through `linear` (`LlamaStep.skinny_kernel`), with the (block_n, block_k,
# stages) measured fastest for them: those the probe found faster than cuBLAS on the H200 (s13f, 8B shape, bf16,
# docs/ops/h200_probe_skinny_s13f.txt: o_proj with its residual 12.36 against 14.65 us at one row, 12.66 against
# 15.32 at 16; gate/up 56.69 against 60.49, 58.53 against 61.87). q/k/v (0.98x) and down_proj (1.00x) stay on
# cuBLAS, as does every other shape.
FASTER: dict[tuple[int, int], tuple[int, int, int]] = {(4096, 4096): (32, 256, 4), (28672, 4096): (32, 128, 3)}
# Where K is no multiple of BLOCK_K (a small model: SmolLM2's 576), the largest power of two down to this one
# that divides it (the loop walks whole K blocks, unmasked).
MIN_BLOCK_K = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available(device: torch.device) -> bool:
    """Can the kernel run for tensors on this device (on the CPU: only interpreted, for tests)?"""
    return scattered.available(device)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _k_step(x_tile, w_tile, k, row_in, column_in, acc, EXACT: tl.constexpr):
        x = tl.load(x_tile + k, mask=row_in[:, None], other=0.0)
        w = tl.load(w_tile + k, mask=column_in[None, :], other=0.0)
        if EXACT:  # float32 in: no TF32 rounding of the inputs, as PyTorch's default matmul
            return tl.dot(x, w, acc, input_precision="ieee")
        return tl.dot(x, w, acc)

    # M, N, K are runtime values so one compile serves every row count of a tile and every projection shape;
    # the row strides stay specialised (their divisibility by 16 lets the loads be vectorised).
    @triton.jit(do_not_specialize=["M", "N", "K"])
    def _linear(X, W, R, Out, M, N, K, sx_m, sw_n, sr_m, so_m,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                RESIDUAL: tl.constexpr, EXACT: tl.constexpr, INTERPRETED_K: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_in = rows < M
        column_in = columns < N
        x_tile = X + rows[:, None] * sx_m + ks[None, :]
        # W's tile read as [BLOCK_K, BLOCK_N] (W[n, k] at n * sw_n + k): the dot's right operand, contiguous in k.
        w_tile = W + columns[None, :] * sw_n + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # K a multiple of BLOCK_K (`supports`): no mask along K.
        if INTERPRETED_K == 0:
            for k in range(0, K, BLOCK_K):
                acc = _k_step(x_tile, w_tile, k, row_in, column_in, acc, EXACT)
        else:  # Triton's interpreter takes no runtime integer as a loop bound (numpy 2): K as a constant
            for k in range(0, INTERPRETED_K, BLOCK_K):
                acc = _k_step(x_tile, w_tile, k, row_in, column_in, acc, EXACT)
        inside = row_in[:, None] & column_in[None, :]
        if RESIDUAL:  # added in float32 before the one rounding, as addmm's epilogue does
            acc += tl.load(R + rows[:, None] * sr_m + columns[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(Out + rows[:, None] * so_m + columns[None, :], acc.to(Out.dtype.element_ty), mask=inside)


def _block_k(k: int, block_k: int | None) -> int | None:
    """The K step for a K of `k`: `block_k` if given and it divides k; else BLOCK_K or the largest power of two
    below it, down to MIN_BLOCK_K, that divides k; None where none does."""
    if block_k is not None:
        return block_k if k > 0 and k % block_k == 0 else None
    step = BLOCK_K
    while step >= MIN_BLOCK_K:
        if k > 0 and k % step == 0:
            return step
        step //= 2
    return None


def supports(rows: int, n: int, k: int, dtype: torch.dtype, *, block_k: int | None = None) -> bool:
    """Does `linear` take x [rows, k] by weight [n, k] in `dtype` (at `block_k`, default: its own choice)?"""
    return 1 <= rows <= MAX_ROWS and n >= 1 and dtype in DTYPES and _block_k(k, block_k) is not None


def _power_of_two(name: str, value: int) -> None:
    # tl.dot's tiles: powers of two, at least 16 along each side.
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} {value}: must be a power of two, at least 16")


def linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, *,
           block_n: int | None = None, block_k: int | None = None, warps: int | None = None,
           stages: int | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ residual [M, N]) -> a new [M, N] in x's dtype, rounded once from float32.

    `block_n`, `block_k`, `warps`, `stages` override BLOCK_N, BLOCK_K (and its fallback), NUM_WARPS and
    NUM_STAGES (the probe times them)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: need x [M, K] and weight [N, K]")
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"x has {rows} rows: at most MAX_ROWS = {MAX_ROWS}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype}: need one of {DTYPES}, the same for both")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"x strides {x.stride()}, weight strides {weight.stride()}: need x with a unit column "
                         "stride and weight contiguous")
    if residual is not None and (residual.shape != (rows, n) or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} strides {residual.stride()}: need "
                         f"({rows}, {n}) {x.dtype} with a unit column stride")
    tuned_n, tuned_k, tuned_stages = FASTER.get((n, k), (None, None, None))
    block_n = block_n or tuned_n or BLOCK_N
    block_k = block_k or tuned_k
    stages = stages or tuned_stages
    _power_of_two("block_n", block_n)
    if block_k is not None:
        _power_of_two("block_k", block_k)
    step = _block_k(k, block_k)
    if step is None:
        raise ValueError(f"K {k} is no multiple of block_k {block_k if block_k is not None else BLOCK_K}"
                         + ("" if block_k is not None else f" nor of a power of two down to {MIN_BLOCK_K}"))
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tile = ROW_TILES[0] if rows <= ROW_TILES[0] else ROW_TILES[1]
    grid = (triton.cdiv(n, block_n), 1, 1)
    options = (NUM_WARPS if warps is None else warps, NUM_STAGES if stages is None else stages)
    held, residual_stride = (out, 0) if residual is None else (residual, residual.stride(0))  # out: never read
    scattered._launch(_linear, grid, (x, weight, held, out, rows, n, k),
                      (x.stride(0), weight.stride(0), residual_stride, out.stride(0)),
                      dict(BLOCK_M=tile, BLOCK_N=block_n, BLOCK_K=step, RESIDUAL=residual is not None,
                           EXACT=x.dtype == torch.float32, INTERPRETED_K=k if scattered.INTERPRETED else 0), options)
    return out


def compile_variants(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> None:
    """Compile what `linear` launches for weights [n, k] of each shape, at both row tiles, with and without a
    residual, so no served step pays Triton's compile (~0.5-1 s a variant). Shapes `supports` refuses are
    skipped (the step keeps cuBLAS for them)."""
    for n, k in shapes:
        if not supports(1, n, k, dtype):
            continue
        # N is a runtime value; the output's row stride (N) is specialised only on being 1 and dividing by 16.
        # A stand-in N with the same divisibility compiles the same kernel without allocating the real weight
        # (gate/up in the 8B shape: 235 MB).
        stand_in = n if n <= 64 else 64 + n % 16
        weight = torch.zeros(stand_in, k, dtype=dtype, device=device)
        block_n, block_k, stages = FASTER.get((n, k), (None, None, None))  # the stand-in is no tuned shape
        tuned = dict(block_n=block_n, block_k=block_k, stages=stages)
        for rows in ROW_TILES:
            x = torch.zeros(rows, k, dtype=dtype, device=device)
            linear(x, weight, **tuned)
            linear(x, weight, torch.zeros(rows, stand_in, dtype=dtype, device=device), **tuned)
