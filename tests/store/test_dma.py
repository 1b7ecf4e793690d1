"""store.dma: raw host-to-device copies and the holding of their source blocks until the copies are done."""
import ctypes

import pytest
import torch

from store import dma

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _Event:
    """Stands in for a CUDA event: done once set."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


@pytest.fixture(autouse=True)
def _no_orphans():
    dma.Holds._orphans.clear()
    yield
    dma.Holds._orphans.clear()


def test_blocks_are_held_until_their_event_completes_in_order():
    holds, first, second = dma.Holds(), _Event(), _Event()
    a, b = torch.zeros(2), torch.ones(2)
    holds.add(first, [a])
    holds.add(second, [b])
    holds.add(_Event(), [])  # nothing to hold: not kept
    second.done = True
    holds.release_done()  # the first batch is still running: nothing after it is dropped either
    assert [blocks for _, blocks in holds._held] == [[a], [b]]
    first.done = True
    holds.release_done()
    assert not holds._held


def test_a_closed_holders_blocks_wait_module_wide_until_done():
    holds, running = dma.Holds(), _Event()
    block = torch.zeros(3)
    holds.add(running, [block])
    holds.close()
    assert not holds._held and dma.Holds._orphans[0][1] == [block]
    other = dma.Holds()
    other.release_done()  # any later holder drops them once done, not before
    assert len(dma.Holds._orphans) == 1
    running.done = True
    other.release_all()
    assert not dma.Holds._orphans


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_without_cuda_every_copy_is_left_to_the_caller():
    assert not dma.available()
    assert dma.copy_async([torch.zeros(2)], [torch.ones(2)], None) == [0]


@cuda
def test_copies_land_and_odd_cases_are_left_to_the_caller():
    assert dma.available()
    stream = torch.cuda.Stream()
    sources = [torch.randn(64, 2, 4, 8).pin_memory(), torch.randn(5, 7), torch.randn(8, 4).pin_memory(),
               torch.randn(4, 4).pin_memory()]
    buffer = torch.zeros(3, 64, 2, 4, 8, device="cuda")
    targets = [buffer[1], torch.zeros(5, 7, device="cuda"), torch.zeros(4, 8, device="cuda").t(),
               torch.zeros(4, 4, device="cuda", dtype=torch.float16)]
    stream.wait_stream(torch.cuda.current_stream())
    left = dma.copy_async(targets, sources, stream)
    assert left == [2, 3]  # a strided target; another dtype
    stream.synchronize()
    torch.testing.assert_close(buffer[1].cpu(), sources[0], rtol=0, atol=0)
    torch.testing.assert_close(targets[1].cpu(), sources[1], rtol=0, atol=0)  # pageable: copied too
    assert buffer[0].abs().sum() == 0 and buffer[2].abs().sum() == 0


def _recording_batch(version: int):
    """A stand-in for cudaMemcpyBatchAsync with the signature of `version`'s runtime, recording what it was given,
    called as the real one is: through a function pointer without argument types (ctypes converts nothing)."""
    seen = {}
    size_p, void_pp = ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)
    head = [void_pp, void_pp, size_p, ctypes.c_size_t, ctypes.POINTER(dma._Attributes), size_p, ctypes.c_size_t]
    tail = [ctypes.c_void_p] if version >= 13000 else [size_p, ctypes.c_void_p]

    def record(dsts, srcs, sizes, count, attrs, first, n_attrs, *rest):
        seen.update(dsts=[dsts[i] for i in range(count)], srcs=[srcs[i] for i in range(count)],
                    sizes=[sizes[i] for i in range(count)], order=attrs.contents.srcAccessOrder, first=first[0],
                    n_attrs=n_attrs, stream=rest[-1], fail_index=len(rest) == 2)
        if len(rest) == 2:
            rest[0][0] = 0  # the runtime may write the failed copy's index there
        return 0

    typed = ctypes.CFUNCTYPE(ctypes.c_int, *head, *tail)(record)
    untyped = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.cast(typed, ctypes.c_void_p).value)
    untyped.argtypes = None
    untyped.keep = typed  # (the callback lives as long as the pointer to it)
    return untyped, seen


def test_the_attribute_struct_is_laid_out_as_the_runtimes():
    # cudaMemcpyAttributes: an enum, two cudaMemLocation {enum type; int id}, an unsigned int.
    assert ctypes.sizeof(dma._Attributes) == 24
    assert [getattr(dma._Attributes, f).offset for f in ("srcAccessOrder", "srcLocHint", "dstLocHint", "flags")] == [
        0, 4, 12, 20]


@pytest.mark.parametrize("version", [12080, 12090, 13000, 13020])
def test_the_batch_call_is_bound_as_the_runtimes_version_declares_it(version):
    function, seen = _recording_batch(version)
    batch = dma.bind_batch(function, version)
    assert batch([4096, 8192, 12288], [1 << 20, 2 << 20, 3 << 20], [100, 200, 300], 0xABC0) == 0
    assert seen == dict(dsts=[4096, 8192, 12288], srcs=[1 << 20, 2 << 20, 3 << 20], sizes=[100, 200, 300],
                        order=1, first=0, n_attrs=1, stream=0xABC0, fail_index=version < 13000)
    assert batch([16], [32], [8], 7) == 0 and seen["dsts"] == [16] and seen["stream"] == 7  # another count


@pytest.mark.parametrize("version", [12080, 13000])
def test_a_batch_prepared_ahead_is_the_same_call(version):
    """`arrays` once, `call` when the copies' turn comes (`dma.Prepared`): the runtime is given what `batch` gives it."""
    function, seen = _recording_batch(version)
    batch = dma.bind_batch(function, version)
    args = batch.arrays([4096, 8192], [1 << 20, 2 << 20], [100, 200])
    assert batch.call(args, 0xABC0) == 0
    assert seen == dict(dsts=[4096, 8192], srcs=[1 << 20, 2 << 20], sizes=[100, 200], order=1, first=0, n_attrs=1,
                        stream=0xABC0, fail_index=version < 13000)
    assert batch.call(args, 0x10) == 0 and seen["stream"] == 0x10 and seen["dsts"] == [4096, 8192]  # issued again


