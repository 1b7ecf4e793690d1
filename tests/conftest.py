"""Shared fixtures: tiny random-weight models for unit tests, the real SmolLM2 for integration tests,
and for the retriever and ingestion tests a small BPE tokenizer, a tiny Llama saved as a model folder
that `blend.loader.load` accepts, and the real MiniLM embedder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels (blend/scattered.py) run under Triton's interpreter where there is no GPU, so their tests
# check them on the CPU; decided when a kernel is defined, hence before anything imports blend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from blend.adapter import LlamaStep
from tests.helpers import model


@pytest.fixture(scope="module")
def tiny():
    return LlamaStep(model.tiny_model())


@pytest.fixture(scope="session")
def smol():
    from blend.loader import load

    return load("smollm2-135m", model.CACHE_DIR)


@pytest.fixture(scope="session")
def tokenizer():
    return model.bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the BPE above, saved as a Hugging Face folder (`--model DIR`)."""
    return model.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, len(tokenizer), 1024)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir, tmp_path_factory):
    from blend.loader import load

    return load(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def embedder():
    from retriever.embedder import Embedder

    return Embedder(batch_size=16)
