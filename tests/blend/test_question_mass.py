"""The question's attention mass in Triton (blend/question_mass.py) against selectors.question_attention's
PyTorch operations: on the CPU under Triton's interpreter (tests/conftest.py), compiled on CUDA (run on the H200);
and the served ranking through it picks the same tokens."""

from __future__ import annotations

import pytest
import torch

from blend import question_mass, scattered
from blend.selectors import question_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not scattered.available(DEVICE), reason="no Triton here")


def _case(tokens, heads, kv_heads, dim, n_question, q_rows=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_rows or tokens, heads, dim, generator=g).to(DEVICE, dtype)
    buffer = torch.randn(tokens + 3, 2, kv_heads, dim, generator=g).to(DEVICE, dtype)  # keys: a buffer's view
    positions = (torch.arange(tokens) + 7).to(DEVICE)
    return q, buffer[:tokens, 0], positions, n_question


@pytest.mark.parametrize("groups", ["sum", "max"])
@pytest.mark.parametrize("shape", [(70, 4, 2, 32, 5, None), (200, 8, 2, 32, 7, 20), (130, 4, 4, 16, 3, 3),
                                   (64, 4, 2, 32, 1, 1),
                                   # more question rows than a program takes (`rows_for`): several row blocks
                                   (100, 4, 2, 16, 20, None), (200, 8, 2, 16, 9, 12)])
def test_float32_mass_equals_the_pytorch_operations(shape, groups):
    tokens, heads, kv_heads, dim, n_question, q_rows = shape
    q, keys, positions, n_question = _case(tokens, heads, kv_heads, dim, n_question, q_rows)
    want = question_attention(q, keys, positions, n_question, 0.3, groups)
    got = question_mass.mass(q, keys, positions, n_question, 0.3, groups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Triton's interpreter converts bfloat16 wrongly (numpy has none)")
def test_bfloat16_mass_at_the_served_shape_equals_the_pytorch_operations():
    q, keys, positions, n_question = _case(5152, 32, 8, 128, 32, q_rows=32, dtype=torch.bfloat16)
    want = question_attention(q, keys, positions, n_question, 128 ** -0.5)
    got = question_mass.mass(q, keys, positions, n_question, 128 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(got.topk(256).indices.sort().values, want.topk(256).indices.sort().values)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled kernels are cached on CUDA only (the interpreter compiles none)")
def test_one_compiled_kernel_serves_every_question_length():
    """A served question's length varies request to request: no length compiles a kernel of its own on the request
    path (the row count is a run-time argument, the row tile fixed), long questions included."""
    seen = None
    for n_question in (32, 33, 57, 200):
        q, keys, positions, _ = _case(1000, 32, 8, 128, n_question, q_rows=n_question, dtype=torch.bfloat16)
        want = question_attention(q, keys, positions, n_question, 128 ** -0.5)
        got = question_mass.mass(q, keys, positions, n_question, 128 ** -0.5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        compiled = {key for key in scattered._COMPILED if key[0] in (question_mass._partials, question_mass._mass)}
        assert seen is None or compiled == seen, f"a {n_question}-token question compiled a kernel of its own"
        seen = compiled


def test_inputs_of_the_wrong_shape_are_refused():
    q, keys, positions, _ = _case(70, 4, 2, 32, 5)
    with pytest.raises(ValueError, match="question rows"):
        question_mass.mass(q, keys, positions[:60], 5, 0.3)
    with pytest.raises(ValueError, match="question rows"):
        question_mass.mass(q, keys, positions, 0, 0.3)


def test_the_served_selector_through_the_kernel_recomputes_the_same_tokens():
    from blend.adapter import LlamaStep
    from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
    from services.settings import SERVED_SELECTOR
    from tests.helpers.model import random_layout, tiny_model

    step = LlamaStep(tiny_model().to(DEVICE))
    layout = random_layout(seed=4, chunk_lengths=(40, 37, 51))
    prefix = compute_kv(step, layout.prefix)
    chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
    config = BlendConfig(mode="blend", ratio=0.2, selector=SERVED_SELECTOR)
    with torch.inference_mode():
        results = []
        for kernel in (False, True):
            step.question_kernel = kernel
            results.append(prefill(step, layout, config, MemorySource(cached_entries("blend", prefix, chunks, layout))))
    plain, fused = results
    assert fused.recomputed == plain.recomputed
    torch.testing.assert_close(fused.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.cache.data[:, : plain.length], plain.cache.data[:, : plain.length],
                               rtol=1e-5, atol=1e-5)


def test_start_up_checks_the_kernel_against_the_pytorch_operations(monkeypatch):
    """compile_variants runs the kernel on a small case and compares: a kernel computing otherwise raises (and
    `LlamaStep.compile_kernels` then turns it off), so it is never served."""
    question_mass.compile_variants(4, 2, 32, torch.float32, DEVICE, question_attention)
    real = question_mass.mass
    monkeypatch.setattr(question_mass, "mass", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    with pytest.raises(RuntimeError, match="differs"):
        question_mass.compile_variants(4, 2, 32, torch.float32, DEVICE, question_attention)