def test_before_cuda_12_8_there_is_no_batch_call():
    function, _ = _recording_batch(13000)
    assert dma.bind_batch(function, 12060) is None


class _Library:
    def __init__(self):
        self.cleared = 0

    def cudaGetLastError(self):  # noqa: N802 - the runtime's name
        self.cleared += 1
        return 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case: the test copy cannot allocate on CUDA")
def test_a_failed_test_copy_takes_its_error_off_the_runtime(monkeypatch):
    library = _Library()
    monkeypatch.setattr(dma, "_runtime", lambda: (library, "libcudart"))
    assert dma._copies_right(lambda targets, sources, stream: 0) is False  # (no CUDA here: it fails)
    assert library.cleared == 1


def _runtime_versions() -> tuple[int, int]:
    library, runtime, driver = dma._runtime()[0], ctypes.c_int(0), ctypes.c_int(0)
    library.cudaRuntimeGetVersion(ctypes.byref(runtime))
    library.cudaDriverGetVersion(ctypes.byref(driver))
    return runtime.value, driver.value


def _pinned_layer(count=11):
    sources = [torch.randn(64 + i, 2, 4, 8).pin_memory() for i in range(count)]
    buffer = torch.zeros(2, sum(s.shape[0] for s in sources) + 3, 2, 4, 8, device="cuda")
    return sources, buffer, list(buffer[1, 3:].split([s.shape[0] for s in sources]))


def _counted_batch(monkeypatch):
    """(calls, stream, sources, buffer, targets): the runtime's batch call (skipped before CUDA 12.8) counted in
    `calls`, a side stream and a pinned layer (`_pinned_layer`)."""
    if min(_runtime_versions()) < 12080:
        pytest.skip("cudaMemcpyBatchAsync needs a CUDA 12.8 runtime and driver")
    assert dma.batched()
    calls = []
    monkeypatch.setattr(dma, "_memcpy_batch", lambda counting=_counting(dma._memcpy_batch(), calls): counting)
    return (calls, torch.cuda.Stream(), *_pinned_layer())


@cuda
def test_a_layers_copies_go_as_one_batch_and_land_exactly(monkeypatch):
    calls, stream, sources, buffer, targets = _counted_batch(monkeypatch)
    stream.wait_stream(torch.cuda.current_stream())
    assert dma.copy_async(targets, sources, stream) == []
    stream.synchronize()
    assert calls == [11]  # one call for the layer
    assert torch.equal(buffer[1, 3:].cpu(), torch.cat(sources)) and buffer[0].abs().sum() == 0
    assert buffer[1, :3].abs().sum() == 0
    # A pageable block among pinned ones: copied exactly too.
    sources[4] = torch.randn(sources[4].shape)
    buffer.zero_()
    stream.wait_stream(torch.cuda.current_stream())
    assert dma.copy_async(targets, sources, stream) == []
    stream.synchronize()
    assert torch.equal(buffer[1, 3:].cpu(), torch.cat(sources))


