"""What a question's retrieval chose and staged: one layer's choice (``LayerSelection``) and the bytes staged in each
part of the staging (``TransferPart``), with the free functions that fill a choice up to the token budget
(``fill_in_order``) and cut a chosen cluster to the tokens it held (``first_pages``, ``first_views``). ``Retriever``
(``retrieval.py``) makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(slots=True)
class TransferPart:
    """Bytes a question staged in one part of its staging, their device time with and without the host's
    preparation (``Moved.seconds`` and ``Moved.copy_seconds``, which is the same where a path records no
    ``issued``: a copy a slab, or one slab-copy launch where a chosen unit is on disk), and the copies handed to
    CUDA for them (a run, a copy a slab, or a kernel launch)."""

    bytes: int = 0
    seconds: float = 0.0
    copy_seconds: float = 0.0
    copies: int = 0


@dataclass(slots=True)
class LayerSelection:
    """What one layer retrieved: device-resident units are attended where they are (their slots), the pages of
    the others are staged into the question's device pages, named by page number (``paged``: every other unit is
    in the host pool and the machinery batches) or else by a view of each page's slab."""

    cluster_ids: list[str]
    device_slots: list[np.ndarray]  # per device-resident unit: its tokens' slots in the device pool
    slabs: list[torch.Tensor]  # not paged: per page of the other units, [2, num_kv_heads, fill, head_dim]
    num_tokens: int
    scores: torch.Tensor | None = None  # [num_candidates], kept on the device until the answer ends
    paged: bool = False
    host_pages: list[int] = field(default_factory=list)  # paged: the other units' host pages, in order
    host_fills: list[int] = field(default_factory=list)  # and the tokens each holds

    @property
    def staged_fills(self) -> list[int]:
        """Tokens of each page to stage, in order (each takes one of the question's staging pages)."""
        return self.host_fills if self.paged else [slab.shape[2] for slab in self.slabs]

    def shared(self) -> LayerSelection:
        """This choice as a later layer takes it: the same units, slots and host pages; no scores, and no views
        (a paged choice's pages are the same in every layer; an unpaged one's views are built per layer)."""
        return LayerSelection(
            list(self.cluster_ids), self.device_slots, [], self.num_tokens,
            paged=self.paged, host_pages=self.host_pages, host_fills=self.host_fills,
        )  # fmt: skip

    def probabilities(self, candidates: list[str]) -> dict[str, float]:
        """Softmax of the scores over the candidates: each chosen cluster's predicted share of attention."""
        if self.scores is None:
            return {}
        return dict(zip(candidates, torch.softmax(self.scores, 0).tolist(), strict=True))


def fill_in_order(order: list[int], sizes: list[int], budget: int, smallest: int, gone=()) -> list[int]:
    """The indices of ``order`` taken one after another while each still fits in ``budget`` with those taken
    before it (``sizes[i]`` each), in that order, skipping those in ``gone``. ``smallest`` is the least of
    ``sizes``: once less than it is left, nothing else fits, so the rest of a thousand or more indices are not
    looked at."""
    taken, used = [], 0
    for i in order:
        if i in gone:
            continue
        size = sizes[i]
        if used + size <= budget:
            taken.append(i)
            used += size
            if used + smallest > budget:
                break
    return taken


def first_pages(pages: list[int], fills: list[int], num_tokens: int | None) -> tuple[list[int], list[int]]:
    """The leading ``pages`` (``fills`` tokens each) that hold a cluster's first ``num_tokens`` tokens; all of them
    with None. A size the cluster had ends on a page boundary: a frame starts a page of its own."""
    if num_tokens is None or sum(fills) <= num_tokens:
        return pages, fills
    total, n = 0, 0
    while total < num_tokens:
        total += fills[n]
        n += 1
    assert total == num_tokens, f"{num_tokens} tokens end inside a page (fills {fills})"
    return pages[:n], fills[:n]


def first_views(slabs: list[torch.Tensor], num_tokens: int | None) -> list[torch.Tensor]:
    """The views ``[2, H, fill, D]`` in ``slabs`` cut to their first ``num_tokens`` tokens; all of them with None."""
    if num_tokens is None:
        return slabs
    kept, left = [], num_tokens
    for slab in slabs:
        if left <= 0:
            break
        kept.append(slab if slab.shape[2] <= left else slab[:, :, :left])
        left -= slab.shape[2]
    return kept
