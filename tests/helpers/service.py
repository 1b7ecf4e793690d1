"""Helpers for the end-to-end service tests: a tiny model folder, a `kvblend serve` subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import redis

from services.bench import launch
from services.client import Client
from tests.helpers.kv import REDIS_URL
from tests.helpers.model import CACHE_DIR, save_tiny_llama

CONTEXT = 1024  # the tiny model's context: small, so a prompt over it is cheap to build

DOCUMENTS = [
    {"title": "Paris", "doc_id": "paris",
     "text": "Paris is the capital of France. The Seine flows through the city from east to west."},
    {"title": "Everest", "doc_id": "everest",
     "text": "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level."},
    {"title": "Jazz", "doc_id": "jazz",
     "text": "Jazz grew in New Orleans from blues, ragtime and brass band music early in the 1900s."},
    {"title": "Photosynthesis", "doc_id": "photo",
     "text": "Plants turn light, water and carbon dioxide into sugar and oxygen by photosynthesis."},
]


def make_tiny_model(folder: Path) -> Path:
    """A 2-layer random-weight Llama with the real SmolLM2 tokenizer (and chat template)."""
    from transformers import AutoTokenizer

    from blend.loader import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m", CACHE_DIR))
    return save_tiny_llama(folder, tokenizer, 49152, CONTEXT)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerProcess(launch.ServerProcess):
    """`python -m services.commands.cli serve` on a free port with a config file, as a user starts it."""

    def __init__(self, folder: Path, model_dir: Path, config: dict, flags: tuple[str, ...] = ()):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        config_file = write_config(folder / "serve.toml", config)
        args = ["--model", str(model_dir), "--data-dir", str(folder / "data"), "--cache-dir", str(CACHE_DIR),
                "--config", str(config_file), *flags]
        super().__init__(args, folder / "server.err", start_timeout=180)

    def client(self, **kwargs) -> Client:
        return Client(kwargs.pop("target", self.target), **kwargs)


def redis_prefix_keys(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()


def delete_redis_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """Run `call()` expecting an RpcError; its (code, details)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    raise AssertionError("the call succeeded")
