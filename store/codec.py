"""Bytes for what leaves process memory (Redis, disk): a small checked header, then the tensor.

    offset  size       field
    0       4          magic b"KVBL"
    4       2          codec version (FORMAT_VERSION)
    6       1          flags: bit 0 = int8 quantized, bit 1 = MAC present
    7       1          dtype code of the tensor as stored by the caller (DTYPE_CODES)
    8       1          ndim
    9       4 * ndim   shape, uint32 each
    ..      8          payload length in bytes
    ..      4          crc32 of everything before it and of the payload
    ..      32         only with the MAC flag: hmac-sha256(secret, entry key, everything before it, payload)
    ..      payload    raw little-endian elements; quantized: float32 scales [*shape[:-1]], then int8 [*shape]

All integers little-endian. A value whose magic, version, lengths or checksum do not match raises
`CorruptEntry`; the store treats that as a miss and deletes the value, so a flipped byte or a
truncated write is never returned as K/V.

The crc catches damage; the MAC catches forgery. With a server `secret`, `encode` adds the MAC and
`decode` requires it (checking it instead of the crc, which it subsumes): a value written by someone
without the secret, or copied from another entry key (keys are content addresses), is `CorruptEntry`.
Without a secret the MAC, if present, is skipped and the crc checked as before.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"KVBL"
# One version for the K/V layout ([T, 2, kv_heads, head_dim] per layer) and for these bytes; it is
# part of every chunk key, so a bump leaves old entries unreachable instead of misread.
FORMAT_VERSION = 1
QUANTIZED = 1
MACED = 2
MAC_SIZE = 32

DTYPE_CODES = {
    torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4, torch.int8: 5, torch.uint8: 6,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_NDIM = 8

_FIXED = struct.Struct("<4sHBBB")
_TAIL = struct.Struct("<QI")
FIXED_SIZE = _FIXED.size  # bytes of a header that give its whole size (`header_size`)


class CorruptEntry(ValueError):
    """A stored value that fails its header, checksum or MAC check."""


def _mac_of(secret: bytes, key: str, *parts) -> hmac.HMAC:
    # The key is length-prefixed so (key, bytes) pairs cannot run into each other; parts are buffers
    # (memoryview, numpy), hashed in place: hashlib reads them without a copy and releases the GIL.
    key_bytes = key.encode()
    mac = hmac.new(secret, struct.pack("<I", len(key_bytes)) + key_bytes, hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac


def _mac(secret: bytes, key: str, *parts) -> bytes:
    return _mac_of(secret, key, *parts).digest()


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    # A uint8 view shares memory with the tensor, so the only copy is the final join.
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 over the last dim (per token, per k/v, per head for a [T, 2, H, D] block).

    Each element is off by at most half a step, absmax / 254, of its own row.
    """
    values = tensor.detach().cpu().float()
    scales = values.abs().amax(dim=-1, keepdim=True) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
    codes = torch.round(values / scales).clamp_(-127, 127).to(torch.int8)
    return codes, scales.squeeze(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def encode(tensor: torch.Tensor, quantize_floats: bool = False, secret: bytes | None = None,
           key: str = "") -> bytes:
    """The value's bytes; with `secret`, authenticated for entry `key` (decode must be given both)."""
    if tensor.dtype not in DTYPE_CODES:
        supported = ", ".join(map(str, DTYPE_CODES))
        raise ValueError(f"cannot encode dtype {tensor.dtype} (supported: {supported})")
    if tensor.dim() > MAX_NDIM or tensor.dim() == 0:
        raise ValueError(f"cannot encode a tensor of {tensor.dim()} dims (1 to {MAX_NDIM})")
    if quantize_floats and tensor.is_floating_point() and tensor.numel():
        codes, scales = quantize(tensor)
        parts, flags = [_bytes_of(scales), _bytes_of(codes)], QUANTIZED
    else:
        parts, flags = [_bytes_of(tensor)], 0
    if secret is not None:
        flags |= MACED
    length = sum(part.nbytes for part in parts)
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, DTYPE_CODES[tensor.dtype], tensor.dim())
    head += struct.pack(f"<{tensor.dim()}I", *tensor.shape) + struct.pack("<Q", length)
    crc = zlib.crc32(head)
    for part in parts:
        crc = zlib.crc32(part, crc)
    head += struct.pack("<I", crc)
    if secret is not None:
        head += _mac(secret, key, head, *parts)
    return b"".join([head, *parts])


@dataclass(frozen=True)
class Header:
    """A value's header, parsed and checked for sense (not yet against the payload)."""

    flags: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    length: int  # payload bytes
    crc: int
    size: int  # header bytes, MAC included: the payload starts here

    @property
    def mac_at(self) -> int:
        return self.size - (MAC_SIZE if self.flags & MACED else 0)


