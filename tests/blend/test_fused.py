"""The fused elementwise kernels (blend/fused.py) against the step's PyTorch passes: on the CPU under Triton's
interpreter (tests/conftest.py), compiled on CUDA (run on the H200)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blend import fused, scattered
from blend.adapter import LlamaStep

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not scattered.available(DEVICE), reason="no Triton here")


def _projection(rows, heads=4, kv_heads=2, dim=32, dtype=torch.float32, seed=0):
    """q, k, v as column slices of one fused projection's output (strided, as the step has them), and the
    step's (cos, signed sin) at random positions."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.randint(0, 5000, (rows,), generator=g).float()[:, None] * inv_freq[None, :]
    cos, sin = LlamaStep._cos_sin(angles)
    cos, signed_sin = cos.to(DEVICE, dtype), LlamaStep.signed_sin(sin).to(DEVICE, dtype)
    return q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim), cos, signed_sin


@pytest.mark.parametrize("rows", [1, 17, 40])
@pytest.mark.parametrize("into_slots", [False, True])
def test_rope_and_kv_write_equal_the_pytorch_passes(rows, into_slots):
    q, k, v, cos, signed_sin = _projection(rows)
    buffer = torch.randn(rows + 30, 2, 2, 32).to(DEVICE)  # a layer of a KV buffer
    slots = torch.randperm(rows + 30)[:rows].to(DEVICE) if into_slots else None
    expected = buffer.clone()
    kv = torch.stack((LlamaStep.rotate_by(k, cos, signed_sin), v), dim=1)
    if into_slots:
        expected.index_copy_(0, slots, kv)
    else:
        expected[:rows] = kv
    q_out = torch.zeros(rows + 3, 4, 32, device=DEVICE)  # a graph bucket's rows: more than T
    fused.rope_qkv(q, k, v, cos, signed_sin, q_out, buffer, slots)
    torch.testing.assert_close(q_out[:rows], LlamaStep.rotate_by(q, cos, signed_sin), rtol=1e-6, atol=1e-6)
    assert not q_out[rows:].any()  # rows past T untouched
    torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-6)  # untouched rows too


