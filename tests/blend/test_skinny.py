"""The few-rows matmul kernel (blend/skinny.py) against PyTorch's: on the CPU under Triton's interpreter
(tests/conftest.py), compiled on CUDA (run on the H200)."""

from __future__ import annotations

import pytest
import torch

from blend import skinny

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not skinny.available(DEVICE), reason="no Triton for this device")

K = 512
N = 100  # ragged against every block_n: the last column block is partly masked


def operands(rows, n=N, k=K, dtype=torch.float32, seed=0):
    """(x [rows, k], weight [n, k], residual [rows, n]), scaled like a hidden state and a projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    residual = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    return x, weight, residual


@pytest.mark.parametrize("rows", [1, 3, 16, 20])
@pytest.mark.parametrize("n,block_k", [(96, 256), (100, 128)])
def test_float32_equals_the_matmul(rows, n, block_k):
    x, weight, _ = operands(rows, n)
    out = skinny.linear(x, weight, block_k=block_k)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 20])
def test_residual_is_added_before_the_one_rounding(rows):
    x, weight, residual = operands(rows, seed=1)
    out = skinny.linear(x, weight, residual, block_n=16)
    torch.testing.assert_close(out, torch.addmm(residual, x, weight.T), rtol=1e-5, atol=1e-5)


def test_strided_rows_and_strided_residual():
    """x a column slice of a wider tensor (a fused projection's output), the residual one too."""
    x_wide, weight, _ = operands(5, k=K + 64, seed=2)
    x = x_wide[:, 64:]
    weight = weight[:, :K].contiguous()
    residual = torch.randn(5, N + 28).to(DEVICE)[:, 28:]
    assert x.stride(0) == K + 64 and residual.stride(0) == N + 28
    out = skinny.linear(x, weight, residual)
    torch.testing.assert_close(out, torch.addmm(residual, x, weight.T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 20])
def test_each_row_is_what_it_is_alone(rows):
    """A batched decode gives each request, bit for bit, what it gets alone (20 rows: the 32-row tile against
    the 16-row one of a row alone). Bit for bit where the kernel is compiled (CUDA); under Triton's interpreter a
    tile's product is numpy's matmul, whose BLAS kernel may round a row differently by the tile's row count
    (OpenBLAS on an AMD EPYC host does), so there to float32 rounding."""
    x, weight, residual = operands(rows, seed=3)
    out = skinny.linear(x, weight, residual)
    for i in range(rows):
        alone = skinny.linear(x[i : i + 1], weight, residual[i : i + 1])
        if DEVICE.type == "cuda":
            assert torch.equal(out[i : i + 1], alone), i
        else:
            torch.testing.assert_close(out[i : i + 1], alone, rtol=2e-6, atol=2e-6)


def test_float16_rounds_once_from_float32():
    x, weight, residual = operands(3, dtype=torch.float16, seed=4)
    reference = torch.addmm(residual.float(), x.float(), weight.float().T)
    out = skinny.linear(x, weight, residual)
    assert out.dtype == torch.float16
    # The one rounding to fp16 (half an ulp: 2^-11 relative) over exact products summed in float32.
    torch.testing.assert_close(out.float(), reference, rtol=2 ** -10, atol=1e-3)


def test_default_block_k_falls_back_to_a_divisor():
    """K 576 (SmolLM2's hidden size) is no multiple of BLOCK_K 256: the K step becomes 64."""
    x, weight, _ = operands(2, n=40, k=576, seed=5)
    assert skinny.supports(2, 40, 576, torch.float32)
    torch.testing.assert_close(skinny.linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused_with_the_value_named():
    x, weight, residual = operands(3)
    with pytest.raises(ValueError, match=r"x \(3, 512\) and weight \(100, 256\)"):
        skinny.linear(x, weight[:, :256].contiguous())
    with pytest.raises(ValueError, match="33 rows"):
        skinny.linear(torch.zeros(33, K, device=DEVICE), weight)
    with pytest.raises(ValueError, match="K 384 is no multiple of block_k 256"):
        skinny.linear(x[:, :384], weight[:, :384].contiguous(), block_k=256)
    with pytest.raises(ValueError, match="K 520 is no multiple of block_k 256 nor"):
        skinny.linear(torch.zeros(3, 520, device=DEVICE), torch.zeros(N, 520, device=DEVICE))
    with pytest.raises(ValueError, match=r"residual \(3, 99\)"):
        skinny.linear(x, weight, residual[:, :99])
    with pytest.raises(ValueError, match="weight strides"):
        skinny.linear(x, weight.T.contiguous().T)
    with pytest.raises(ValueError, match="block_n 24"):
        skinny.linear(x, weight, block_n=24)
    with pytest.raises(ValueError, match="torch.float64"):
        skinny.linear(x.double(), weight.double())


def test_supports():
    assert skinny.supports(1, 6144, 4096, torch.bfloat16)
    assert skinny.supports(skinny.MAX_ROWS, 28672, 4096, torch.float16)
    assert skinny.supports(16, 4096, 14336, torch.float32)
    assert not skinny.supports(skinny.MAX_ROWS + 1, 4096, 4096, torch.bfloat16)
    assert not skinny.supports(0, 4096, 4096, torch.bfloat16)
    assert not skinny.supports(1, 4096, 4104, torch.bfloat16)  # 8 x 513: no power of two >= 16 divides it
    assert not skinny.supports(1, 4096, 4096, torch.float64)
    assert not skinny.supports(1, 4096, 384, torch.bfloat16, block_k=256)
    assert skinny.supports(1, 4096, 384, torch.bfloat16, block_k=128)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bfloat16 under Triton's interpreter: numpy has no bfloat16")
@pytest.mark.parametrize("rows", [1, 16, 32])
def test_bfloat16_against_addmm(rows):
    x, weight, residual = operands(rows, n=4096, k=4096, dtype=torch.bfloat16, seed=6)
    out = skinny.linear(x, weight, residual)
    # Both round one float32 sum to bfloat16 (8 bits: 2^-8 relative); their sums differ only in order.
    torch.testing.assert_close(out, torch.addmm(residual, x, weight.T), rtol=2 ** -7, atol=2e-2)
    torch.testing.assert_close(skinny.linear(x, weight), x @ weight.T, rtol=2 ** -7, atol=2e-2)
    for i in {0, rows - 1}:  # bit for bit what the row gets alone (past 16 rows: across the row tiles)
        assert torch.equal(out[i : i + 1], skinny.linear(x[i : i + 1], weight, residual[i : i + 1])), i


def test_compile_variants_then_every_shape_runs():
    skinny.compile_variants([(100, 512), (96, 520), (40, 576)], torch.float32, DEVICE)  # (96, 520): skipped
    x, weight, residual = operands(20, n=100, seed=7)
    torch.testing.assert_close(skinny.linear(x, weight, residual), torch.addmm(residual, x, weight.T),
                               rtol=1e-5, atol=1e-5)
