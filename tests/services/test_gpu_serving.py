"""The served request on CUDA (skipped without CUDA; run on the lent H200): `kvblend serve --device
cuda` answers a blend request with exactly the tokens the fusor gives in-process for the same prompt,
chunk KV and plan, and its report says where the KV came from and that no layer waited for it."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.model import CACHE_DIR
from tests.helpers.service import DOCUMENTS, ServerProcess

from blend.decode import greedy, stop_token_ids
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from blend.loader import load
from blend.prompt import build_layout
from services.settings import SERVED_SELECTOR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUESTION = "Which river flows through the capital of France?"


@pytest.mark.parametrize("tier,whole_layers", [("gpu", False), ("cpu", False), ("cpu", True)])
def test_a_blend_answer_through_the_server_on_cuda_equals_the_fusor_in_process(service_model_dir, tmp_path, tier,
                                                                               whole_layers):
    """`whole_layers`: the opt-in whole-layer graphs over the KV pool (`server.pool_layer_graphs`)."""
    store = {"gpu_bytes": 1 << 30, "cpu_bytes": 1 << 30} if tier == "gpu" else {"gpu_bytes": 0, "cpu_bytes": 1 << 30}
    server = ServerProcess(tmp_path / "server", service_model_dir, {
        "server": {"chunk_tokens": 128, "pool_layer_graphs": whole_layers},
        "model": {"device": "cuda", "dtype": "bfloat16"},
        "store": {"disk_path": "", "admit_after": 1, **store}, "guard": {"fraction": 0.0}})
    try:
        with server.client() as client:
            client.wait_ready(60)
            response = client.ingest(DOCUMENTS)
            ids = [document.chunk_ids[0] for document in response.documents]
            texts = {c.chunk_id: c.text for c in client.retrieve(QUESTION, k=len(ids)).chunks}
            client.answer(QUESTION, chunk_ids=ids, mode="blend", ratio=0.15, max_new_tokens=2)  # warm-up
            answer = client.answer(QUESTION, chunk_ids=ids, mode="blend", ratio=0.15, max_new_tokens=12)
    finally:
        server.stop()
    report = answer.report
    assert dict(report.chunks_hit) == {tier: len(ids)} and report.chunks_missing == 0
    assert report.stalled_layers == 0 and report.plan.planned and report.ratio >= 0.15
    model = load(str(service_model_dir), CACHE_DIR, torch.bfloat16, "cuda")
    layout = build_layout(model.tokenizer, [texts[cid] for cid in ids], QUESTION)
    recompute = [ids.index(cid) for cid in report.plan.recompute_chunk_ids]
    with torch.inference_mode():
        prefix = compute_kv(model.step, layout.prefix)
        chunks = [compute_kv(model.step, c, behind=prefix) for c in layout.chunks]
        served = BlendConfig(mode="blend", ratio=report.ratio, selector=SERVED_SELECTOR)  # the server's ranking
        filled = prefill(model.step, layout, served, MemorySource(
            [prefix, *chunks]), len(layout) + 12, recompute=recompute)
        tokens = list(greedy(model.step, filled.cache, filled.length, filled.logits, 12,
                             stop_token_ids(model.tokenizer, model.step.config)))
    assert report.tokens_recomputed == filled.recomputed
    assert list(answer.token_ids) == tokens
