"""The re-rotation kernel (blend/rerotate.py) against `LlamaStep.turn_in_place`'s PyTorch passes: on the
CPU under Triton's interpreter (tests/conftest.py), compiled on CUDA (run on the H200)."""

from __future__ import annotations

import pytest
import torch

from blend import rerotate, scattered
from blend.adapter import LlamaStep

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not scattered.available(DEVICE), reason="no Triton here")


def _case(dtype, rows=70, heads=4, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(rows + 5, 2, heads, dim, generator=g).to(DEVICE, dtype)  # [tokens, 2, kv, d]
    old = torch.randint(0, 4000, (rows,), generator=g)
    new = old + torch.randint(-300, 900, (rows,), generator=g).clamp(min=-old.min().item())
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = (new.double()[:, None] - old.double()[:, None]) * inv_freq.double()[None, :]
    cos, sin = LlamaStep._cos_sin(angles)
    return buffer, cos.to(DEVICE), LlamaStep.signed_sin(sin).to(DEVICE)


@pytest.mark.parametrize("rows", [1, 31, 70])
def test_float32_turn_equals_the_pytorch_passes(rows):
    buffer, cos, signed_sin = _case(torch.float32, rows=rows)
    expected = buffer.clone()
    LlamaStep.turn_in_place(expected[:rows, 0], cos, signed_sin)
    rerotate.turn(buffer[:rows, 0], cos, signed_sin)
    torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-6)  # V and rows past the view untouched


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Triton's interpreter converts bfloat16 wrongly (numpy has none)")
def test_bfloat16_turn_equals_the_pytorch_passes_to_the_last_bit_almost_everywhere():
    buffer, cos, signed_sin = _case(torch.bfloat16, rows=300, heads=8, dim=128)
    expected = buffer.clone()
    LlamaStep.turn_in_place(expected[:300, 0], cos, signed_sin)
    rerotate.turn(buffer[:300, 0], cos, signed_sin)
    assert torch.equal(buffer[:, 1], expected[:, 1])
    differ = (buffer != expected).float().mean().item()
    assert differ < 1e-3 and (buffer.float() - expected.float()).abs().max() < 0.05


def test_a_key_view_of_the_wrong_shape_is_refused():
    buffer, cos, signed_sin = _case(torch.float32)
    with pytest.raises(ValueError, match="keys"):
        rerotate.turn(buffer[:10, 0], cos, signed_sin)


def _positions_case(dtype, rows, heads=4, dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(rows + 5, 2, heads, dim, generator=g).to(DEVICE, dtype)
    old = torch.randint(0, 8000, (rows,), generator=g)
    new = (old + torch.randint(-500, 3000, (rows,), generator=g)).clamp(min=0)
    inv_freq = (1.0 / (500000.0 ** (torch.arange(0, dim, 2).float() / dim))).float()
    return buffer, torch.stack((old, new)).to(DEVICE), inv_freq.to(DEVICE)


def _tables(old_new, inv_freq):
    """`LlamaStep.turn_pair`'s cos and signed sin (float32 angles, their float64 difference)."""
    angles = (old_new.flatten().to(torch.float32)[:, None] * inv_freq[None, :]).double().unflatten(0, old_new.shape)
    cos, sin = LlamaStep._cos_sin(angles[1] - angles[0])
    return cos, LlamaStep.signed_sin(sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 33, 70])
def test_turn_from_positions_equals_the_turn_by_the_steps_tables(rows, dtype):
    if dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("Triton's interpreter converts bfloat16 wrongly (numpy has none)")
    buffer, old_new, inv_freq = _positions_case(dtype, rows, heads=8, dim=128)
    expected = buffer.clone()
    rerotate.turn(expected[:rows, 0], *_tables(old_new, inv_freq))
    rerotate.turn_at(buffer[:rows, 0], old_new, inv_freq)
    # Compiled on CUDA the kernel's float64 cos/sin are the CUDA math library's, as PyTorch's: the same bits;
    # under the interpreter numpy's against PyTorch's CPU ones, within a unit of the last place.
    if DEVICE.type == "cuda":
        assert torch.equal(buffer, expected)
    else:
        torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-6)


def test_turn_from_positions_takes_the_steps_cos_and_sin():
    """Keys (1, 0) in their two halves turn into (cos, sin) exactly (x cos + 0, 0 + 1 sin): the kernel's own cos and
    sin against the step's tables, apart from the rotation's arithmetic (the test above checks both together)."""
    rows, heads, dim = 70, 8, 128
    _, old_new, inv_freq = _positions_case(torch.float32, rows, heads=heads, dim=dim)
    keys = torch.zeros(rows, heads, dim, device=DEVICE)
    keys[..., : dim // 2] = 1.0
    rerotate.turn_at(keys, old_new, inv_freq)
    cos, signed_sin = _tables(old_new, inv_freq)
    expected = torch.cat((cos[:, :, : dim // 2], signed_sin[:, :, dim // 2 :]), dim=-1).expand(rows, heads, dim)
    if DEVICE.type == "cuda":
        assert torch.equal(keys, expected), f"{(keys != expected).float().mean().item():.3%} of cos/sin differ"
    else:
        torch.testing.assert_close(keys, expected, rtol=1e-6, atol=1e-6)


def test_float32_turn_from_positions_equals_the_pytorch_passes():
    buffer, old_new, inv_freq = _positions_case(torch.float32, 70)
    expected = buffer.clone()
    LlamaStep.turn_in_place(expected[:70, 0], *_tables(old_new, inv_freq))
    rerotate.turn_at(buffer[:70, 0], old_new, inv_freq)
    torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-6)


def test_positions_of_the_wrong_shape_are_refused():
    buffer, old_new, inv_freq = _positions_case(torch.float32, 10)
    with pytest.raises(ValueError, match="positions"):
        rerotate.turn_at(buffer[:10, 0], old_new[:, :9], inv_freq)


def test_start_up_checks_the_turn_from_positions_against_the_tables(monkeypatch):
    _, _, inv_freq = _positions_case(torch.float32, 1)
    rerotate.compile_variants(2, 32, torch.float32, DEVICE, inv_freq, lambda old_new: _tables(old_new, inv_freq))
    real = rerotate.turn_at
    monkeypatch.setattr(rerotate, "turn_at", lambda keys, old_new, inv_freq: real(keys, old_new, inv_freq * 1.5))
    with pytest.raises(RuntimeError, match="differs"):
        rerotate.compile_variants(2, 32, torch.float32, DEVICE, inv_freq, lambda old_new: _tables(old_new, inv_freq))
