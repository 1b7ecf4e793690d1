"""The scattered-query attention kernel (blend/scattered.py) against SDPA with the dense causal mask: on
the CPU under Triton's interpreter (tests/conftest.py), on CUDA compiled (run on the H200)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blend import scattered
from blend.adapter import causal_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not scattered.available(DEVICE), reason="no Triton for this device")


def reference(q, keys, values, positions, scale):
    mask = causal_mask(positions, keys.shape[1], torch.float32)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], keys.float()[None], values.float()[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def case(rows, length, heads=4, kv_heads=2, dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randperm(length, generator=g)[:rows].sort().values
    buffer = torch.randn(length + 7, 2, kv_heads, dim, generator=g)  # a KV buffer: [tokens, 2, kv, d]
    q = torch.randn(rows, heads, dim, generator=g)
    keys, values = buffer[:length, 0].transpose(0, 1), buffer[:length, 1].transpose(0, 1)
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), keys.to(**to), values.to(**to), positions.to(DEVICE)


@pytest.mark.parametrize("rows,length,splits", [(5, 40, 1), (70, 300, 1), (70, 300, 3), (130, 260, None),
                                                  (1, 200, 2), (33, 33, 1)])
def test_float32_equals_sdpa_with_the_dense_causal_mask(rows, length, splits):
    q, keys, values, positions = case(rows, length)
    if rows == length:
        positions = torch.arange(length, device=DEVICE)
    out = scattered.attention(q, keys, values, positions, 0.3, splits=splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), reference(q, keys, values, positions, 0.3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,rows,splits", [(4, 2, 70, 1), (6, 2, 45, 2), (8, 1, 33, 1), (4, 4, 20, 1)])
def test_blocks_of_grouped_heads_equal_sdpa_with_the_dense_causal_mask(heads, kv_heads, rows, splits, monkeypatch):
    """GROUPED: a block holds queries x the heads sharing a KV head (a group of 3 leaves a row of 64 unused;
    positions out of order stay exact), as one piece, split, and over a pool with device bounds."""
    monkeypatch.setattr(scattered, "GROUPED", True)
    q, keys, values, positions = case(rows, 150, heads=heads, kv_heads=kv_heads, seed=heads + rows)
    positions = positions[torch.randperm(rows, generator=torch.Generator().manual_seed(2)).to(DEVICE)]
    out = scattered.attention(q, keys, values, positions, 0.3, splits=splits)
    torch.testing.assert_close(out.float(), reference(q, keys, values, positions, 0.3), rtol=1e-4, atol=1e-4)
    bounds = torch.tensor([0, 150], dtype=torch.int64, device=DEVICE)
    out = scattered.attention(q, keys, values, positions.to(torch.int32), 0.3, splits=splits, bounds=bounds)
    torch.testing.assert_close(out.float(), reference(q, keys, values, positions, 0.3), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(scattered.INTERPRETED, reason="Triton's interpreter multiplies bfloat16 wrongly (numpy has none)")
def test_bfloat16_within_rounding_of_the_float32_reference():
    q, keys, values, positions = case(90, 400, heads=8, kv_heads=2, dtype=torch.bfloat16, seed=3)
    expected = reference(q, keys, values, positions, 0.2)
    for splits in (1, 4):
        out = scattered.attention(q, keys, values, positions, 0.2, splits=splits)
        assert out.dtype == torch.bfloat16
        assert (out.float() - expected).abs().max().item() < 2e-2


def test_positions_out_of_order_are_still_exact():
    """Callers pass sorted positions (the walk stops early then); out of order, each row is still masked by
    its own position, never given a shorter walk than its position needs."""
    q, keys, values, positions = case(100, 300, seed=7)
    shuffled = positions[torch.randperm(100, generator=torch.Generator().manual_seed(1)).to(DEVICE)]
    for splits in (1, 3):
        out = scattered.attention(q, keys, values, shuffled, 0.3, splits=splits)
        torch.testing.assert_close(out.float(), reference(q, keys, values, shuffled, 0.3), rtol=1e-4, atol=1e-4)


def test_a_query_at_position_zero_sees_only_the_first_key():
    q, keys, values, _ = case(3, 128)
    positions = torch.tensor([0, 64, 127], device=DEVICE)
    out = scattered.attention(q, keys, values, positions, 0.5, splits=2)
    torch.testing.assert_close(out[0].float(), values[torch.arange(4, device=DEVICE) // 2, 0].float())


def test_mismatched_shapes_are_refused_with_the_shapes_named():
    q, keys, values, positions = case(4, 50)
    with pytest.raises(ValueError, match="positions"):
        scattered.attention(q, keys, values, positions[:3], 0.5)


@pytest.mark.parametrize("config", [dict(mode="blend", ratio=0.3), dict(mode="blend", ratio=0.1, selector="qattn"),
                                    dict(mode="reuse"), dict(mode="prefix")], ids=lambda c: "-".join(map(str, c.values())))
def test_each_mode_through_the_kernel_equals_the_dense_mask(config, monkeypatch):
    """The step's path: `mask` hands the kernel the positions instead of a dense mask, and placed keys turn
    in the re-rotation kernel; the logits and the filled cache are the same as through SDPA and PyTorch's
    passes (float32; the interpreter on the CPU)."""
    from blend.adapter import LlamaStep
    from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
    from tests.helpers.model import assert_same_prefill, random_layout, tiny_model

    step = LlamaStep(tiny_model().to(DEVICE))
    layout = random_layout(seed=5, chunk_lengths=(40, 70, 55))
    prefix = compute_kv(step, layout.prefix)
    chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
    blend_config = BlendConfig(**config)
    calls = []
    kernel_attention = scattered.attention
    monkeypatch.setattr(scattered, "attention", lambda *a, **k: calls.append(a[0].shape[0]) or kernel_attention(*a, **k))
    results = []
    for kernel in (False, True):
        step.scattered_attention = step.rerotate_kernel = kernel
        source = MemorySource(cached_entries(blend_config.mode, prefix, chunks, layout))
        with torch.inference_mode():
            results.append(prefill(step, layout, blend_config, source))
    dense, through_kernel = results
    # Prefix mode computes a suffix at least half the prompt long: plain causal attention, not the kernel.
    assert bool(calls) == (blend_config.mode != "prefix")
    assert_same_prefill(through_kernel, dense)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiling is what this checks (the interpreter compiles nothing)")
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3)])
def test_after_compile_variants_no_launch_of_the_step_compiles_again(heads, kv_heads):
    """The server compiles at start-up (`LlamaStep.compile_kernels`): every size a request can bring then
    finds its kernel compiled (one piece or several, two or three stages, each merge width), for a head count
    that is a multiple of 16 or not (SmolLM2's 9)."""
    from blend.adapter import LlamaStep
    from tests.helpers.model import tiny_model

    model = tiny_model(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=16 * heads)
    step = LlamaStep(model.to(DEVICE).to(torch.bfloat16))
    step.compile_kernels()

    def compiled() -> int:
        return sum(len(cache[0]) for kernel in (scattered._pieces, scattered._merge)
                   for cache in kernel.device_caches.values())

    before = compiled()
    buffer = torch.randn(3000, 2, step.n_kv_heads, step.head_dim, device=DEVICE, dtype=torch.bfloat16)
    keys, values = buffer[:, 0].transpose(0, 1), buffer[:, 1].transpose(0, 1)
    # (16, 32: two stages with every stride a multiple of 16; 775: three stages with none, before the workspace's
    # rows were padded, where heads x rows was a multiple of 16 for some row counts only.)
    for rows in (1, 16, 31, 32, 290, 775, 800, 2900):
        q = torch.randn(rows, step.n_heads, step.head_dim, device=DEVICE, dtype=torch.bfloat16)
        positions = torch.randperm(3000, device=DEVICE)[:rows].sort().values.to(torch.int32)
        for length in (64, 700, 3000):
            scattered.attention(q, keys[:, :length], values[:, :length], positions.clamp(max=length - 1).sort().values,
                                0.25)
    assert compiled() == before


@pytest.mark.parametrize("rows", [1, 7, 16, 32, 290, 775])
@pytest.mark.parametrize("heads", [9, 32])
def test_the_pieces_workspace_strides_are_multiples_of_16_for_any_row_count(rows, heads):
    """The split launch's workspace strides are specialised launch arguments: padded rows keep them in one class
    whatever a request's row count (SmolLM2's 9 heads x 7 rows would not be a multiple of 16)."""
    for part, lse in (scattered._workspace(torch.device("cpu"), 3, rows, heads, 64),
                      scattered.workspace_for(3, rows, heads, 64, torch.device("cpu"))):
        assert part.shape == (3, rows, heads, 64) and lse.shape == (3, rows, heads)
        assert all(stride % 16 == 0 for stride in part.stride()[:3]) and lse.stride(0) % 16 == 0
        assert part.stride(-1) == 1 and lse.stride(-1) == 1


def test_a_kernel_that_does_not_compile_is_turned_off_with_a_warning_and_the_step_still_answers(monkeypatch, caplog):
    """Start-up compiles the kernels; one that fails (another card, a Triton bug) must not stop the server:
    its flag goes off, the warning names the error, and blend runs through SDPA with the same logits."""
    from blend.adapter import LlamaStep
    from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
    from tests.helpers.model import random_layout, tiny_model

    step = LlamaStep(tiny_model().to(DEVICE))
    step.scattered_attention = step.rerotate_kernel = True

    def broken(*args, **kwargs):
        raise RuntimeError("out of shared memory: 232448 > 227328")

    monkeypatch.setattr(scattered, "compile_variants", broken)
    with caplog.at_level("WARNING"):
        step.compile_kernels()
    assert not step.scattered_attention and step.rerotate_kernel
    assert "scattered_attention" in caplog.text and "out of shared memory" in caplog.text
    layout = random_layout(seed=2)
    prefix = compute_kv(step, layout.prefix)
    chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
    config = BlendConfig(mode="blend", ratio=0.3)
    with torch.inference_mode():
        fallback = prefill(step, layout, config, MemorySource(cached_entries("blend", prefix, chunks, layout)))
        step.rerotate_kernel = False
        plain = prefill(step, layout, config, MemorySource(cached_entries("blend", prefix, chunks, layout)))
    torch.testing.assert_close(fallback.logits, plain.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits", [1, 3])
def test_device_bounds_over_a_pool_equal_the_requests_own_keys_and_padding_rows_stay_finite(splits):
    """For a CUDA graph over the KV pool: positions count pool rows, the request's keys start at bounds[0]
    (read on the device), the pieces are fixed. Equal to attention over the request's own rows; padding
    rows pointed at scratch rows below the request see nothing and come out zero, not NaN."""
    q, keys, values, positions = case(60, 200, seed=11)
    pool = torch.randn(2, 4 + 64 + 300, 2, 32, device=DEVICE)  # [k/v, rows, kv heads, d]: scratch, others, ours
    base = 68
    pool[0, base : base + 200] = keys.transpose(0, 1)
    pool[1, base : base + 200] = values.transpose(0, 1)
    pool_keys, pool_values = pool[0].transpose(0, 1), pool[1].transpose(0, 1)
    padded_q = torch.cat((q, torch.randn(4, *q.shape[1:], device=DEVICE)))
    rows = torch.cat((positions + base, torch.zeros(4, dtype=positions.dtype, device=DEVICE))).to(torch.int32)
    bounds = torch.tensor([base, 200], dtype=torch.int64, device=DEVICE)
    workspace = scattered.workspace_for(splits, 64, 4, 32, DEVICE)
    out = scattered.attention(padded_q, pool_keys, pool_values, rows, 0.3, splits=splits, bounds=bounds,
                              workspace=workspace)
    torch.testing.assert_close(out[:60].float(), reference(q, keys, values, positions, 0.3), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[60:], torch.zeros_like(out[60:]))
    with pytest.raises(ValueError, match="bounds"):
        scattered.attention(padded_q, pool_keys, pool_values, rows, 0.3, bounds=bounds)
