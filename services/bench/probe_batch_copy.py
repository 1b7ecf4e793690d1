"""Probe (not a result): one layer's host-to-device copies (11 pinned 2 MB blocks, the 8B shape's 10 chunks and the
prefix) issued as one `cudaMemcpyBatchAsync` (CUDA 12.8+) against the served 11 `cudaMemcpyAsync` calls
(`store.dma.copy_async`) and PyTorch's `_foreach_copy_`: the host microseconds a layer, and whether the batch lands
exactly. Run it in its own process (`python3 -m services.bench.probe_batch_copy`): the batch call is bound by hand
through ctypes, and its signature changed in CUDA 13.0 (no `failIdx`); a wrong binding may crash the process.

The request's head is bound by its host time on an H200 (docs/gpu.md), and a layer's copy issue is ~0.2 ms of a later
layer's ~0.4 ms; this says whether a batched issue is worth building into `store.dma`.
"""
from __future__ import annotations

import ctypes

import torch

from services.bench.gpu import host_us
from store import dma

BLOCKS = 11
STREAM_ORDER = 1  # cudaMemcpySrcAccessOrderStream


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):  # cudaMemcpyAttributes
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _Location), ("dstLocHint", _Location),
                ("flags", ctypes.c_uint)]


def _runtime() -> tuple[ctypes.CDLL, int]:
    memcpy = dma._memcpy_async()
    if memcpy is None:
        raise SystemExit("no CUDA runtime bound by store.dma")
    with open("/proc/self/maps") as maps:
        path = sorted({line.split()[-1] for line in maps if "libcudart" in line and "/" in line})[0]
    runtime = ctypes.CDLL(path)
    version = ctypes.c_int()
    runtime.cudaRuntimeGetVersion(ctypes.byref(version))
    return runtime, version.value


def _batch(runtime: ctypes.CDLL, version: int):
    """targets, sources, stream -> error code, through cudaMemcpyBatchAsync as this runtime declares it."""
    function = runtime.cudaMemcpyBatchAsync
    function.restype = ctypes.c_int
    attributes = _Attributes(STREAM_ORDER, _Location(0, 0), _Location(0, 0), 0)
    first = (ctypes.c_size_t * 1)(0)
    failed = ctypes.c_size_t(0)
    pointers = ctypes.c_void_p * BLOCKS
    sizes_type = ctypes.c_size_t * BLOCKS

    def call(targets, sources, stream) -> int:
        dsts = pointers(*[t.data_ptr() for t in targets])
        srcs = pointers(*[s.data_ptr() for s in sources])
        sizes = sizes_type(*[s.nbytes for s in sources])
        if version >= 13000:  # (dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream)
            return function(dsts, srcs, sizes, ctypes.c_size_t(len(targets)), ctypes.byref(attributes), first,
                            ctypes.c_size_t(1), ctypes.c_void_p(stream.cuda_stream))
        return function(dsts, srcs, sizes, ctypes.c_size_t(len(targets)), ctypes.byref(attributes), first,
                        ctypes.c_size_t(1), ctypes.byref(failed), ctypes.c_void_p(stream.cuda_stream))
    return call


def main() -> None:
    runtime, version = _runtime()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA runtime {version}")
    if version < 12080:
        raise SystemExit("cudaMemcpyBatchAsync needs CUDA 12.8")
    batch = _batch(runtime, version)
    stream = torch.cuda.Stream()
    sources = [torch.randn(512, 2, 8, 128).to(torch.bfloat16).pin_memory() for _ in range(BLOCKS)]
    targets = [torch.zeros(512, 2, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(BLOCKS)]
    stream.wait_stream(torch.cuda.current_stream())
    error = batch(targets, sources, stream)
    stream.synchronize()
    exact = error == 0 and all(torch.equal(t.cpu(), s) for t, s in zip(targets, sources))
    print(f"batch of {BLOCKS}: error {error}, lands exactly: {exact}")
    if not exact:
        return
    rows = {
        "11 x cudaMemcpyAsync (store.dma.copy_async, served)": lambda: dma.copy_async(targets, sources, stream),
        "_foreach_copy_ on the copy stream": lambda: _foreach(targets, sources, stream),
        "one cudaMemcpyBatchAsync (pointer arrays built per call)": lambda: batch(targets, sources, stream),
    }
    for name, fn in rows.items():
        print(f"   {name}: {host_us(fn)} us a layer")


def _foreach(targets, sources, stream) -> None:
    with torch.cuda.stream(stream):
        torch._foreach_copy_(targets, sources, non_blocking=True)


if __name__ == "__main__":
    main()
