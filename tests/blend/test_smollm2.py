"""Integration: the embedded SmolLM2-135M through the per-layer step, and the `kvblend` CLI."""

import subprocess
import sys

import pytest
import torch

from blend.decode import greedy, stop_token_ids
from blend.prompt import build_layout

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]


def test_full_prefill_logits_match_hf_forward_float32(smol):
    layout = build_layout(smol.tokenizer, [], PROMPTS[0], system=None)
    ids = torch.tensor(layout.token_ids)
    with torch.inference_mode():
        reference = smol.step.hf(ids[None], use_cache=False).logits[0]
        ours = smol.step.forward(ids, torch.arange(len(ids)), smol.step.new_cache(len(ids)))
    assert (ours - reference).abs().max() < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_decode_matches_generate_token_for_token(smol, prompt):
    layout = build_layout(smol.tokenizer, [], prompt, system=None)
    ids = torch.tensor(layout.token_ids)
    n, new = len(ids), 24
    stops = stop_token_ids(smol.tokenizer, smol.step.config)
    with torch.inference_mode():
        expected = smol.step.hf.generate(ids[None], attention_mask=torch.ones(1, n, dtype=torch.long),
                                         max_new_tokens=new, do_sample=False)[0, n:].tolist()
        cache = smol.step.new_cache(n + new)
        logits = smol.step.forward(ids, torch.arange(n), cache)[-1]
        ours = list(greedy(smol.step, cache, n, logits, new, stops))
    # generate() emits the stop token and ends; greedy() ends without emitting it.
    cut = next((i for i, token in enumerate(expected) if token in stops), len(expected))
    assert len(ours) > 0
    assert ours == expected[:cut]


def _kvblend(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "services.commands.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_generate_answers_paris(smol):
    result = _kvblend("generate", "--prompt", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.parametrize("spec", ["no-such-model", "/no/such/file.gguf", "."])
def test_bad_model_spec_is_one_clear_error(spec):
    result = _kvblend("generate", "--prompt", "hi", "--model", spec, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert repr(spec) in result.stderr and "accepted" in result.stderr
