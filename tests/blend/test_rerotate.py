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
