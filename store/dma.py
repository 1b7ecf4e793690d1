"""Host-to-device block copies issued through the CUDA runtime directly (`cudaMemcpyAsync`), for the request
source's per-layer copies (store.source).

A request from the CPU tier copies ~11 blocks per layer, 32 layers: ~350 copies, each issued on the host while
the request's head (set-up, layer 0, the check layer) is on the critical path. Through PyTorch a copy costs
the host its dispatch plus, for pinned memory, an event the pinned-memory allocator records so the block is
not reused before the copy reads it (5.9 us a block on an H200 host: `python3 -m services.bench.probe_host`,
docs/ops/h200_probe_host_s15b.txt). Here a copy is one runtime call on the raw pointers; the same guarantee
comes from holding the source blocks until an event recorded after their copies has completed (`Holds`), so a
block evicted from its tier mid-copy is never freed, and so never reused, under the copy.

Only plain cases go this way: a contiguous CPU block into a contiguous CUDA view of the same dtype and size;
anything else (and every copy where the runtime library is not found) is left to PyTorch by the caller.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections import deque
from collections.abc import Sequence
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


@lru_cache(maxsize=1)
def _memcpy_async():
    """The runtime's cudaMemcpyAsync, from the libcudart this process already loaded (PyTorch's), else None."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcudart" in line and "/" in line})
    except OSError:
        pass
    names = paths + [name for name in ("libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart"))
                     if name]
    for name in names:
        try:
            function = ctypes.CDLL(name).cudaMemcpyAsync
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        function.restype = ctypes.c_int
        if _copies_right(function):
            return function
        log.warning("dma: cudaMemcpyAsync from %s did not copy a test block exactly; host-to-device copies go "
                    "through PyTorch", name)
        return None
    log.info("dma: no CUDA runtime library found in this process; host-to-device copies go through PyTorch")
    return None


def _copies_right(memcpy) -> bool:
    """Once, before any request's copy: a pinned test block copied through `memcpy` on a side stream lands exactly
    (the library is the process's runtime and the call's arguments are read as meant), else it is not used."""
    try:
        source = torch.arange(4096, dtype=torch.int32).pin_memory()
        target = torch.full((4096,), -1, dtype=torch.int32, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        error = memcpy(target.data_ptr(), source.data_ptr(), source.numel() * 4, _HOST_TO_DEVICE, stream.cuda_stream)
        stream.synchronize()
        return error == 0 and torch.equal(target.cpu(), source)
    except Exception as err:  # noqa: BLE001 - any failure: PyTorch's copies instead, never a failed request
        log.warning("dma: the test copy failed (%s: %s)", type(err).__name__, err)
        return False


def available() -> bool:
    return _memcpy_async() is not None


def copy_async(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], stream: torch.cuda.Stream,
               ) -> list[int]:
    """Enqueue targets[i] <- sources[i] on `stream` (host -> device, no wait); returns the indices not copied
    (not a plain case, or no runtime library): the caller copies those itself. The caller holds `sources`
    until an event recorded on `stream` after this call has completed (`Holds`)."""
    memcpy = _memcpy_async()
    if memcpy is None or stream.device_index != torch.cuda.current_device():
        # (A stream of another device than the current one: PyTorch's copies, which switch devices.)
        return list(range(len(targets)))
    handle = stream.cuda_stream
    left = []
    for index, (target, source) in enumerate(zip(targets, sources)):
        # The plain case's checks in the fewest tensor calls (a layer issues ~11 blocks on the request's host-bound
        # path): `is_cpu`/`is_cuda` make no device object; one `nbytes` with the dtype check stands for the numel
        # and element size checks.
        size = source.nbytes
        if (not source.is_cpu or not target.is_cuda or target.nbytes != size or source.dtype != target.dtype
                or not source.is_contiguous() or not target.is_contiguous()):
            left.append(index)
            continue
        error = memcpy(target.data_ptr(), source.data_ptr(), size, _HOST_TO_DEVICE, handle)
        if error:
            raise RuntimeError(f"cudaMemcpyAsync of a {tuple(source.shape)} block failed with CUDA error {error}")
    return left


class Holds:
    """Source blocks of issued copies, each batch kept until the event recorded after it has completed."""

    # Batches of sources whose holder closed before their copies were known to be done (module-wide, any thread).
    _orphans: deque = deque()
    _orphans_lock = threading.Lock()

    def __init__(self):
        self._held: deque = deque()  # one holder per request source, used by one thread

    def add(self, event: torch.cuda.Event, blocks: Sequence[torch.Tensor]) -> None:
        if blocks:
            self._held.append((event, list(blocks)))

    def release_done(self) -> None:
        """Drop the batches whose copies have completed (oldest first; one event query each, stopping at the
        first still running), this holder's and any closed holder's."""
        _release(self._held)
        if Holds._orphans:
            with Holds._orphans_lock:
                _release(Holds._orphans)

    def release_all(self) -> None:
        """After a synchronize that covered every copy of this holder: drop them (and any closed holder's done)."""
        self._held.clear()
        self.release_done()

    def close(self) -> None:
        """The holder is going away with copies possibly in flight: their blocks wait module-wide instead."""
        if self._held:
            with Holds._orphans_lock:
                Holds._orphans.extend(self._held)
            self._held.clear()


def _release(held: deque) -> None:
    while held and held[0][0].query():
        held.popleft()
