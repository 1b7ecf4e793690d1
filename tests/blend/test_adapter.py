"""The per-layer step reproduces the Hugging Face forward for each supported family (tiny random models)."""

import pytest
import torch

from blend.adapter import LlamaStep, UnsupportedModel
from blend.decode import greedy
from blend.loader import gate
from tests.helpers.model import tiny_model


@pytest.mark.parametrize("family,extra", [("llama", {}), ("mistral", {}), ("qwen2", {})])
def test_full_prefill_matches_hf_forward(family, extra):
    model = tiny_model(family, **extra)
    step = LlamaStep(model)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(ids[None]).logits[0]
        ours = step.forward(ids, torch.arange(40), step.new_cache(40))
    assert (ours - reference).abs().max() < 1e-4


def test_prefill_in_pieces_equals_one_prefill(tiny):
    """Positions are explicit, so computing a prompt in three calls fills the same cache."""
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole_cache = tiny.new_cache(30)
        whole = tiny.forward(ids, torch.arange(30), whole_cache)
        cache = tiny.new_cache(30)
        for lo, hi in ((0, 7), (7, 20), (20, 30)):
            last = tiny.forward(ids[lo:hi], torch.arange(lo, hi), cache)
    assert (last[-1] - whole[-1]).abs().max() < 1e-5
    assert (cache.data - whole_cache.data).abs().max() < 1e-5


def test_greedy_decode_matches_hf_generate(tiny):
    prompt = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = tiny.hf.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long),
                                    max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                    pad_token_id=0)[0, 12:].tolist()
        cache = tiny.new_cache(22)
        logits = tiny.forward(prompt, torch.arange(12), cache)[-1]
        ours = list(greedy(tiny, cache, 12, logits, 10, stop_ids=set()))
    assert ours == expected


def test_rerotation_is_exact(tiny):
    """K computed at position p, then rotated by d, equals K computed at p + d."""
    k = torch.randn(16, tiny.n_kv_heads, tiny.head_dim, generator=torch.Generator().manual_seed(4))
    for p, d in ((0, 5), (100, 37), (311, -200)):
        at_p = tiny.rotate(k, torch.arange(p, p + 16))
        at_p_plus_d = tiny.rotate(k, torch.arange(p + d, p + d + 16))
        assert (tiny.rerotate(at_p, p, d) - at_p_plus_d).abs().max() < 1e-5


def test_attention_mask_is_exact_for_sparse_positions(tiny):
    """A query at position p sees keys 0..p only, even when later positions hold keys (blend's case)."""
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        cache = tiny.new_cache(20)
        tiny.forward(ids, torch.arange(20), cache)  # every slot filled, including later ones
        positions = torch.tensor([3, 11])
        h = torch.randn(2, tiny.config.hidden_size, generator=torch.Generator().manual_seed(6))
        q, _, _ = tiny.qkv(2, h, positions)
        out = tiny.attend(2, h, q, positions, cache, 20)
        for row, p in enumerate(positions.tolist()):
            alone = tiny.attend(2, h[row : row + 1], q[row : row + 1], positions[row : row + 1],
                                _truncated(cache, p + 1), p + 1)
            assert (out[row] - alone[0]).abs().max() < 1e-5


def _truncated(cache, length):
    from blend.cache import KVCache

    return KVCache(cache.data[:, :length].clone())


@pytest.mark.parametrize(
    "family,overrides,named",
    [
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ("llama", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                    "long_factor": [1.0] * 8, "factor": 2.0,
                                    "original_max_position_embeddings": 256}}, "longrope"),
        ("mistral", {"sliding_window": 64}, "sliding_window"),
        ("gpt2", {}, "gpt2"),
    ],
)
def test_unsupported_settings_are_refused_by_name(family, overrides, named):
    from transformers import AutoConfig

    from blend.adapter import check_supported

    config = AutoConfig.for_model(family, **overrides)
    with pytest.raises(UnsupportedModel, match=named):
        check_supported(config)


