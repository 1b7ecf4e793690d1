"""Host-to-device block copies issued through the CUDA runtime directly (`cudaMemcpyAsync`), for the request
source's per-layer copies (store.source).

A request from the CPU tier copies ~11 blocks per layer, 32 layers: ~350 copies, each issued on the host while
the request's head (set-up, layer 0, the check layer) is on the critical path. Through PyTorch a copy costs
the host its dispatch plus, for pinned memory, an event the pinned-memory allocator records so the block is
not reused before the copy reads it (5.9 us a block on an H200 host: `python3 -m services.bench.probe_host`,
docs/ops/h200_probe_host_s15b.txt). Here a layer's copies are one runtime call on the raw pointers
(`cudaMemcpyBatchAsync`, CUDA 12.8 on; else one `cudaMemcpyAsync` a block); the same guarantee
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
_batch_refused = False  # a batch call was refused once: a copy a call from then on


@lru_cache(maxsize=1)
def _runtime() -> tuple[ctypes.CDLL | None, str]:
    """The libcudart this process already loaded (PyTorch's) and its name, else (None, "")."""
    if not torch.cuda.is_available():
        return None, ""
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
            library = ctypes.CDLL(name)
            library.cudaMemcpyAsync  # noqa: B018 - a CUDA runtime, or not
        except (OSError, AttributeError):
            continue
        return library, name
    return None, ""


@lru_cache(maxsize=1)
def _memcpy_async():
    """The runtime's cudaMemcpyAsync, else None."""
    library, name = _runtime()
    if library is None:
        if torch.cuda.is_available():
            log.info("dma: no CUDA runtime library found in this process; host-to-device copies go through PyTorch")
        return None
    function = library.cudaMemcpyAsync
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    function.restype = ctypes.c_int
    if _copies_right(lambda targets, sources, stream: _each(function, targets, sources, stream)):
        return function
    log.warning("dma: cudaMemcpyAsync from %s did not copy a test block exactly; host-to-device copies go "
                "through PyTorch", name)
    return None


class _Location(ctypes.Structure):  # cudaMemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):  # cudaMemcpyAttributes
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _Location), ("dstLocHint", _Location),
                ("flags", ctypes.c_uint)]


_STREAM_ORDER = 1  # cudaMemcpySrcAccessOrderStream: the sources are read in stream order, as cudaMemcpyAsync reads them


def bind_batch(function, version: int):
    """`cudaMemcpyBatchAsync` (CUDA 12.8 on) as `batch(targets, sources, sizes, stream handle) -> error`, the
    pointers and sizes as Python ints, every copy with one attribute (sources read in stream order). Its signature
    changed in CUDA 13.0 (the `failIdx` out-argument before the stream went), so the runtime's version picks it;
    None before 12.8. `batch.arrays(targets, sources, sizes)` builds a call's argument arrays once and
    `batch.call(arrays, stream handle)` issues them (a copy plan made ahead of its layer, `Prepared`)."""
    if version < 12080:
        return None
    function.restype = ctypes.c_int
    attributes = _Attributes(_STREAM_ORDER, _Location(0, 0), _Location(0, 0), 0)
    first = (ctypes.c_size_t * 1)(0)  # the attribute applies from the first copy on
    one, failed = ctypes.c_size_t(1), ctypes.c_size_t(0)
    types: dict[int, tuple] = {}  # copy count -> (pointer array type, size array type)

    def arrays(targets: Sequence[int], sources: Sequence[int], sizes: Sequence[int]) -> tuple:
        count = len(targets)
        kinds = types.get(count)
        if kinds is None:
            kinds = types[count] = (ctypes.c_void_p * count, ctypes.c_size_t * count)
        pointers, lengths = kinds
        return pointers(*targets), pointers(*sources), lengths(*sizes), ctypes.c_size_t(count)

    def call(args: tuple, stream: int) -> int:
        if version >= 13000:
            return function(*args, ctypes.byref(attributes), first, one, ctypes.c_void_p(stream))
        return function(*args, ctypes.byref(attributes), first, one, ctypes.byref(failed), ctypes.c_void_p(stream))

    def batch(targets: Sequence[int], sources: Sequence[int], sizes: Sequence[int], stream: int) -> int:
        return call(arrays(targets, sources, sizes), stream)

    batch.arrays, batch.call = arrays, call
    return batch


