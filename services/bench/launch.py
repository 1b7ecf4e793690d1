"""Start `kvblend serve` as a child process and wait until it listens (for the demo, the benchmark and
the end-to-end tests): it is run exactly as a user runs it, on a free port it reports."""

from __future__ import annotations

import json

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, args: list[str], stderr_path: Path, start_timeout: float = 300.0):
        """`args` follow `kvblend serve`; `--port 0` is added unless a port is given."""
        if "--port" not in args:
            args = ["--port", "0", *args]
        self.stderr_path = stderr_path
        command = [sys.executable, "-m", "services.commands.cli", "serve", *args]
        with open(stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                                            text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_serving(start_timeout)
        self.target = f"127.0.0.1:{self.port}"

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
                self.serving_line = line
                return int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])
        self.process.kill()
        self.process.wait()
        raise RuntimeError(f"kvblend serve did not start; its stderr ends with:\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self, timeout: float = 0.0) -> list[str]:
        """Lines the server printed since the last call (waiting up to `timeout` for each)."""
        lines = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                return lines
            if line is None:
                return lines
            lines.append(line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains in-flight requests), then wait; SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_local_server(folder: Path, model: str, cache_dir: str | None = None,
                       redis_url: str | None = None, server_settings: dict | None = None,
                       store_settings: dict | None = None) -> ServerProcess:
    """`kvblend serve` on a free port with its data under `folder` (the demo's and the benchmark's);
    `server_settings` go into a config file's [server] section (e.g. {"batch_decode": False}) and
    `store_settings` into its [store] section (e.g. {"cpu_bytes": 64 << 20})."""
    args = ["--model", model, "--data-dir", str(folder / "data")]
    sections = {"server": server_settings or {}, "store": store_settings or {}}
    if any(sections.values()):
        lines = []
        for section, values in sections.items():
            lines += [f"[{section}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        (folder / "serve.toml").write_text("\n".join(lines) + "\n")
        args += ["--config", str(folder / "serve.toml")]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    if redis_url:
        args += ["--redis-url", redis_url]
    return ServerProcess(args, folder / "server.err")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server of our own on a free port (for the cluster benchmark and tests), to stop and restart.

    With `folder`, it keeps its data there in an append-only file (fsync every second, and on a clean
    shutdown), so a restart finds what it held; without, it keeps nothing.
    """

    def __init__(self, folder: Path | None = None, *extra_args: str, port: int | None = None):
        import shutil

        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH (install Debian's redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        persistence = ["--appendonly", "no"]
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(folder)]
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     *persistence, "--daemonize", "no", *extra_args]
        self.password = dict(zip(extra_args[::2], extra_args[1::2])).get("--requirepass")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        import redis

        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:
                    pass  # replaying its append-only file
                except redis.ConnectionError:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} exited with "
                                           f"{self.process.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