def test_silu_mul_equals_the_modules_product_on_strided_halves():
    g = torch.Generator().manual_seed(1)
    gate_up = (3 * torch.randn(9, 2 * 1100, generator=g)).to(DEVICE)  # 1,100 columns: two column blocks, a ragged one
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_wrong_shapes_are_refused_with_the_shapes_named():
    q, k, v, cos, signed_sin = _projection(8)
    with pytest.raises(ValueError, match=r"kv_out \(8, 2, 3, 32\)"):
        fused.rope_qkv(q, k, v, cos, signed_sin, torch.empty(8, 4, 32, device=DEVICE),
                       torch.empty(8, 2, 3, 32, device=DEVICE))
    with pytest.raises(ValueError, match="slots"):
        fused.rope_qkv(q, k, v, cos, signed_sin, torch.empty(8, 4, 32, device=DEVICE),
                       torch.empty(8, 2, 2, 32, device=DEVICE), torch.arange(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"gate \(4, 6\) and up \(4, 5\)"):
        fused.silu_mul(torch.empty(4, 6, device=DEVICE), torch.empty(4, 5, device=DEVICE))


@pytest.mark.parametrize("config,fuse_up_to,norm_rows", [
    (dict(mode="full"), 1024, 8), (dict(mode="full"), 8, 0), (dict(mode="blend", ratio=0.3), 1024, 0),
    (dict(mode="blend", ratio=0.2, selector="qattn+sink4+nofirst+cachedk"), 1024, 8)],
    ids=["full-fused-up-to-1024-norms", "full-fused-up-to-8", "blend-0.3-fused-up-to-1024",
         "blend-0.2-cachedk-fused-up-to-1024-norms"])
def test_each_mode_through_the_fused_kernels_equals_the_pytorch_passes(config, fuse_up_to, norm_rows, monkeypatch):
    """The step's path: q/k/v as one projection with RoPE and the KV write in one kernel, SiLU x up in
    another (and, where norm_rows, the norms of steps of at most that many rows in a third); the logits and
    the filled cache are those of PyTorch's passes (float32)."""
    from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
    from tests.helpers.model import assert_same_prefill, random_layout, tiny_model

    step = LlamaStep(tiny_model().to(DEVICE))
    step.fuse_projections_up_to = fuse_up_to  # 8: larger steps project q, k, v (and gate, up) apart, contiguous
    layout = random_layout(seed=4, chunk_lengths=(20, 35, 27))  # (ragged against ROPE_ROWS and MLP_ROWS)
    blend_config = BlendConfig(**config)
    calls = []
    # The norm kernel for the steps of at most 8 rows (the system prefix's own K/V, 6 tokens; with +cachedk the
    # question's 5 rows before the check layer), in two of the cases: interpreted, a program a row, it dominated this
    # test's time with the chunks' steps too (64 rows: 13.6 and 9.4 s of the suite on this 2-core machine). The
    # prefix's K/V is compared too: in full prefill it is the norm kernel's only output.
    monkeypatch.setattr(fused, "NORM_ROWS", norm_rows)
    for name in ("rope_qkv", "silu_mul", "rms_norm"):
        kernel = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, kernel=kernel, name=name, **k: calls.append(name) or kernel(*a, **k))
    results, prefixes = [], []
    for kernels in (False, True):
        step.fused_kernels = kernels
        prefix = compute_kv(step, layout.prefix)
        prefixes.append(prefix.kv)
        source = None  # (full prefill reads no cache: no chunk's own K/V computed for it)
        if blend_config.mode != "full":
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            source = MemorySource(cached_entries(blend_config.mode, prefix, chunks, layout))
        with torch.inference_mode():
            results.append(prefill(step, layout, blend_config, source))
    plain, through_kernels = results
    assert calls.count("rope_qkv") >= step.n_layers and calls.count("silu_mul") >= step.n_layers
    assert calls.count("rms_norm") >= (2 * step.n_layers if norm_rows else 0)
    assert_same_prefill(through_kernels, plain)
    torch.testing.assert_close(prefixes[1], prefixes[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Triton's interpreter converts bfloat16 wrongly (numpy has none)")
def test_bfloat16_kernels_equal_the_pytorch_passes_to_the_last_bit_almost_everywhere():
    q, k, v, cos, signed_sin = _projection(300, heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16)
    q_out = torch.empty(300, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    kv_out = torch.empty(300, 2, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    fused.rope_qkv(q, k, v, cos, signed_sin, q_out, kv_out)
    assert torch.equal(q_out, LlamaStep.rotate_by(q, cos, signed_sin))  # the same roundings, in the same order
    assert torch.equal(kv_out[:, 0], LlamaStep.rotate_by(k, cos, signed_sin)) and torch.equal(kv_out[:, 1], v)
    gate_up = 3 * torch.randn(300, 2 * 14336, device=DEVICE, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    ours, theirs = fused.silu_mul(gate, up), F.silu(gate) * up
    differ = (ours != theirs).float().mean().item()  # exp's last float32 bit may differ, and a rounding with it
    assert differ < 1e-3 and torch.allclose(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_rms_norm_equals_pytorchs_fused_norm_on_strided_rows(dtype, tolerance):
    g = torch.Generator().manual_seed(2)
    wide = (4 * torch.randn(5, 200, generator=g)).to(DEVICE, dtype)
    h = wide[:, :150]  # 150 columns: a ragged block; rows strided as a fused projection's slice
    weight = torch.randn(150, generator=g).to(DEVICE, dtype)
    expected = F.rms_norm(h.float(), (150,), weight.float(), 1e-5)
    # bf16: within one unit in the last place of the float32 result rounded once.
    torch.testing.assert_close(fused.rms_norm(h, weight, 1e-5).float(), expected, rtol=tolerance, atol=tolerance)


def test_rms_norm_refuses_a_weight_of_another_width():
    with pytest.raises(ValueError, match=r"weight \(7,\)"):
        fused.rms_norm(torch.zeros(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-5)
