"""Start `kvblend serve` as a child process and wait until it listens (for the demo, the benchmark and
the end-to-end tests): it is run exactly as a user runs it, on a free port it reports."""

from __future__ import annotations

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
        command = [sys.executable, "-m", "services.cli", "serve", *args]
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
                       redis_url: str | None = None) -> ServerProcess:
    """`kvblend serve` on a free port with its data under `folder` (the demo's and the benchmark's)."""
    args = ["--model", model, "--data-dir", str(folder / "data")]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    if redis_url:
        args += ["--redis-url", redis_url]
    return ServerProcess(args, folder / "server.err")
