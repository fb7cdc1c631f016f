"""The host pool's next chunk, made ahead on a thread of its own and adopted by the take that needs its pages.

Off CUDA chunks are not pinned, but the same code runs when ``grow_host_ahead`` is on: the chunks made on the
maker's thread, their addresses, the capacity and the errors are the same on a GPU.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import pytest
import torch

import mosaic_core.memory.arena as arena
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory.arena import PagePools
from mosaic_core.memory.host_growth import PINNED_BY_REGISTERING, fault_pages_before_pinning
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import TransferEngine

SPEC = KVSpec(num_layers=3, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32)
PAGE_TOKENS = 5
PAGE_BYTES = SPEC.bytes_per_token * PAGE_TOKENS
CHUNK_PAGES = 3


class Chunks:
    """A host chunk allocator that records the thread of each allocation; ``gate`` holds the maker's thread's
    allocations until set, and ``fail_on`` makes that allocation (counted from 1) raise."""

    def __init__(self, *, fail_on: int = 0) -> None:
        self.made: list[tuple[int, threading.Thread]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def __call__(self, num_pages: int) -> torch.Tensor:
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            assert self.gate.wait(10), "the test never opened the gate"
        self.made.append((num_pages, thread))
        if len(self.made) == self.fail_on:
            raise RuntimeError("CUDA error: out of memory (pinning a host chunk)")
        return torch.empty((num_pages, SPEC.num_layers, 2, SPEC.num_kv_heads, PAGE_TOKENS, SPEC.head_dim))

    @property
    def off_thread(self) -> int:
        return sum(thread is not threading.main_thread() for _, thread in self.made)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(arena, "HOST_CHUNK_BYTES", CHUNK_PAGES * PAGE_BYTES)


def _pools(host_pages: int, chunks: Chunks, *, ahead: bool = True) -> PagePools:
    return PagePools(
        SPEC, page_tokens=PAGE_TOKENS, device=torch.device("cpu"), device_bytes=4 * PAGE_BYTES,
        host_bytes=host_pages * PAGE_BYTES, transfers=TransferEngine(torch.device("cpu")), grow_host_ahead=ahead,
        new_host_chunk=chunks,
    )  # fmt: skip


def _settled(chunks: Chunks, count: int) -> None:
    """Waits until ``count`` chunks were allocated (the maker's thread works on its own time)."""
    for _ in range(1000):
        if len(chunks.made) >= count:
            return
        threading.Event().wait(0.005)
    pytest.fail(f"{len(chunks.made)} chunks allocated, {count} expected")


def _host_pool_bytes_once_made(pools: PagePools) -> int:
    """``host_pool_bytes`` once it counts a chunk (its future is set just after the allocation returns)."""
    for _ in range(2000):
        if pools.host_pool_bytes:
            break
        threading.Event().wait(0.005)
    return pools.host_pool_bytes


def test_the_next_chunk_is_made_off_the_taking_thread_and_adopted_when_needed():
    chunks = Chunks()
    pools = _pools(10, chunks)
    _settled(chunks, 1)  # no page free as the pools are made: the first chunk is made ahead
    assert len(pools.host_chunks) == 0, "a chunk made ahead is the pool's only once a take needs it"
    assert _host_pool_bytes_once_made(pools) == 3 * pools.page_bytes, "yet its memory is held, and said so"
    assert pools.take(Tier.HOST, 2) == [0, 1]
    _settled(chunks, 2)  # 1 page free, below a chunk's 3: the next is made ahead
    assert len(pools.host_chunks) == 1

    assert pools.take(Tier.HOST, 3) == [3, 4, 5]  # a new chunk's pages go out first
    assert len(pools.host_chunks) == 2 and chunks.off_thread == 2
    assert (pools.host_growth.ahead_chunks, pools.host_growth.sync_chunks) == (2, 0)
    pools.close()


def test_a_take_waits_for_the_chunk_being_made_instead_of_allocating_another():
    chunks = Chunks()
    pools = _pools(10, chunks)
    _settled(chunks, 1)  # the first chunk, made as the pools were made
    chunks.gate.clear()  # the next chunk made ahead is held until the gate opens
    pools.take(Tier.HOST, 2)  # adopts the first chunk and asks for the next
    pools.take(Tier.HOST, 1)  # the free page: no chunk needed yet
    opener = threading.Timer(0.05, chunks.gate.set)
    opener.start()

    assert pools.take(Tier.HOST, 2) == [3, 4]  # needs the next chunk: waits for the one being made
    assert len(pools.host_chunks) == 2

    opener.join()
    assert [n for n, _ in chunks.made[:2]] == [3, 3] and chunks.off_thread == 2
    assert pools.host_growth.sync_chunks == 0 and pools.host_growth.wait_s >= 0.04
    pools.close()


@pytest.mark.parametrize("host_pages", [1, 2, 3, 4, 7, 9, 10])
def test_growth_ahead_never_passes_the_capacity(host_pages):
    chunks = Chunks()
    pools = _pools(host_pages, chunks)
    rng = np.random.default_rng(host_pages)
    taken = 0
    while (pages := pools.take(Tier.HOST, int(rng.integers(1, 3))) or pools.take(Tier.HOST, 1)) is not None:
        taken += len(pages)
        assert pools.host_pages.num_pages <= host_pages
        if rng.random() < 0.5:  # sometimes the maker's thread is done before the next take, sometimes not
            threading.Event().wait(0.002)
    pools.close()  # the chunk being made, if any, is made before the thread stops

    assert taken == host_pages and pools.host_pages.num_pages == host_pages
    assert sum(n for n, _ in chunks.made) == host_pages, "a chunk made ahead past the capacity"
    assert [c.shape[0] for c in pools.host_chunks[:-1]] == [CHUNK_PAGES] * (len(pools.host_chunks) - 1)
    # every chunk was made ahead, the first as the pools were made, whatever the timing
    assert (pools.host_growth.sync_chunks, pools.host_growth.ahead_chunks) == (0, len(pools.host_chunks))


def test_pages_of_adopted_chunks_are_addressed_and_hold_their_bytes():
    chunks = Chunks()
    pools = _pools(10, chunks)
    pages = []
    for _ in range(5):
        pages += pools.take(Tier.HOST, 2)
        if pools.host_pages.num_pages < 10 and pools.host_pages.num_free < CHUNK_PAGES:  # one is being made
            _settled(chunks, len(pools.host_chunks) + 1)
    assert pools.host_growth.ahead_chunks >= 2

    assert len(pools._host_chunk_starts) == len(pools.host_chunks)
    for layer in range(SPEC.num_layers):
        views = [pools.layer_slab(Tier.HOST, p, layer, PAGE_TOKENS).data_ptr() for p in pages]
        assert pools.slab_addresses(Tier.HOST, pages, layer).tolist() == views
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, len(pages) * PAGE_TOKENS, SPEC.head_dim)
    pools.write(Tier.HOST, pages, [PAGE_TOKENS] * len(pages), kv)
    assert torch.equal(pools.read(Tier.HOST, pages, [PAGE_TOKENS] * len(pages)), kv)
    pools.close()


