"""Helpers for the end-to-end service tests: a tiny model folder, a `kvblend serve` subprocess."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import redis

from services.client import Client

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("KVBLEND_CACHE_DIR", "~/.cache/kvblend")).expanduser()
REDIS_URL = "redis://127.0.0.1:6379/0"
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
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from blend.loader import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m", CACHE_DIR))
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


class ServerProcess:
    """`python -m services.server serve` on a free port, as a user starts it."""

    def __init__(self, folder: Path, model_dir: Path, config: dict, start_timeout: float = 180.0):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        config_file = write_config(folder / "serve.toml", config)
        self.stderr_path = folder / "server.err"
        command = [sys.executable, "-m", "services.server", "serve", "--port", "0", "--model", str(model_dir),
                   "--data-dir", str(folder / "data"), "--cache-dir", str(CACHE_DIR), "--config", str(config_file)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"),
                                        text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_serving(start_timeout)
        self.host = "127.0.0.1"
        self.target = f"{self.host}:{self.port}"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_serving(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            if "kvblend: serving" in line:
                return int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])
        self.process.kill()
        raise RuntimeError(f"the server did not start: {self.stderr()[-3000:]}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self, timeout: float = 0.0) -> list[str]:
        lines = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                return lines
            if line is None:
                return lines
            lines.append(line)

    def client(self, **kwargs) -> Client:
        client = Client(kwargs.pop("target", self.target), **kwargs)
        return client

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


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