def test_partial_rotary_is_refused():
    from transformers import AutoConfig

    from blend.adapter import check_supported

    config = AutoConfig.for_model("llama", partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor"):
        check_supported(config)


def test_gate_refuses_a_step_that_disagrees_with_the_model(tiny):
    probe = [ord(c) % 128 for c in "a probe prompt of some length, long enough to matter"]
    assert gate(tiny, probe) < 1e-4
    broken = LlamaStep(tiny.hf)
    broken.inv_freq = broken.inv_freq * 1.5  # a RoPE the model was not trained with
    with pytest.raises(UnsupportedModel, match="does not reproduce"):
        gate(broken, probe)


@pytest.mark.parametrize("fused_up_to", [1024, 8], ids=["fused-projections", "one-matmul-each"])
def test_in_bf16_the_step_rotates_and_computes_as_the_hugging_face_forward(fused_up_to):
    """A bf16 model rotates q/k in bf16 with cos/sin rounded from float32, as the HF forward does: q/k
    within one bf16 unit (of the largest) of HF's (the fused norm, the 3-kernel rotation and the residual add inside the
    GEMM round once where HF rounds twice), and logits as close to the float32 model's as HF's own bf16
    forward is (a float32 rotation with bf16 cos/sin was off by ~1% of HF's); with q/k/v and gate/up
    fused into one matmul each (small steps) and with one matmul per projection (steps over more than
    `fuse_projections_up_to` tokens)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    reference = tiny_model()
    hf = tiny_model().to(torch.bfloat16)
    step = LlamaStep(hf)
    step.fuse_projections_up_to = fused_up_to
    ids = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(40)
    with torch.inference_mode():
        h = step.embed(ids)
        q, k, _ = step.qkv(0, h, positions)
        attn = hf.model.layers[0].self_attn
        x = hf.model.layers[0].input_layernorm(h)
        heads = lambda proj, n: proj(x).view(40, n, step.head_dim).transpose(0, 1)[None]  # noqa: E731
        cos, sin = hf.model.rotary_emb(h[None], positions[None])
        want_q, want_k = apply_rotary_pos_emb(heads(attn.q_proj, step.n_heads), heads(attn.k_proj, step.n_kv_heads),
                                              cos, sin)
        for ours, want in ((q, want_q[0].transpose(0, 1)), (k, want_k[0].transpose(0, 1))):
            assert (ours.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
        truth = reference(ids[None]).logits[0]
        error = lambda logits: float((logits.float() - truth).abs().max() / truth.abs().max())  # noqa: E731
        ours = step.forward(ids, positions, step.new_cache(40))
        assert error(ours) <= 1.25 * error(hf(ids[None]).logits[0]) + 1e-3


def test_fused_projections_share_the_modules_memory_and_follow_a_moved_model():
    """q/k/v (and gate/up) run as one matmul over one matrix whose rows are the modules' own weights (views,
    no second copy); the HF forward is unchanged; when the model is moved (its weights re-allocated) the
    step fuses again instead of reading a stale matrix."""
    from blend.adapter import fused_projection

    hf = tiny_model()
    ids = torch.randint(0, 100, (30,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = hf(ids[None]).logits[0]
        step = LlamaStep(hf)
        attn = hf.model.layers[0].self_attn
        weight, _ = fused_projection([attn.q_proj, attn.k_proj, attn.v_proj])
        assert attn.q_proj.weight.data_ptr() == weight.data_ptr()
        assert attn.v_proj.weight.data_ptr() == weight[-attn.v_proj.weight.shape[0]:].data_ptr()
        assert torch.equal(hf(ids[None]).logits[0], before)
        assert (step.forward(ids, torch.arange(30), step.new_cache(30)) - before).abs().max() < 1e-4
        hf.to(torch.float64)  # every weight re-allocated
        moved, _ = fused_projection([attn.q_proj, attn.k_proj, attn.v_proj])
        assert moved.dtype == torch.float64 and moved.data_ptr() == attn.q_proj.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_turning_keys_in_place_equals_the_rotation(tiny, dtype):
    """The placement's in-place re-rotation (a roll and a signed sin: fewer kernels) moves keys as
    `apply_rotation` does, within float32 rounding (and so, in bf16, to the same or the adjacent value)."""
    g = torch.Generator().manual_seed(8)
    keys = torch.randn(40, 2, tiny.n_kv_heads, tiny.head_dim, generator=g).to(dtype)[:, 0]  # strided, as in a buffer
    old = torch.arange(100, 140)
    new = old + 37
    cos, sin = tiny.turn_between(old, new)
    want = tiny.apply_rotation(keys, cos, sin)
    tiny.turn_in_place(keys, cos, tiny.signed_sin(sin))
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7 * float(want.abs().max())
    assert (keys.float() - want.float()).abs().max() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotation_matrices_rotate_as_the_elementwise_rope(dtype):
    """`rotation`'s per-token matrices (a decode step's q/k rotated by one batched matmul per layer) give
    what `rotate_by` gives: in float32 within rounding, in bf16 within one unit of the largest value (the
    matmul rounds the two products' sum once, `rotate_by` the first product too), and a layer's q/k over them
    are the same as over cos/sin (v untouched)."""
    step = LlamaStep(tiny_model().to(dtype))
    positions = torch.tensor([0, 5, 1000, 4097])
    x = torch.randn(4, 6, step.head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = step.rotate_by(x, *step.cos_sin(positions))
    got = torch.bmm(x, step.rotation(positions))
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -7 * float(want.abs().max())
    assert (got.float() - want.float()).abs().max() <= tolerance * (4 if dtype == torch.float32 else 1)
    with torch.inference_mode():
        h = step.embed(torch.tensor([3, 9, 27, 81]))
        q_matrix, k_matrix, v_matrix = step.qkv(0, h, positions, step.rotation(positions))
        q_pair, k_pair, v_pair = step.qkv(0, h, positions, step.cos_sin(positions))
    assert torch.equal(v_matrix, v_pair)
    for a, b in ((q_matrix, q_pair), (k_matrix, k_pair)):
        assert (a.float() - b.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 2 ** -7 * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rope_table_holds_the_same_bits_as_computing_cos_sin(dtype):
    """CUDA steps look cos/sin up in a table of the whole context (`cos_sin`): every entry bit-equal to the
    values computed for those positions, at the first, scattered and last positions of the context."""
    step = LlamaStep(tiny_model().to(dtype))
    table = step._cos_sin_table()
    assert table is not None and table[0].shape == (step.max_positions, 1, step.head_dim)
    positions = torch.tensor([0, 1, 7, 300, step.max_positions - 2, step.max_positions - 1])
    for looked_up, computed in zip((table[0][positions], table[1][positions]), step._cos_sin_at(positions)):
        assert looked_up.dtype == dtype and torch.equal(looked_up, computed)
    step._rope_table = table  # as on CUDA: the step's own passes take the table from here
    assert all(torch.equal(a, b) for a, b in zip(step.cos_sin(positions), step._cos_sin_at(positions)))
