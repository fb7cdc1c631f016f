"""Pages of the KV arena, and which pages hold each cluster: plain Python, no torch.

A page holds up to ``page_tokens`` tokens of every layer. A frame takes whole pages of its own (normally one:
the engine sizes pages to a frame), so a cluster is a list of pages in token order, and appending a frame takes
pages off a free list in O(1) whatever the cluster's size. The same cluster can hold pages in two tiers at once:
the host copy of a sealed cluster is kept while the device copy is a cache of it.

    ClusterPages "cam/c000007"      fills   [126, 126, 126]      tokens per page, in token order
                                    device  [  41,   9,  310]    page ids in the device pool (None: not there)
                                    host    [   3,   4,    5]    page ids in the host pool (None: not there)

Page lists are plain lists, so a record can be cut in two at a page boundary by slicing (``split``), without
moving a byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mosaic_core.errors import StateError


class PageAllocator:
    """Hands out page ids ``0 .. num_pages - 1`` of one pool: O(1) per page, two-phase like a block manager.

    ``can_allocate`` answers first; ``allocate`` commits (or returns None on a shortfall). A page has a reference
    count: ``share`` adds a reader (a question that attends to a stream's window holds its pages, so a frame that
    leaves the window meanwhile cannot have its page reused under the question), ``free`` drops one, and the page
    is free again at zero. Freeing a page that is not in use raises ``StateError``.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: the lowest ids go out first
        self._refs: list[int] = [0] * num_pages
        self.num_pages = num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int] | None:
        """``num_pages`` free ids, or None (nothing taken) when fewer are free."""
        if not self.can_allocate(num_pages):
            return None
        taken = [self._free.pop() for _ in range(num_pages)]
        for page in taken:
            self._refs[page] = 1
        return taken

    def share(self, pages: list[int]) -> None:
        """One more holder of each page (each must be in use)."""
        for page in pages:
            self._check_used(page)
            self._refs[page] += 1

    def free(self, pages: list[int]) -> None:
        """One holder fewer of each page; a page nobody holds is free again."""
        for page in pages:
            self._check_used(page)
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def _check_used(self, page: int) -> None:
        if not 0 <= page < self.num_pages or self._refs[page] == 0:
            raise StateError(f"page {page} is not in use in a pool of {self.num_pages} pages: double free?")

    def grow(self, num_pages: int) -> range:
        """Adds ``num_pages`` new free ids after the current ones (a pool that gained a chunk); returns them."""
        new = range(self.num_pages, self.num_pages + num_pages)
        self._refs.extend([0] * num_pages)
        self._free.extend(reversed(new))
        self.num_pages += num_pages
        return new


@dataclass(slots=True)
class ClusterPages:
    """One cluster's pages: how many tokens each holds, and their ids in each pool that has a copy."""

    cluster_id: str
    fills: list[int] = field(default_factory=list)  # tokens per page, token order
    device: list[int] | None = None
    host: list[int] | None = None

    @property
    def num_pages(self) -> int:
        return len(self.fills)

    @property
    def num_tokens(self) -> int:
        return sum(self.fills)

    @property
    def in_memory(self) -> bool:
        return self.device is not None or self.host is not None

    def split(self, num_pages: int, right_id: str) -> tuple[ClusterPages, ClusterPages]:
        """The first ``num_pages`` pages as this cluster, the rest as ``right_id``: list slices, no copy."""
        assert 0 < num_pages < self.num_pages, f"split of {self.cluster_id} at page {num_pages} of {self.num_pages}"

        def cut(pages: list[int] | None, left: bool) -> list[int] | None:
            if pages is None:
                return None
            return pages[:num_pages] if left else pages[num_pages:]

        left = ClusterPages(self.cluster_id, self.fills[:num_pages], cut(self.device, True), cut(self.host, True))
        right = ClusterPages(right_id, self.fills[num_pages:], cut(self.device, False), cut(self.host, False))
        return left, right


def pages_for(num_tokens: int, page_tokens: int) -> list[int]:
    """Fills of the pages ``num_tokens`` tokens take when they start a fresh page: full pages, then the rest."""
    full, rest = divmod(num_tokens, page_tokens)
    return [page_tokens] * full + ([rest] if rest else [])