@cuda
def test_a_refused_batch_is_copied_a_block_a_call_and_no_batch_is_tried_again(monkeypatch, caplog):
    monkeypatch.setattr(dma, "_batch_refused", False)
    calls, cleared, clear = [], [], dma._clear_error
    monkeypatch.setattr(dma, "_clear_error", lambda: cleared.append(1) or clear())
    monkeypatch.setattr(dma, "_memcpy_batch", lambda refusing=_refusing(calls): refusing)
    stream = torch.cuda.Stream()
    sources, buffer, targets = _pinned_layer()
    for _ in range(2):
        buffer.zero_()
        stream.wait_stream(torch.cuda.current_stream())
        assert dma.copy_async(targets, sources, stream) == []
        stream.synchronize()
        assert torch.equal(buffer[1, 3:].cpu(), torch.cat(sources))
    assert calls == [1] and cleared == [1] and "refused" in caplog.text
    assert (torch.ones(4, device="cuda") + 1).sum().item() == 8  # PyTorch's next launch finds no error


def _counting(real, calls):
    """The bound batch call, each call's copy count recorded in `calls`."""
    class Counting:
        arrays = staticmethod(real.arrays)

        @staticmethod
        def call(args, stream):
            calls.append(args[3].value)
            return real.call(args, stream)
    return Counting


def _refusing(calls):
    """A batch call the runtime refuses (cudaErrorInvalidValue), each call recorded in `calls`."""
    class Refusing:
        arrays = staticmethod(lambda targets, sources, sizes: ("args",))

        @staticmethod
        def call(args, stream):
            calls.append(1)
            return 1
    return Refusing


def _prepared(sources, targets) -> dma.Prepared:
    return dma.Prepared([t.data_ptr() for t in targets], [s.data_ptr() for s in sources], [s.nbytes for s in sources])


@cuda
def test_copies_prepared_ahead_land_exactly_as_one_batch(monkeypatch):
    calls, stream, sources, buffer, targets = _counted_batch(monkeypatch)
    prepared = _prepared(sources, targets)
    assert prepared.nbytes == sum(s.nbytes for s in sources)
    for _ in range(2):  # issued twice from the same arrays
        buffer.zero_()
        stream.wait_stream(torch.cuda.current_stream())
        prepared.issue(stream)
        stream.synchronize()
        assert torch.equal(buffer[1, 3:].cpu(), torch.cat(sources)) and buffer[0].abs().sum() == 0
        assert buffer[1, :3].abs().sum() == 0
    assert calls == [11, 11]


@cuda
def test_prepared_copies_a_refused_batch_copies_a_block_a_call(monkeypatch, caplog):
    monkeypatch.setattr(dma, "_batch_refused", False)
    calls = []
    monkeypatch.setattr(dma, "_memcpy_batch", lambda refusing=_refusing(calls): refusing)
    stream = torch.cuda.Stream()
    sources, buffer, targets = _pinned_layer()
    prepared = _prepared(sources, targets)
    stream.wait_stream(torch.cuda.current_stream())
    prepared.issue(stream)
    stream.synchronize()
    assert torch.equal(buffer[1, 3:].cpu(), torch.cat(sources)) and "refused" in caplog.text and dma._batch_refused
    assert calls == [1]
    assert (torch.ones(4, device="cuda") + 1).sum().item() == 8  # PyTorch's next launch finds no error


@cuda
def test_a_copy_refused_partway_leaves_nothing_queued_and_no_error_behind(monkeypatch):
    """A layer's third copy refused by the runtime: the error says so, the two queued before it are done when it is
    raised (their blocks and the buffer may be let go at once) and the runtime's last-error slot is clear."""
    monkeypatch.setattr(dma, "_batch_refused", True)  # a copy a call
    real, calls, cleared, clear = dma._memcpy_async(), [], [], dma._clear_error
    assert real is not None

    def third_refused(target, source, size, kind, stream):
        calls.append(size)
        return 1 if len(calls) == 3 else real(target, source, size, kind, stream)

    monkeypatch.setattr(dma, "_memcpy_async", lambda: third_refused)
    monkeypatch.setattr(dma, "_clear_error", lambda: cleared.append(1) or clear())
    stream = torch.cuda.Stream()
    sources, buffer, targets = _pinned_layer()
    stream.wait_stream(torch.cuda.current_stream())
    with pytest.raises(RuntimeError, match=f"{sources[2].nbytes}-byte block failed"):
        _prepared(sources, targets).issue(stream)
    assert stream.query() and len(calls) == 3 and cleared == [1]
    assert torch.equal(buffer[1, 3:3 + 64 + 65].cpu(), torch.cat(sources[:2]))
    assert (torch.ones(4, device="cuda") + 1).sum().item() == 8  # PyTorch's next launch finds no error
