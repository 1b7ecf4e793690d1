"""Probe (not a result): one layer's host-to-device copies (11 pinned 2 MB blocks, the 8B shape's 10 chunks and the
prefix) issued as one `cudaMemcpyBatchAsync` (CUDA 12.8+) against `store.dma.copy_async` with
a `cudaMemcpyAsync` a block and as served (s18b's output was taken before store.dma batched: its "served" row is
the call a block) and PyTorch's `_foreach_copy_`: the host microseconds a layer, and whether the batch lands
exactly. Run it in its own process (`python3 -m services.bench.probe_batch_copy`): the batch call is bound through
ctypes (`store.dma.bind_batch`, here without the start-up check), and its signature changed in CUDA 13.0 (no
`failIdx`); a wrong binding may crash the process.

The request's head is bound by its host time on an H200 (docs/gpu.md), and a layer's copy issue is ~0.2 ms of a later
layer's ~0.4 ms; this says whether a batched issue is worth building into `store.dma`.
"""
from __future__ import annotations

import ctypes

import torch

from services.bench.gpu import _without_batch, host_us
from store import dma

BLOCKS = 11


def _runtime() -> tuple[ctypes.CDLL, int]:
    library, _ = dma._runtime()
    if library is None or dma._memcpy_async() is None:
        raise SystemExit("no CUDA runtime bound by store.dma")
    version = ctypes.c_int()
    library.cudaRuntimeGetVersion(ctypes.byref(version))
    return library, version.value


def main() -> None:
    runtime, version = _runtime()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA runtime {version}")
    if version < 12080:
        raise SystemExit("cudaMemcpyBatchAsync needs CUDA 12.8")
    bound = dma.bind_batch(runtime.cudaMemcpyBatchAsync, version)  # bound as store.dma binds it, unchecked

    def batch(targets, sources, stream) -> int:
        return dma._batched(bound, targets, sources, stream.cuda_stream)

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
        "store.dma.copy_async, a cudaMemcpyAsync a block": lambda: _without_batch(
            lambda: dma.copy_async(targets, sources, stream)),
        "store.dma.copy_async (one batch where dma.batched())": lambda: dma.copy_async(targets, sources, stream),
        "_foreach_copy_ on the copy stream": lambda: _foreach(targets, sources, stream),
        "the bare cudaMemcpyBatchAsync (pointer arrays built per call)": lambda: batch(targets, sources, stream),
    }
    for name, fn in rows.items():
        print(f"   {name}: {host_us(fn)} us a layer")


def _foreach(targets, sources, stream) -> None:
    with torch.cuda.stream(stream):
        torch._foreach_copy_(targets, sources, non_blocking=True)


if __name__ == "__main__":
    main()
