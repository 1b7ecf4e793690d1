"""The pooled decode-attention kernel (blend/pool_attention.py) against PyTorch over each row's range of a
pool layer: on the CPU under Triton's interpreter (tests/conftest.py), on CUDA compiled (run on the H200)."""

from __future__ import annotations

import pytest
import torch

from blend import pool_attention, scattered

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not pool_attention.available(DEVICE), reason="no Triton for this device")

POOL_ROWS = 300
# Row 0 from the pool's first row, row 1 sees one key, row 2 spans three key blocks of 64, row 3 ends at
# the pool's last row.
STARTS = [0, 37, 100, POOL_ROWS - 90]
USED = [64, 1, 150, 90]
LONGEST = 150


def reference(q, keys, values, starts, used, scale):
    """softmax(q k^T scale) v per row over pool rows starts[r] .. starts[r] + used[r] - 1, float32; query head
    h reads KV head h // group."""
    group = q.shape[1] // keys.shape[1]
    outs = []
    for row, (start, count) in enumerate(zip(starts.tolist(), used.tolist())):
        k = keys[start : start + count].float().repeat_interleave(group, 1)  # [count, heads, d]
        v = values[start : start + count].float().repeat_interleave(group, 1)
        weights = (torch.einsum("hd,khd->hk", q[row].float(), k) * scale).softmax(-1)
        outs.append(torch.einsum("hk,khd->hd", weights, v))
    return torch.stack(outs)


def case(starts=STARTS, used=USED, heads=4, kv_heads=2, dim=32, dtype=torch.float32, index=torch.int64, seed=0):
    """(q, keys, values, starts, used): keys and values strided views of one pool layer [rows, 2, kv, d]."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.randn(POOL_ROWS, 2, kv_heads, dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(len(starts), heads, dim, generator=g).to(DEVICE, dtype)
    to = dict(dtype=index, device=DEVICE)
    return q, layer[:, 0], layer[:, 1], torch.tensor(starts, **to), torch.tensor(used, **to)


@pytest.mark.parametrize("heads,kv_heads,pieces", [(4, 2, 1), (4, 2, 2), (8, 2, 3), (4, 4, 5)])
def test_float32_equals_pytorch_over_each_rows_range(heads, kv_heads, pieces):
    """Rows of different starts and lengths (one key; the pool's last rows), grouped heads of 2, 4 and 1."""
    q, keys, values, starts, used = case(heads=heads, kv_heads=kv_heads, seed=pieces)
    out = pool_attention.decode(q, keys, values, starts, used, 0.3, pieces, LONGEST)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, keys, values, starts, used, 0.3), rtol=1e-5, atol=1e-5)


def test_int32_and_int64_starts_and_used_give_the_same_answer():
    q, keys, values, starts, used = case(index=torch.int32)
    narrow = pool_attention.decode(q, keys, values, starts, used, 0.3, 2, LONGEST)
    wide = pool_attention.decode(q, keys, values, starts.long(), used.long(), 0.3, 2, LONGEST)
    assert torch.equal(narrow, wide)
    torch.testing.assert_close(narrow, reference(q, keys, values, starts, used, 0.3), rtol=1e-5, atol=1e-5)


def test_one_key_equals_its_value_whatever_the_query():
    q, keys, values, starts, used = case(starts=[5, 299], used=[1, 1])
    out = pool_attention.decode(q, keys, values, starts, used, 0.3, 4, 64)
    expected = values[starts].repeat_interleave(2, 1)  # [rows, heads, d]: each head's KV head's one value
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_pieces_past_a_rows_keys_are_empty_weigh_nothing_and_make_no_nan():
    """8 pieces of at least one 64-key block: a 70-key row fills two, a 5-key row one; the rest hold no
    key, write log2-sum-exp -inf and zeros, and the merge gives them no weight."""
    q, keys, values, starts, used = case(starts=[10, 200, 0], used=[5, 70, 1])
    parts, lse = pool_attention.workspace_for(8, 3, 4, 32, DEVICE)
    out = pool_attention.decode(q, keys, values, starts, used, 0.3, 8, 70, workspace=(parts, lse))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, keys, values, starts, used, 0.3), rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[2:]).all() and (lse[2:] < 0).all() and torch.isinf(lse[1:, [0, 2]]).all()
    assert torch.equal(parts[2:], torch.zeros_like(parts[2:]))


def test_one_piece_writes_the_answer_straight_into_out_without_touching_the_workspace():
    q, keys, values, starts, used = case()
    parts, lse = pool_attention.workspace_for(1, 4, 4, 32, DEVICE)
    parts.fill_(float("nan"))
    lse.fill_(float("nan"))
    out = pool_attention.decode(q, keys, values, starts, used, 0.3, 1, LONGEST, workspace=(parts, lse))
    torch.testing.assert_close(out, reference(q, keys, values, starts, used, 0.3), rtol=1e-5, atol=1e-5)
    assert torch.isnan(parts).all() and torch.isnan(lse).all()


