"""How well frames fit their streams' open clusters, for every row of an ingest pass with a few launches.

Formation compares a frame ``f`` with its stream's open cluster: the cosine to the members' centroid
(similarity), and the members' mean cosine to the centroid they would have with ``f`` added (cohesion). Both
follow from the members' sum ``S`` and the sum of their unit vectors ``U``, over ``n`` members:

    similarity = cos(f, S)                                (the centroid S / n points where S does)
    cohesion   = (U + f / |f|) . (S + f) / ((n + 1) |S + f|)

So a stream keeps ``OpenSums`` (S, U and n) for its open cluster rather than its members, and a pass compares all
its rows' first frames at once and reads the answers back once, instead of about ten launches a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mosaic_core.memory.transfer import NOTHING_PENDING, read_back, upload


@dataclass(frozen=True, slots=True)
class OpenSums:
    """A stream's open cluster as formation compares with it: ``sums`` ``[2, D]`` float32 holds the members' sum and
    the sum of their unit vectors, over ``count`` members."""

    sums: torch.Tensor
    count: int


class CoherenceReadback:
    """``(similarity, cohesion)`` of each frame against its stream's open cluster (None where a stream has none),
    queued on the device at once and read back together later, without waiting for device work queued after it.
    It also makes each stream's ``OpenSums`` once formation has decided whether its frame joins."""

    def __init__(self, open_sums: list[OpenSums | None], frames: list[torch.Tensor]) -> None:
        self._open = open_sums
        frame = torch.stack(frames).float()  # [R, D]
        self._started = torch.stack([frame, torch.nn.functional.normalize(frame, dim=1)], dim=1)  # [R, 2, D]
        self._with = {r: i for i, r in enumerate(r for r, sums in enumerate(open_sums) if sums is not None)}
        self._joined = None
        self._host, self._copied = None, NOTHING_PENDING
        if not self._with:
            return
        device = frame.device
        index = upload(list(self._with), torch.long, device)
        members = torch.stack([open_sums[r].sums for r in self._with])  # [R', 2, D]
        started = self._started.index_select(0, index)  # [R', 2, D]: the frames of the rows with an open cluster
        self._joined = members + started
        counts = upload(
            np.asarray([open_sums[r].count + 1 for r in self._with], dtype=np.float32), torch.float32, device
        )
        joined_sum, joined_units = self._joined[:, 0], self._joined[:, 1]
        similarity = torch.nn.functional.cosine_similarity(started[:, 0], members[:, 0], dim=1)
        cohesion = (joined_units * joined_sum).sum(dim=1) / (counts * joined_sum.norm(dim=1))
        self._host, self._copied = read_back(torch.stack([similarity, cohesion], dim=1))

    def values(self) -> list[tuple[float | None, float | None]]:
        """``(similarity, cohesion)`` per frame, ``(None, None)`` where its stream had no open cluster."""
        if self._copied.ready is not None:
            self._copied.ready.synchronize()
        values = iter([] if self._host is None else self._host.tolist())
        return [tuple(next(values)) if sums is not None else (None, None) for sums in self._open]

    def open_after(self, row: int, *, joined: bool) -> OpenSums:
        """Row ``row``'s open cluster once its frame has joined it, or has started a new one."""
        if not joined or self._open[row] is None:
            return OpenSums(self._started[row].clone(), 1)
        return OpenSums(self._joined[self._with[row]].clone(), self._open[row].count + 1)
