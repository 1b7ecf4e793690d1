"""Batch reads from one Redis server at the wire's speed: pipelined GETs over a few plain sockets,
each value received straight into the tensor that is returned, then verified in place.

redis-py's pure-Python reply parser moves a 2 MiB value through 64 KiB `bytes` pieces, a BytesIO and
a final `bytes` before the codec copies it once more (~0.5 GB/s on a 2-core machine). Here a value's
header is read into a small scratch buffer and its payload with `recv_into` directly into a fresh
uint8 tensor (pinned when asked, so the copy to the GPU is one asynchronous DMA); the crc or MAC is
then checked on those bytes and the tensor is a view of them. Socket reads and crc32 release the
GIL, so a request's keys are split over `connections` sockets read on as many threads.

Only what a batch read needs is spoken: AUTH, SELECT, GET, in RESP2. A damaged value is returned as
its `CorruptEntry` (the rest of the reply is still read, so the connection stays in step). A socket
error or timeout closes that connection and raises (the caller turns it into an outage); a call on a
connection that had sat in the pool is tried once more on a fresh one, as after a server restart.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import redis
import torch
from redis.connection import UnixDomainSocketConnection, parse_url

from store import codec

Value = torch.Tensor | None | codec.CorruptEntry
_LINE_MAX = 64 * 1024  # an error line or a length line is far shorter
_PIECE = 256 * 1024  # received, then checked at once: fits in L2 on the machines measured


def supports(url: str) -> bool:
    """Plain TCP or unix-socket URLs; TLS (rediss://) is left to redis-py."""
    return url.startswith(("redis://", "unix://"))


class _Conn:
    """One socket to the server, with the little read-ahead that line reads leave behind."""

    def __init__(self, options: dict, timeout_s: float):
        if options.get("connection_class") is UnixDomainSocketConnection:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(options["path"])
        else:
            sock = socket.create_connection((options.get("host", "localhost"), options.get("port", 6379)),
                                            timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._ahead = bytearray()
        try:
            if options.get("password") is not None:
                auth = [options["username"]] if options.get("username") else []
                self.command("AUTH", *auth, options["password"])
            if options.get("db"):
                self.command("SELECT", str(options["db"]))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def send(self, *args: str | bytes) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))

    def command(self, *args: str) -> bytes:
        self.send(*args)
        line = self.line()
        if line[:1] == b"-":
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        return line

    def line(self) -> bytes:
        while True:
            end = self._ahead.find(b"\r\n")
            if end >= 0:
                line = bytes(self._ahead[:end])
                del self._ahead[: end + 2]
                return line
            if len(self._ahead) > _LINE_MAX:
                raise redis.ConnectionError("reply line too long: the connection is out of step")
            # Small reads: whatever comes after the line is a value's first bytes, copied once from here.
            data = self.sock.recv(256)
            if not data:
                raise redis.ConnectionError("Redis closed the connection")
            self._ahead += data

    def read_into(self, view: memoryview) -> None:
        """Exactly len(view) bytes into `view`."""
        got = min(len(self._ahead), len(view))
        if got:
            view[:got] = self._ahead[:got]
            del self._ahead[:got]
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise redis.ConnectionError("Redis closed the connection mid-value")
            got += n

    def skip(self, count: int) -> None:
        scratch = memoryview(bytearray(min(count, 1 << 20)))
        while count:
            step = min(count, len(scratch))
            self.read_into(scratch[:step])
            count -= step


def _length(line: bytes) -> int:
    try:
        return int(line[1:])
    except ValueError:
        raise redis.ConnectionError(f"unexpected reply {line[:40]!r}: the connection is out of step") from None