def test_fixed_out_and_workspace_serve_new_starts_and_used_written_in_place():
    """What a CUDA graph needs: the same out, workspace, starts and used tensors every call, the request
    ranges changed by writing into starts/used between calls; each answer lands in `out` itself."""
    q, keys, values, starts, used = case()
    out = torch.full_like(q, float("nan"))
    workspace = pool_attention.workspace_for(3, 4, 4, 32, DEVICE)
    for new_starts, new_used in ((STARTS, USED), ([120, 0, 299, 150], [150, 149, 1, 3])):
        starts.copy_(torch.tensor(new_starts))
        used.copy_(torch.tensor(new_used))
        result = pool_attention.decode(q, keys, values, starts, used, 0.3, 3, LONGEST, out=out, workspace=workspace)
        assert result is out
        torch.testing.assert_close(out, reference(q, keys, values, starts, used, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(scattered.INTERPRETED, reason="Triton's interpreter multiplies bfloat16 wrongly (numpy has none)")
def test_bfloat16_within_rounding_of_the_float32_reference():
    """bf16 inputs, probabilities rounded to bf16 before the product with V: within 2e-2 of float32 (values
    of size ~1, as scattered's bf16 test allows)."""
    q, keys, values, starts, used = case(heads=8, kv_heads=2, dtype=torch.bfloat16, seed=3)
    expected = reference(q, keys, values, starts, used, 0.2)
    for pieces in (1, 4):
        out = pool_attention.decode(q, keys, values, starts, used, 0.2, pieces, LONGEST)
        assert out.dtype == torch.bfloat16
        assert (out.float() - expected).abs().max().item() < 2e-2


def test_equals_the_varlen_reference_of_the_pooled_decode_step():
    """Over a real KVPool, with the starts and used `PooledDecode.over` builds for FlashAttention's varlen call
    (a padding row at the scratch position included), the same as `_varlen`, its CPU reference."""
    from types import SimpleNamespace

    from blend.adapter import PooledDecode, _varlen
    from blend.cache import KVPool

    pool = KVPool(1, 512, 2, 32, torch.float32, DEVICE, block=64, longest=192)
    pool.data.copy_(torch.randn(pool.data.shape, generator=torch.Generator().manual_seed(4)))
    caches = [SimpleNamespace(offset=offset) for offset in (64, 256, 320)]  # as pool.take places them
    ends = [120, 0, 191]
    rows = 4
    decode = PooledDecode.over(pool, PooledDecode.layout(caches, [0] * 3, ends, rows, pool).to(DEVICE), rows)
    layer = pool.layer_rows(0)
    q = torch.randn(rows, 4, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    expected, _ = _varlen(q, layer[:, 0], layer[:, 1], decode.starts, decode.used, 0.25)
    out = pool_attention.decode(q, layer[:, 0], layer[:, 1], decode.starts[:rows], decode.used, 0.25, 2, pool.longest)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_are_refused_with_the_bad_shape_named():
    q, keys, values, starts, used = case()
    with pytest.raises(ValueError, match=r"starts torch.int64 \(3,\)"):
        pool_attention.decode(q, keys, values, starts[:3], used, 0.3, 2, LONGEST)
    with pytest.raises(ValueError, match="used torch.float32"):
        pool_attention.decode(q, keys, values, starts, used.float(), 0.3, 2, LONGEST)
    with pytest.raises(ValueError, match="3 heads"):
        pool_attention.decode(q[:, :3], keys, values, starts, used, 0.3, 2, LONGEST)
    with pytest.raises(ValueError, match=r"workspace \(2, 4, 4, 32\)"):
        pool_attention.decode(q, keys, values, starts, used, 0.3, 3, LONGEST,
                              workspace=pool_attention.workspace_for(2, 4, 4, 32, DEVICE))
    with pytest.raises(ValueError, match=r"out torch.float32 \(3, 4, 32\)"):
        pool_attention.decode(q, keys, values, starts, used, 0.3, 2, LONGEST, out=q[:3].clone())


def test_pieces_fill_about_two_waves_of_the_card_and_stay_a_few_blocks_long():
    # One request of 5,184 keys over 8 KV heads: 33 pieces would fill two waves, but 4-block pieces allow 20.
    assert pool_attention.pieces_for(1, 8, 5184) == 5184 // (pool_attention.MIN_PIECE_BLOCKS * pool_attention.BLOCK_N)
    assert pool_attention.pieces_for(16, 8, 5184) == 3  # 128 programs a piece: 3 pieces pass 264
    assert pool_attention.pieces_for(64, 8, 5184) == 1
    assert pool_attention.pieces_for(1, 8, 100) == 1  # shorter than one piece's minimum
    assert pool_attention.pieces_for(1, 1, 10**6) == pool_attention.MAX_PIECES
    with pytest.raises(ValueError, match="kv_heads 0"):
        pool_attention.pieces_for(1, 0, 100)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiling is what this checks (the interpreter compiles nothing)")
def test_after_compile_variants_no_decode_of_the_served_shapes_compiles_again():
    pool_attention.compile_variants(32, 8, 128, torch.bfloat16, DEVICE, 5632)

    def compiled() -> int:
        return sum(len(cache[0]) for kernel in (pool_attention._decode, scattered._merge)
                   for cache in kernel.device_caches.values())

    before = compiled()
    layer = torch.randn(20_000, 2, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    for rows in (1, 3, 16, 64):
        q = torch.randn(rows, 32, 128, device=DEVICE, dtype=torch.bfloat16)
        for index in (torch.int32, torch.int64):
            starts = torch.randint(0, 14_000, (rows,), device=DEVICE, dtype=index)
            used = torch.randint(1, 5632, (rows,), device=DEVICE, dtype=index)
            pool_attention.decode(q, layer[:, 0], layer[:, 1], starts, used, 0.1, pool_attention.pieces_for(
                rows, 8, 5632), 5632)
    assert compiled() == before