def header_size(fixed: bytes | bytearray | memoryview) -> int:
    """The whole header's size from its first `FIXED_SIZE` bytes (a reader that streams a value needs
    it before the rest arrives); CorruptEntry if those bytes are no header."""
    magic, version, flags, code, ndim = _FIXED.unpack_from(fixed)
    if magic != MAGIC:
        raise CorruptEntry(f"magic {bytes(magic)!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"codec version {version}, this build reads {FORMAT_VERSION}")
    if code not in CODE_DTYPES or not 0 < ndim <= MAX_NDIM or flags & ~(QUANTIZED | MACED):
        raise CorruptEntry(f"bad header fields: dtype code {code}, ndim {ndim}, flags {flags:#x}")
    return _FIXED.size + 4 * ndim + _TAIL.size + (MAC_SIZE if flags & MACED else 0)


def read_header(view: memoryview, value_size: int) -> Header:
    """The header at the start of `view` (which holds at least all of it), for a value of `value_size`
    bytes; CorruptEntry if it does not describe a payload of exactly the bytes that follow it."""
    if len(view) < _FIXED.size:
        raise CorruptEntry(f"value of {len(view)} bytes is shorter than the {_FIXED.size}-byte header")
    size = header_size(view)
    if len(view) < size:
        raise CorruptEntry(f"value of {len(view)} bytes is shorter than its {size}-byte header")
    _, _, flags, code, ndim = _FIXED.unpack_from(view)
    shape = struct.unpack_from(f"<{ndim}I", view, _FIXED.size)
    length, crc = _TAIL.unpack_from(view, _FIXED.size + 4 * ndim)
    if value_size - size != length:
        raise CorruptEntry(f"payload is {value_size - size} bytes, header says {length} (truncated?)")
    dtype = CODE_DTYPES[code]
    elements = int(np.prod(shape))
    if flags & QUANTIZED:
        expected = 4 * (elements // shape[-1] if shape[-1] else 0) + elements
    else:
        expected = elements * torch.empty((), dtype=dtype).element_size()
    if expected != length:
        raise CorruptEntry(f"payload of {length} bytes does not fit shape {list(shape)} of {dtype}")
    return Header(flags, dtype, tuple(shape), length, crc, size)


class Check:
    """The crc of a value's payload, or with `secret` its MAC for entry `key`, fed piece by piece: a
    reader can check each piece just received while it is still in cache (twice as fast as a second
    pass over the whole value on a machine short of memory bandwidth)."""

    def __init__(self, header: Header, head: memoryview, secret: bytes | None = None, key: str = ""):
        self.header = header
        if secret is not None:
            if not header.flags & MACED:
                raise CorruptEntry("no MAC, and this store requires one (written without the secret?)")
            self._mac = _mac_of(secret, key, head[: header.mac_at])
            self._want = bytes(head[header.mac_at : header.size])
            self._key = key
        else:
            self._mac = None
            self._crc = zlib.crc32(head[: header.mac_at - 4])

    def update(self, piece) -> None:
        if self._mac is not None:
            self._mac.update(piece)
        else:
            self._crc = zlib.crc32(piece, self._crc)

    def verify(self) -> None:
        """CorruptEntry unless the pieces fed were the payload the header was written with."""
        if self._mac is not None:
            if not hmac.compare_digest(self._mac.digest(), self._want):
                raise CorruptEntry(f"MAC mismatch for entry {self._key!r} (forged, copied from another key, "
                                   "or written with another secret)")
        elif self._crc != self.header.crc:
            raise CorruptEntry("checksum mismatch")


def verify(header: Header, head: memoryview, payload, secret: bytes | None = None, key: str = "") -> None:
    """CorruptEntry unless `payload` (any buffer) is what `head` (the header's bytes) was written with:
    its crc, or with `secret` its MAC for entry `key`."""
    check = Check(header, head, secret, key)
    check.update(payload)
    check.verify()


def tensor_of(header: Header, raw: torch.Tensor) -> torch.Tensor:
    """The tensor a verified payload holds; `raw` is its uint8 bytes, owned (a plain payload's tensor
    is a view of them, no copy)."""
    if not header.flags & QUANTIZED:
        return raw.view(header.dtype).reshape(header.shape)
    shape = header.shape
    n_scales = header.length // (shape[-1] + 4) if shape[-1] else 0  # int8 per element, a float32 per row
    scales = raw[: 4 * n_scales].view(torch.float32).reshape(shape[:-1])
    codes = raw[4 * n_scales :].view(torch.int8).reshape(shape)
    return dequantize(codes, scales, header.dtype)


def decode(value: bytes | bytearray | memoryview, secret: bytes | None = None, key: str = "") -> torch.Tensor:
    """The tensor `encode` was given (dequantized if it was stored as int8); CorruptEntry if damaged,
    or, with `secret`, if it lacks a MAC or its MAC does not match entry `key`."""
    view = memoryview(value)
    header = read_header(view, len(view))
    verify(header, view, view[header.size :], secret, key)
    # copy() makes the buffer writable and owned, so the tensor never aliases Redis's or a file's bytes.
    raw = torch.from_numpy(np.frombuffer(view, dtype=np.uint8, count=header.length, offset=header.size).copy())
    return tensor_of(header, raw)
