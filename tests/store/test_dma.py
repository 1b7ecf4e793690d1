"""store.dma: raw host-to-device copies and the holding of their source blocks until the copies are done."""
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
