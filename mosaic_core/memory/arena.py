"""The paged KV arena: one device page pool and one host page pool, both page-major like the durable records.

    device pool   [num_device_pages, num_layers, 2, num_kv_heads, page_tokens, head_dim]   one tensor
    host pool     chunks of [chunk_pages, num_layers, 2, num_kv_heads, page_tokens, head_dim], pinned under CUDA

Page ``p`` is one contiguous run of bytes holding every layer of up to ``page_tokens`` tokens, so a record file's
page (``mosaic_core.durable.records``) lands in it with one copy, and one layer of one page,
``[2, num_kv_heads, page_tokens, head_dim]``, is contiguous for the gathers and the paged attention kernels.

The device pool is allocated once, at its byte budget: every KV byte the arena places on the device is inside
it. (The full-mode baseline has no budget: its pool doubles when it runs out.) The host pool grows chunk by chunk
up to its budget, so an engine with a large host tier does not pin all of it up front. Under CUDA the next chunk is
pinned ahead, on a thread of its own, once fewer than a chunk's pages are free, the first chunk as the pools are
made (``host_growth.ChunkMaker``): a take that needs its pages adopts it, and pins on its own thread only when no
chunk is being made.

Which pages are free is plain-Python bookkeeping (``PageAllocator``); this module moves the bytes. Host pages that
a queued move may still read are handed back only once the transfer engine's fence for them has passed.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from mosaic_core.bookkeeping.pages import PageAllocator
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.memory.host_growth import ChunkMaker, HostGrowth
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import Moved, TransferEngine, upload

HOST_CHUNK_BYTES = 256 << 20
KEY_STATS_PAGES = 32  # pages whose keys ``key_stats`` copies at once


class PagePools:
    """Page storage of both memory tiers, and copies of pages within and between them.

    Args:
        grow_host_ahead: make the next host chunk on a thread of its own before a take needs it (None: under CUDA,
            where pinning a 256-MiB chunk took 85-210 ms on an H100; an unpinned chunk is only reserved address space).
        new_host_chunk: allocates a host chunk of the given number of pages (None: ``torch.empty``, pinned under
            CUDA).
    """

    def __init__(
        self,
        spec: KVSpec,
        *,
        page_tokens: int,
        device: torch.device,
        device_bytes: int,
        host_bytes: int,
        pinned_host_bytes: int = 0,
        grow_device: bool = False,
        transfers: TransferEngine,
        grow_host_ahead: bool | None = None,
        new_host_chunk: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        if page_tokens <= 0:
            raise ValueError(f"page_tokens must be positive, got {page_tokens}")
        self.spec = spec
        self.page_tokens = page_tokens
        self.device = torch.device(device)
        self.transfers = transfers
        self.pin = self.device.type == "cuda"
        self.grow_device = grow_device
        self.page_shape = (spec.num_layers, 2, spec.num_kv_heads, page_tokens, spec.head_dim)
        num_device = max(1, device_bytes // self.page_bytes)
        self.device_pool = torch.empty((num_device, *self.page_shape), dtype=spec.dtype, device=self.device)
        self.device_pages = PageAllocator(num_device)
        self.host_capacity_pages = host_bytes // self.page_bytes
        self.host_chunk_pages = max(1, HOST_CHUNK_BYTES // self.page_bytes)
        self.host_chunks: list[torch.Tensor] = []  # each [chunk_pages, *page_shape]; the last may be shorter
        self._host_chunk_starts = np.zeros(0, dtype=np.int64)  # their addresses (chunks are only ever added)
        self.host_pages = PageAllocator(0)
        self._host_fenced: deque[tuple[torch.cuda.Event | None, list[int]]] = deque()
        # Not a bound method of the pools: they would point at themselves, and live on until a garbage collection
        self._new_host_chunk = new_host_chunk or functools.partial(
            _empty_host_chunk, self.page_shape, spec.dtype, pin=self.pin
        )
        ahead = self.pin if grow_host_ahead is None else grow_host_ahead
        self._maker = ChunkMaker(self._new_host_chunk) if ahead else None
        if self._maker is not None:  # pools dropped without a close leave no thread behind
            weakref.finalize(self, self._maker.stop)
        self._ahead: Future | None = None  # the next chunk, being made or made, until a take adopts it
        self.host_growth = HostGrowth()
        if pinned_host_bytes:
            self._grow_host(min(self.host_capacity_pages, pinned_host_bytes // self.page_bytes))
        self._grow_host_ahead()  # the first chunk too, while the engine starts, not in the first take of a host page

    @property
    def page_bytes(self) -> int:
        return self.spec.bytes_per_token * self.page_tokens

    @property
    def device_pool_bytes(self) -> int:
        return self.device_pool.numel() * self.device_pool.element_size()

    @property
    def host_pool_bytes(self) -> int:
        """Host memory the pool holds (pinned under CUDA): its chunks, and the chunk made ahead once it is made,
        though no take has adopted it yet."""
        pages = self.host_pages.num_pages  # the adopted chunks' pages
        ahead = self._ahead  # read once: a take on the engine thread may adopt it meanwhile
        if ahead is not None and ahead.done() and ahead.exception() is None:
            pages += ahead.result().shape[0]
        return pages * self.page_bytes

    # -- pages ----------------------------------------------------------------------------------------------
    def take(self, tier: Tier, num_pages: int) -> list[int] | None:
        """``num_pages`` free pages of ``tier``'s pool, or None when it cannot hold them."""
        if tier is Tier.DEVICE:
            if not self.device_pages.can_allocate(num_pages) and self.grow_device:
                self._grow_device(num_pages)
            return self.device_pages.allocate(num_pages)
        self._reclaim_host(wait=False)
        if not self.host_pages.can_allocate(num_pages) and self._host_fenced:
            self._reclaim_host(wait=True)
        missing = num_pages - self.host_pages.num_free
        if missing > 0 and self.host_pages.num_pages < self.host_capacity_pages:
            started = time.perf_counter()
            try:
                self._grow_host(missing)
            finally:
                self.host_growth.wait_s += time.perf_counter() - started
        pages = self.host_pages.allocate(num_pages)
        self._grow_host_ahead()
        return pages

    def close(self) -> None:
        """Stops the thread that makes host chunks ahead, after the chunk it is making; later takes allocate
        chunks on their own thread."""
        if self._maker is not None:
            self._maker.close()
            self._maker = None

    def give_back(self, tier: Tier, pages: list[int]) -> None:
        """Frees pages. Device pages are free at once: every move that reads them is on the side stream, which
        the compute stream waits for before it writes again (see ``KVTiers``). Host pages wait for a fence,
        since the host itself may write a reused page."""
        if tier is Tier.DEVICE:
            self.device_pages.free(pages)
        else:
            self._host_fenced.append((self.transfers.fence(), pages))

    def page(self, tier: Tier, page: int) -> torch.Tensor:
        """One page ``[num_layers, 2, H, page_tokens, D]`` (a view)."""
        if tier is Tier.DEVICE:
            return self.device_pool[page]
        chunk, index = divmod(page, self.host_chunk_pages)
        return self.host_chunks[chunk][index]

    def layer_slab(self, tier: Tier, page: int, layer: int, fill: int) -> torch.Tensor:
        """The first ``fill`` tokens of one layer of one page, ``[2, H, fill, D]`` (a view)."""
        return self.page(tier, page)[layer, :, :, :fill]

    def slab_addresses(self, tier: Tier, pages: np.ndarray, layer: int) -> np.ndarray:
        """Where ``layer``'s slab of each page starts (``layer_slab(tier, page, layer, fill).data_ptr()``, int64),
        computed from the page numbers, without a tensor view per page."""
        pages = np.asarray(pages, dtype=np.int64)
        if tier is Tier.DEVICE:
            starts = self.device_pool.data_ptr() + pages * self.page_bytes
        else:
            chunk, index = np.divmod(pages, self.host_chunk_pages)
            starts = self._host_chunk_starts[chunk] + index * self.page_bytes
        return starts + layer * (self.page_bytes // self.spec.num_layers)

    def stage_rows(self, src: Tier, src_pages: list[int], fills: list[int], dst_pages: list[int], layers: range):
        """The slab-copy table (``copy_slabs``' rows: source, destination, tokens, source and destination slots)
        of ``layers`` of ``src_pages`` into the same layers of device ``dst_pages``: ``[len(layers), pages, 5]``."""
        rows = np.empty((len(layers), len(src_pages), 5), dtype=np.int64)
        offsets = np.asarray(layers, dtype=np.int64)[:, None] * (self.page_bytes // self.spec.num_layers)
        rows[:, :, 0] = self.slab_addresses(src, src_pages, 0)[None, :] + offsets
        rows[:, :, 1] = self.slab_addresses(Tier.DEVICE, dst_pages, 0)[None, :] + offsets
        rows[:, :, 2] = fills
        rows[:, :, 3:] = self.page_tokens
        return rows

    def block_rows(self, src: Tier, src_pages: list[int], dst_pages: list[int], layers: range) -> np.ndarray:
        """The byte runs (source, destination, bytes) that copy ``layers`` of each of ``src_pages`` into the same
        layers of device ``dst_pages``: ``[pages, 3]``. A page holds its layers one after another, so consecutive
        layers of one page are one run (every token slot of them, filled or not)."""
        return self.group_rows(src, src_pages, dst_pages, [layers])[0]

    def group_rows(
        self, src: Tier, src_pages: list[int], dst_pages: list[int], groups: list[range]
    ) -> list[np.ndarray]:
        """``block_rows`` of each group of layers, from one computation of the pages' addresses (a question's
        staging builds them while the copies wait, and its groups differ only in their layers)."""
        base = np.empty((len(src_pages), 3), dtype=np.int64)
        base[:, 0] = self.slab_addresses(src, src_pages, 0)
        base[:, 1] = self.slab_addresses(Tier.DEVICE, dst_pages, 0)
        layer_bytes = self.page_bytes // self.spec.num_layers
        rows = []
        for layers in groups:
            group = base.copy()
            group[:, :2] += layers.start * layer_bytes
            group[:, 2] = len(layers) * layer_bytes
            rows.append(group)
        return rows

    def layer_pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer of the whole device pool, each ``[num_pages, H, page_tokens, D]`` (views):
        what the paged attention kernels read in place."""
        return self.device_pool[:, layer, 0], self.device_pool[:, layer, 1]

    def slots(self, pages: list[int], fills: list[int]) -> np.ndarray:
        """Slot numbers ``page * page_tokens + offset`` of the tokens of ``pages``, in order (int32).

        pages [7, 2], fills [3, 2], page_tokens 4  ->  [28, 29, 30, 8, 9]
        """
        pt = self.page_tokens
        if not pages:
            return np.zeros(0, dtype=np.int32)
        grid = np.asarray(pages, dtype=np.int64)[:, None] * pt + np.arange(pt)[None, :]  # [P, pt]
        filled = np.arange(pt)[None, :] < np.asarray(fills)[:, None]
        return grid[filled].astype(np.int32)

    def upload(self, values: np.ndarray | list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """A device copy of host index data (slot tables, page ids, lengths), queued without waiting
        (``mosaic_core.memory.transfer.upload``)."""
        return upload(values, dtype, self.device)

    def slot_index(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Device index tensors (pages, offsets) of ``slots``, for ``write_slots``: built once per plan."""
        index = self.upload(slots)
        return index // self.page_tokens, index % self.page_tokens

    def write_slots(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor) -> None:
        """Stores new tokens' keys and values ``kv`` ``[N, 2, H, D]`` of one layer at the slots ``index``
        (``slot_index``): one indexed write."""
        pages, offsets = index
        self.device_pool[pages, layer, :, :, offsets] = kv.to(self.spec.dtype)

    def write_run(self, layer: int, page: int, offset: int, kv: torch.Tensor) -> None:
        """Stores ``kv`` ``[2, H, n, D]`` (one layer of n consecutive tokens) at ``offset`` of one page: a plain
        slice copy, cheaper to issue than an indexed write for a decode step's one token."""
        self.device_pool[page, layer, :, :, offset : offset + kv.shape[2]] = kv

    def read_slots(self, layer: int, slots: np.ndarray) -> torch.Tensor:
        """A new tensor ``[2, H, N, D]`` with one layer of the tokens at ``slots``."""
        index = self.upload(slots)
        pages, offsets = index // self.page_tokens, index % self.page_tokens
        return self.device_pool[pages, layer, :, :, offsets].permute(1, 2, 0, 3)

    # -- bytes ----------------------------------------------------------------------------------------------
    def write(self, tier: Tier, pages: list[int], fills: list[int], kv: torch.Tensor) -> None:
        """Stores ``kv`` ``[L, 2, H, sum(fills), D]`` into ``pages`` in order, from the compute stream."""
        assert kv.shape[3] == sum(fills), f"{kv.shape[3]} tokens for pages holding {sum(fills)}"
        pt = self.page_tokens
        if tier is Tier.DEVICE and all(f == pt for f in fills):
            # whole pages: one indexed copy, [L, 2, H, P, pt, D] -> [P, L, 2, H, pt, D]
            shaped = kv.reshape(*kv.shape[:3], len(pages), pt, kv.shape[4]).permute(3, 0, 1, 2, 4, 5)
            index = self.upload(pages)
            self.device_pool.index_copy_(0, index, shaped.to(self.device, self.spec.dtype))
            return
        start = 0
        for page, fill in zip(pages, fills, strict=True):
            self.page(tier, page)[:, :, :, :fill].copy_(kv[:, :, :, start : start + fill])
            start += fill

    def write_pages(self, tier: Tier, pages: list[int], stored: torch.Tensor) -> None:
        """Stores whole pages ``stored`` ``[P, L, 2, H, page_tokens, D]`` (a record file's, say) into ``pages``."""
        if tier is Tier.DEVICE:
            index = self.upload(pages)
            self.device_pool.index_copy_(0, index, stored.to(self.device, self.spec.dtype))
            return
        for page, data in zip(pages, stored, strict=True):
            self.page(tier, page).copy_(data)

    def gather(self, tier: Tier, pages: list[int], tokens: int | None = None) -> torch.Tensor:
        """A new tensor ``[len(pages), L, 2, H, tokens, D]``: the first ``tokens`` slots of each page (all of them
        when None), in order, where the pages live; one indexed copy on the device."""
        slots = slice(tokens)
        if tier is Tier.DEVICE:
            return self.device_pool[..., slots, :][self.upload(pages)]
        if not pages:
            return self._empty_pages()[..., slots, :]
        return torch.stack([self.page(tier, p)[..., slots, :] for p in pages])

    def read(self, tier: Tier, pages: list[int], fills: list[int]) -> torch.Tensor:
        """A new tensor ``[L, 2, H, sum(fills), D]`` with the pages' tokens in order, where the pages live."""
        stacked = self.gather(tier, pages)
        num_layers, two, heads, pt, head_dim = self.page_shape
        kv = stacked.permute(1, 2, 3, 0, 4, 5).reshape(num_layers, two, heads, len(pages) * pt, head_dim)
        if all(f == pt for f in fills):
            return kv.contiguous()
        keep = [p * pt + t for p, fill in enumerate(fills) for t in range(fill)]
        index = self.upload(keep) if kv.is_cuda else torch.tensor(keep)  # a pageable copy would wait for the device
        return kv.index_select(3, index)

    def key_stats(self, pages: list[int], fills: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per device page, the sum and the sum of squares of its first ``fill`` tokens' keys, in float32, each
        ``[len(pages), num_layers, num_kv_heads, head_dim]``. A few launches for every ``KEY_STATS_PAGES`` pages,
        whatever the number of frames they hold (at most that many pages' keys are copied at once)."""
        num_layers, _, heads, pt, head_dim = self.page_shape
        sums = torch.empty((len(pages), num_layers, heads, head_dim), dtype=torch.float32, device=self.device)
        sumsqs = torch.empty_like(sums)
        for start in range(0, len(pages), KEY_STATS_PAGES):
            stop = min(start + KEY_STATS_PAGES, len(pages))
            keys = self.device_pool[self.upload(pages[start:stop]), :, 0].float()  # [P, L, H, pt, D]
            chunk_fills = np.asarray(fills[start:stop])
            if (chunk_fills < pt).any():  # slots past a page's fill hold stale bytes, NaN or infinite ones too
                stale = np.arange(pt)[None, :] >= chunk_fills[:, None]
                keys.masked_fill_(self.upload(stale, torch.bool)[:, None, None, :, None], 0.0)
            torch.sum(keys, dim=3, out=sums[start:stop])
            torch.sum(keys.square_(), dim=3, out=sumsqs[start:stop])
        return sums, sumsqs

    def copy(self, src: Tier, src_pages: list[int], dst: Tier, dst_pages: list[int]) -> Moved:
        """Queues page-for-page copies between the pools on the transfer engine's side stream."""
        pairs = [(self.page(src, s), self.page(dst, d)) for s, d in zip(src_pages, dst_pages, strict=True)]
        return self.transfers.copy_pairs(pairs)

    def _empty_pages(self) -> torch.Tensor:
        return torch.empty((0, *self.page_shape), dtype=self.spec.dtype)

    def _grow_device(self, num_pages: int) -> None:
        current = self.device_pages.num_pages
        extra = max(num_pages - self.device_pages.num_free, current)
        grown = torch.empty((current + extra, *self.page_shape), dtype=self.spec.dtype, device=self.device)
        grown[:current].copy_(self.device_pool)
        self.device_pool = grown
        self.device_pages.grow(extra)

    def _grow_host(self, num_pages: int) -> None:
        """Adds whole chunks until ``num_pages`` more pages exist (the last chunk stops at the capacity): first the
        chunk made ahead, waiting for it if it is still being made, then chunks allocated here."""
        while num_pages > 0 and (size := self._next_host_chunk_pages()):
            if self._ahead is not None:
                made, self._ahead = self._ahead, None
                chunk = made.result()  # the maker's allocation error, if any, is raised here, as this take's own
                self.host_growth.ahead_chunks += 1
            else:
                chunk = self._new_host_chunk(size)
                self.host_growth.sync_chunks += 1
            assert chunk.shape == (size, *self.page_shape), f"a host chunk of {chunk.shape[0]} pages, not {size}"
            self.host_chunks.append(chunk)
            self._host_chunk_starts = np.append(self._host_chunk_starts, chunk.data_ptr())
            self.host_pages.grow(size)
            num_pages -= size

    def _grow_host_ahead(self) -> None:
        """Has the next chunk made on the maker's thread once fewer than a chunk's pages are free: at the rate
        windows leave the device for the host, a chunk is made long before its pages run out."""
        if self._maker is None or self._ahead is not None or self.host_pages.num_free >= self.host_chunk_pages:
            return
        size = self._next_host_chunk_pages()
        if size:
            self._ahead = self._maker.make(size)

    def _next_host_chunk_pages(self) -> int:
        """Pages of the next host chunk: a whole chunk, or what is left of the capacity (0: none is left)."""
        if self.host_chunks and self.host_chunks[-1].shape[0] < self.host_chunk_pages:
            return 0  # the short last chunk is at the capacity already
        return min(self.host_chunk_pages, self.host_capacity_pages - self.host_pages.num_pages)

    def _reclaim_host(self, *, wait: bool) -> None:
        while self._host_fenced:
            fence, pages = self._host_fenced[0]
            if fence is not None and not fence.query():
                if not wait:
                    return
                fence.synchronize()
            self._host_fenced.popleft()
            self.host_pages.free(pages)


def _empty_host_chunk(page_shape: tuple[int, ...], dtype: torch.dtype, num_pages: int, *, pin: bool) -> torch.Tensor:
    return torch.empty((num_pages, *page_shape), dtype=dtype, pin_memory=pin)