def test_close_joins_the_makers_thread_and_later_takes_allocate_on_their_own():
    chunks = Chunks()
    pools = _pools(10, chunks)
    pools.take(Tier.HOST, 2)
    _settled(chunks, 2)
    (maker,) = {thread for _, thread in chunks.made if thread is not threading.main_thread()}

    pools.close()

    assert not maker.is_alive()
    pools.take(Tier.HOST, 6)  # the chunk made before the close, then one allocated here
    assert (pools.host_growth.ahead_chunks, pools.host_growth.sync_chunks) == (2, 1)
    assert chunks.off_thread == 2


def test_pools_dropped_without_a_close_stop_their_thread_and_free_the_chunk_made_ahead():
    chunks = Chunks()
    pools = _pools(10, chunks)
    _settled(chunks, 1)
    (maker,) = {thread for _, thread in chunks.made}
    chunk = weakref.ref(pools._ahead.result())

    del pools  # no close: an engine a bench or a test builds and drops

    maker.join(timeout=5)
    assert not maker.is_alive(), "the maker's thread outlived its pools"
    assert chunk() is None, "the chunk made ahead outlived its pools"


def test_a_failed_chunk_made_ahead_fails_the_take_that_needs_it_and_the_next_take_allocates_again():
    chunks = Chunks(fail_on=2)  # the chunk made ahead
    pools = _pools(10, chunks)
    pools.take(Tier.HOST, 2)
    _settled(chunks, 2)
    assert pools.take(Tier.HOST, 1) == [2]  # the free page: the failure is not this take's

    with pytest.raises(RuntimeError, match="pinning a host chunk"):
        pools.take(Tier.HOST, 1)

    assert pools.host_pages.num_pages == CHUNK_PAGES and len(pools._host_chunk_starts) == 1
    assert pools.take(Tier.HOST, 1) == [3]  # allocated on this thread
    assert chunks.made[2][1] is threading.main_thread()
    pools.close()


def test_without_growth_ahead_every_chunk_is_allocated_by_the_take():
    chunks = Chunks()
    pools = _pools(10, chunks, ahead=False)
    for _ in range(5):
        pools.take(Tier.HOST, 2)
    pools.close()

    assert chunks.off_thread == 0 and len(chunks.made) == 4
    assert (pools.host_growth.ahead_chunks, pools.host_growth.sync_chunks) == (0, 4)


def test_by_default_chunks_are_made_ahead_and_pinned_under_cuda_only():
    device = torch.device(os.environ.get("MOSAIC_TEST_DEVICE", "cpu"))
    pools = PagePools(
        SPEC, page_tokens=PAGE_TOKENS, device=device, device_bytes=4 * PAGE_BYTES, host_bytes=10 * PAGE_BYTES,
        transfers=TransferEngine(device),
    )  # fmt: skip
    for _ in range(5):
        pools.take(Tier.HOST, 2)
    pools.close()

    cuda = device.type == "cuda"
    assert [chunk.is_pinned() for chunk in pools.host_chunks] == [cuda] * 4
    assert (pools.host_growth.sync_chunks, pools.host_growth.ahead_chunks) == ((0, 4) if cuda else (4, 0))


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("", PINNED_BY_REGISTERING),
        ("expandable_segments:True", f"expandable_segments:True,{PINNED_BY_REGISTERING}"),
        ("pinned_use_cuda_host_register:False", "pinned_use_cuda_host_register:False"),
    ],
)
def test_pinning_by_registering_keeps_the_settings_made_before(before, after, monkeypatch):
    made = []
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: before, raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", made.append)

    fault_pages_before_pinning()

    assert made == ([] if before.startswith("pinned_use_cuda_host_register") else [after])


def test_without_a_getter_the_settings_made_at_the_start_are_kept(monkeypatch):
    made = []
    monkeypatch.delattr(torch._C, "_accelerator_getAllocatorSettings", raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", made.append)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")

    fault_pages_before_pinning()

    assert made == [f"max_split_size_mb:512,{PINNED_BY_REGISTERING}"]


def test_a_torch_that_cannot_change_its_settings_pins_as_it_does_and_says_so(monkeypatch, caplog):
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings", raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "", raising=False)

    fault_pages_before_pinning()  # an engine's start under CUDA goes on

    assert PINNED_BY_REGISTERING in caplog.text and "cannot change its allocator's settings" in caplog.text