@lru_cache(maxsize=1)
def _memcpy_batch():
    """The runtime's cudaMemcpyBatchAsync bound by `bind_batch`, if the runtime has it and a test batch lands
    exactly (pinned blocks of different sizes), else None: one call issues a layer's ~11
    copies (the bare batch call 28.1 us of host time a layer on an H200 host, against 77.7 us for `copy_async`
    issuing a call a block with its checks, `python3 -m services.bench.probe_batch_copy`,
    docs/ops/h200_probe_batch_copy_s18b.txt; a request showed no difference, s18c in docs/gpu.md)."""
    library, name = _runtime()
    if library is None or _memcpy_async() is None:
        return None
    version = ctypes.c_int(0)
    try:
        function = library.cudaMemcpyBatchAsync
        if library.cudaRuntimeGetVersion(ctypes.byref(version)) != 0:
            return None
    except AttributeError:
        return None
    batch = bind_batch(function, version.value)
    if batch is None:
        return None
    # Pinned blocks, as a request's are (the runtime takes pageable ones too, per its documentation).
    if _copies_right(lambda targets, sources, stream: _batched(batch, targets, sources, stream), pageable=False):
        return batch
    log.warning("dma: cudaMemcpyBatchAsync from %s (runtime %d) did not copy a test batch exactly; a copy a call",
                name, version.value)
    return None


def _copies_right(copy, pageable: bool = True) -> bool:
    """Once, before any request's copy: test blocks of different sizes (pinned, and one pageable with `pageable`)
    copied by `copy(targets, sources, stream handle) -> error` on a side stream land exactly and nothing else is
    written (the library is the process's runtime and the call's arguments are read as meant), else it is not used."""
    try:
        middle = torch.arange(7, 1000, dtype=torch.int32)
        sources = [torch.arange(4096, dtype=torch.int32).pin_memory(), middle if pageable else middle.pin_memory(),
                   (torch.arange(300, dtype=torch.int32) * 3).pin_memory()]
        buffer = torch.full((5500,), -1, dtype=torch.int32, device="cuda")
        targets = [buffer[:4096], buffer[4100:5093], buffer[5100:5400]]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        error = copy(targets, sources, stream.cuda_stream)
        stream.synchronize()  # (also when refused partway: no copy still writes into the buffer once it is freed)
        if error:
            _clear_error()
            return False
        expected = torch.full((5500,), -1, dtype=torch.int32)
        for target, source in zip(targets, sources):
            expected[target.storage_offset() : target.storage_offset() + source.numel()] = source
        return torch.equal(buffer.cpu(), expected)
    except Exception as err:  # noqa: BLE001 - any failure: PyTorch's copies instead, never a failed request
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # (as above: nothing still copying into the freed buffer)
        _clear_error()
        log.warning("dma: the test copy failed (%s: %s)", type(err).__name__, err)
        return False


def _clear_error() -> None:
    """Take a refused call's error off the runtime's last-error slot of this thread: PyTorch's next launch check
    (cudaGetLastError) would otherwise raise it as its own."""
    library = _runtime()[0]
    if library is not None:
        library.cudaGetLastError()


def available() -> bool:
    return _memcpy_async() is not None


def batched() -> bool:
    """Whether a layer's copies go as one cudaMemcpyBatchAsync (checked once, at the first call)."""
    return _memcpy_batch() is not None