def _read_value(conn: _Conn, size: int, key: str, secret: bytes | None, pin: bool) -> Value:
    """One bulk value of `size` bytes (its length line already read), and the CRLF after it."""
    head = bytearray(codec.FIXED_SIZE)
    read = 0
    try:
        if size < codec.FIXED_SIZE:
            raise codec.CorruptEntry(f"value of {size} bytes is shorter than the {codec.FIXED_SIZE}-byte header")
        conn.read_into(memoryview(head))
        read = len(head)
        head_size = codec.header_size(head)
        if size < head_size:
            raise codec.CorruptEntry(f"value of {size} bytes is shorter than its {head_size}-byte header")
        head += bytes(head_size - len(head))
        conn.read_into(memoryview(head)[read:])
        read = head_size
        header = codec.read_header(memoryview(head), size)
        check = codec.Check(header, memoryview(head), secret, key)
        raw = torch.empty(header.length, dtype=torch.uint8, pin_memory=pin)
        payload = memoryview(raw.numpy())
        for at in range(0, header.length, _PIECE):
            piece = payload[at : at + _PIECE]
            conn.read_into(piece)
            read += len(piece)
            check.update(piece)  # while the piece is still in cache
        check.verify()
        value: Value = codec.tensor_of(header, raw)
    except codec.CorruptEntry as err:
        conn.skip(size - read)  # keep the connection in step with the reply
        value = err
    conn.skip(2)
    return value


def _gets(conn: _Conn, names: Sequence[bytes], keys: Sequence[str], secret: bytes | None,
          pin: bool) -> list[Value]:
    """GET of each name, pipelined two deep: the next request is queued at the server while this reply
    is read, and the server never holds more than two values' replies for this connection (an MGET
    of many 2 MiB values builds all of them in server memory first, which costs it more CPU)."""
    conn.send(b"GET", names[0])
    values: list[Value] = []
    refused = None
    for index, key in enumerate(keys):
        if index + 1 < len(names):
            conn.send(b"GET", names[index + 1])
        line = conn.line()
        if line[:1] == b"-":  # e.g. WRONGTYPE: the rest is still read, to stay in step
            refused = refused or redis.ResponseError(line[1:].decode(errors="replace"))
            values.append(None)
            continue
        if line[:1] != b"$":
            raise redis.ConnectionError(f"unexpected value reply {line[:40]!r}: the connection is out of step")
        size = _length(line)
        values.append(None if size < 0 else _read_value(conn, size, key, secret, pin))
    if refused is not None:
        raise refused
    return values


class WireReader:
    """GETs of entry keys, pipelined, over up to `connections` sockets; a value's payload received in place."""

    def __init__(self, url: str, prefix: str, timeout_s: float = 1.0, connections: int = 2,
                 secret: bytes | None = None, pin: bool = False):
        self._options = parse_url(url)
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.connections = max(1, connections)
        self._secret = secret
        self.pin = pin
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.connections - 1, thread_name_prefix="kv-redis") \
            if self.connections > 1 else None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _batch(self, keys: Sequence[str]) -> list[Value]:
        names = [(self.prefix + key).encode() for key in keys]
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            if fresh:
                conn = _Conn(self._options, self.timeout_s)
            try:
                values = _gets(conn, names, keys, self._secret, self.pin)
            except (OSError, redis.ConnectionError):
                conn.close()
                if fresh or attempt:
                    raise
                continue  # a pooled connection the server has since closed: once more on a fresh one
            except BaseException:
                conn.close()
                raise
            with self._lock:
                self._idle.append(conn)
            return values
        raise AssertionError("unreachable")

    def get_many(self, keys: Sequence[str]) -> list[Value]:
        """Each key's tensor, None (absent) or CorruptEntry, in order; raises on a connection failure."""
        if not keys:
            return []
        parts = min(self.connections, len(keys))
        if parts == 1:
            return self._batch(keys)
        bounds = [len(keys) * part // parts for part in range(parts + 1)]
        groups = [keys[bounds[i] : bounds[i + 1]] for i in range(parts)]
        futures = [self._pool.submit(self._batch, group) for group in groups[1:]]
        first = self._batch(groups[0])  # the caller's thread reads one share itself
        return first + [value for future in futures for value in future.result()]