def copy_async(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], stream: torch.cuda.Stream,
               ) -> list[int]:
    """Enqueue targets[i] <- sources[i] on `stream` (host -> device, no wait); returns the indices not copied
    (not a plain case, or no runtime library): the caller copies those itself. The caller holds `sources`
    until an event recorded on `stream` after this call has completed (`Holds`)."""
    if _memcpy_async() is None or stream.device_index != torch.cuda.current_device():
        # (A stream of another device than the current one: PyTorch's copies, which switch devices.)
        return list(range(len(targets)))
    left, to, since, sizes = [], [], [], []
    for index, (target, source) in enumerate(zip(targets, sources)):
        # The plain case's checks in the fewest tensor calls (a layer issues ~11 blocks on the request's host-bound
        # path): `is_cpu`/`is_cuda` make no device object; one `nbytes` with the dtype check stands for the numel
        # and element size checks.
        if (not source.is_cpu or not target.is_cuda or target.nbytes != source.nbytes or source.dtype != target.dtype
                or not source.is_contiguous() or not target.is_contiguous()):
            left.append(index)
            continue
        to.append(target.data_ptr())
        since.append(source.data_ptr())
        sizes.append(source.nbytes)
    if to:
        Prepared(to, since, sizes).issue(stream)  # one batch call where the runtime has it
    return left


class Prepared:
    """Host-to-device copies checked and laid out once, ahead of their turn: raw pointers and sizes, the batch call's
    argument arrays built. `issue(stream)` enqueues them as one cudaMemcpyBatchAsync where the runtime has it, else a
    cudaMemcpyAsync a copy: no tensor touched on the issuing path (a request's source prepares a few layers' copies
    in one pass and issues each when its turn comes). The caller checked every copy plain (`copy_async`'s case: a
    contiguous host block into a contiguous device view of its dtype and size), made sure `available()` and that
    the stream is of the current device, and holds the source blocks until an event recorded after `issue` is done."""

    __slots__ = ("targets", "sources", "sizes", "nbytes", "_args")

    def __init__(self, targets: Sequence[int], sources: Sequence[int], sizes: Sequence[int]):
        self.targets, self.sources, self.sizes = list(targets), list(sources), list(sizes)
        self.nbytes = sum(self.sizes)
        batch = _memcpy_batch() if len(self.targets) > 1 and not _batch_refused else None
        self._args = batch.arrays(self.targets, self.sources, self.sizes) if batch is not None else None

    def issue(self, stream: torch.cuda.Stream) -> None:
        global _batch_refused
        handle = stream.cuda_stream
        # (Not on the legacy default stream, handle 0, which the batch call does not take.)
        batch = _memcpy_batch() if self._args is not None and handle and not _batch_refused else None
        if batch is not None:
            if not batch.call(self._args, handle):
                return
            # A batch the runtime refused: its error taken off the last-error slot, the copies issued one a call (each
            # copy is idempotent: any the batch did issue are written twice, in stream order, with the same bytes),
            # and no batch again in this process (a refusal for a lasting reason would cost every layer a call).
            _clear_error()
            _batch_refused = True
            log.warning("dma: cudaMemcpyBatchAsync refused a layer's copies; a copy a call from now on")
        memcpy = _memcpy_async()
        for target, source, size in zip(self.targets, self.sources, self.sizes):
            error = memcpy(target, source, size, _HOST_TO_DEVICE, handle)
            if error:
                _clear_error()  # (else PyTorch's next launch check raises it as its own)
                stream.synchronize()  # the copies queued before it: done before the caller lets their blocks go
                raise RuntimeError(f"cudaMemcpyAsync of a {size}-byte block failed with CUDA error {error}")


def _batched(batch, targets, sources, handle: int) -> int:
    return batch([t.data_ptr() for t in targets], [s.data_ptr() for s in sources], [s.nbytes for s in sources], handle)


def _each(memcpy, targets, sources, handle: int) -> int:
    """One cudaMemcpyAsync a block (the start-up test copy); the first error."""
    for target, source in zip(targets, sources):
        error = memcpy(target.data_ptr(), source.data_ptr(), source.nbytes, _HOST_TO_DEVICE, handle)
        if error:
            return error
    return 0


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
