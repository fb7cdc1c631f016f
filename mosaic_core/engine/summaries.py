"""Per-cluster key summaries that let a question score every cluster of a stream in one pass per layer.

For each cluster, layer and KV head we keep the running sum and sum of squares of the cluster's keys. From them:
the centroid ``mu`` and the diagonal variance ``var``. A question query ``q`` then estimates the cluster's
attention mass (log of the sum of ``exp(scale * q.k)`` over its keys) as if its keys were Gaussian:

    log_mass ~ log(n) + scale * q.mu + 0.5 * scale^2 * sum_d q_d^2 var_d

The log-count and the spread enter explicitly, so a big diffuse cluster is not mistaken for a small sharp one
(the failure of centroid-only scoring). Token mode scores with the centroid alone, as ReKV and InfLLM do.
"""

from __future__ import annotations

import numpy as np
import torch

from mosaic_core.bookkeeping.cluster_residency import SummaryRow
from mosaic_core.bookkeeping.residency import ResidencyManager
from mosaic_core.memory.layout import KVSpec
from mosaic_core.memory.transfer import upload

MIN_ROWS = 16  # the index's smallest size, in rows


class SummaryIndex:
    """Rows of key statistics, one row per cluster of an engine, kept on the engine's device.

    The tensors are rows of a pool, as pages are: which row is a cluster's, and how many tokens it sums, is in the
    cluster's record (``ClusterResidency.summary``). ``TierManager`` frees the row as it ends the record, so a
    removed, merged or split cluster leaves no row behind. Freed rows are reused first, so a long stream with
    retention never grows the tensors; once a quarter or less of them is in use they are compacted to half their
    size (the records' row numbers change then), so closed streams give their rows' memory back. A freed row keeps
    its values until it is reused: ``add_stats`` zeroes the reused rows it takes, all at once, and ``put``
    overwrites its row, so retention's frees launch nothing on the device.
    """

    def __init__(self, spec: KVSpec, residency: ResidencyManager, *, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self._residency = residency
        self._owners: list[SummaryRow | None] = []  # row -> the record's summary that holds it (None: free)
        self._free_rows: list[int] = []
        # [capacity, num_layers, num_kv_heads, head_dim]
        self._sum = torch.zeros(MIN_ROWS, spec.num_layers, spec.num_kv_heads, spec.head_dim, device=device)
        self._sumsq = torch.zeros_like(self._sum)
        self._count = torch.zeros(MIN_ROWS, device=device)

    def __len__(self) -> int:
        """Rows in use."""
        return len(self._owners) - len(self._free_rows)

    @property
    def capacity(self) -> int:
        return self._sum.shape[0]

    def add(self, cluster_id: str, keys: torch.Tensor) -> None:
        """Adds keys ``[num_layers, num_kv_heads, n, head_dim]`` to a cluster's row (taking one for it)."""
        keys = keys.float()
        self.add_stats([cluster_id], keys.sum(dim=2)[None], keys.square().sum(dim=2)[None], [keys.shape[2]])

    def add_stats(
        self, cluster_ids: list[str], key_sums: torch.Tensor, key_sumsqs: torch.Tensor, counts: list[int]
    ) -> None:
        """Adds the key sums and sums of squares ``[len(cluster_ids), num_layers, num_kv_heads, head_dim]`` of
        ``counts`` tokens to the rows of ``cluster_ids`` (taking rows as needed; an id may repeat), with one
        indexed add per statistic."""
        rows, stale = [], []
        for cluster_id, count in zip(cluster_ids, counts, strict=True):
            summary = self._residency.summary(cluster_id)
            if summary.row is None:
                reused = bool(self._free_rows)  # a freed row still holds its last cluster's values
                summary.row = self._take_row(summary)
                if reused:
                    stale.append(summary.row)
            summary.num_tokens += count
            rows.append(summary.row)
        if stale:
            stale_index = upload(stale, torch.long, self.device)
            for stat in (self._sum, self._sumsq, self._count):
                stat.index_fill_(0, stale_index, 0.0)
        index = upload(rows, torch.long, self.device)
        self._sum.index_add_(0, index, key_sums)
        self._sumsq.index_add_(0, index, key_sumsqs)
        self._count.index_add_(0, index, upload(np.asarray(counts, dtype=np.float32), torch.float32, self.device))

    def put(self, cluster_id: str, key_sum: torch.Tensor, key_sumsq: torch.Tensor, count: float) -> None:
        """Gives a cluster without a row the statistics ``[num_layers, num_kv_heads, head_dim]`` of ``count``
        tokens: restored from its durable record, or the sum of the clusters it was merged from."""
        summary = self._residency.summary(cluster_id)
        assert summary.row is None, f"{cluster_id} already has summary row {summary.row}"
        summary.row = self._take_row(summary)
        self._sum[summary.row] = key_sum.to(self.device, torch.float32)
        self._sumsq[summary.row] = key_sumsq.to(self.device, torch.float32)
        self._count[summary.row].fill_(float(count))  # a kernel argument: assigning a number would copy it over
        summary.num_tokens = round(count)

    def stats_copy(self, cluster_id: str) -> tuple[torch.Tensor, float]:
        """A cluster's key sum and sum of squares stacked ``[2, num_layers, num_kv_heads, head_dim]``, copied where
        they are (no wait for the device), and its token count."""
        summary = self._residency.summary(cluster_id)
        return torch.stack([self._sum[summary.row], self._sumsq[summary.row]]), float(summary.num_tokens)

    def combined(self, cluster_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The statistics of ``cluster_ids`` taken together (on the device), for ``put`` on their merger."""
        rows = self.rows(cluster_ids)
        count = sum(self._residency.summary(cid).num_tokens for cid in cluster_ids)
        return self._sum[rows].sum(dim=0), self._sumsq[rows].sum(dim=0), float(count)

    def checksums(self, cluster_ids: list[str]) -> list[float]:
        """Each cluster's sum of its absolute key sums (every layer, head and dimension): two engines that stored the
        same keys agree on them up to float rounding (how a benchmark checks that a faster path stored what the plain
        one did). One read back."""
        if not cluster_ids:
            return []
        return self._sum[self.rows(cluster_ids)].abs().double().flatten(1).sum(dim=1).tolist()

    def free(self, summary: SummaryRow) -> None:
        """Frees the row of an ended record (nothing if it never had one), with no device work: it is zeroed when
        ``add_stats`` reuses it (class doc).

        Zeroing each freed row here (three launches a cluster) held the service's engine thread 0.03 s a second at
        150 and 192 cameras on the H200 (bench/NOTES.md, session 23); assigning a number before that, 0.075 s
        (session 21).
        """
        if summary.row is None:
            return
        self._free_rows.append(summary.row)
        self._owners[summary.row] = None
        summary.row, summary.num_tokens = None, 0
        if self.capacity > MIN_ROWS and 4 * len(self) <= self.capacity:
            self._compact(max(MIN_ROWS, self.capacity // 2))

    def count(self, cluster_id: str) -> int:
        """Tokens summarised for a cluster (its stored KV)."""
        return self._residency.summary(cluster_id).num_tokens

    def rows(self, cluster_ids: list[str]) -> torch.Tensor:
        """Row indices of ``cluster_ids`` (valid until a row is freed: freeing may compact the rows)."""
        return self._rows_of(self._residency.summaries(cluster_ids))

    def all_layers(self, cluster_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centroids and variances ``[C, num_layers, num_kv_heads, head_dim]`` and log-counts ``[C]``."""
        return self._all_layers(self._residency.summaries(cluster_ids))

    def counts_and_all_layers(
        self, cluster_ids: list[str], num_layers: int | None = None
    ) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``count`` of each of ``cluster_ids``, in order, and their ``all_layers``, from one lookup of their records:
        a question's set-up reads a thousand or more. With ``num_layers``, only the first that many layers'
        centroids and variances (``[C, num_layers, ...]``): a question that chooses at its anchor layer reads no
        more, a fourteenth of the bytes at the 7B's 28 layers and an anchor at layer 1."""
        summaries = self._residency.summaries(cluster_ids)
        return [summary.num_tokens for summary in summaries], self._all_layers(summaries, num_layers)

    def _rows_of(self, summaries: list[SummaryRow]) -> torch.Tensor:
        rows = [summary.row for summary in summaries]
        assert None not in rows, f"{rows.count(None)} of the {len(rows)} clusters asked for have no keys summarised yet"
        return upload(rows, torch.long, self.device)

    def _all_layers(
        self, summaries: list[SummaryRow], num_layers: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self._rows_of(summaries)
        count = self._count[rows].clamp_min(1.0)
        layers = slice(None, num_layers)  # the slice is a view: only those layers' rows are gathered
        mean = self._sum[:, layers][rows] / count[:, None, None, None]
        var = (self._sumsq[:, layers][rows] / count[:, None, None, None] - mean.square()).clamp_min(0.0)
        return mean, var, count.log()

    def _take_row(self, summary: SummaryRow) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
            self._owners[row] = summary
            return row
        if len(self._owners) == self.capacity:
            self._sum = _grow(self._sum)
            self._sumsq = _grow(self._sumsq)
            self._count = _grow(self._count)
        self._owners.append(summary)
        return len(self._owners) - 1

    def _compact(self, capacity: int) -> None:
        """Moves the rows in use to the front of tensors of ``capacity`` rows and renumbers their records."""
        used = [(row, owner) for row, owner in enumerate(self._owners) if owner is not None]
        old_rows = upload([row for row, _ in used], torch.long, self.device)
        for name in ("_sum", "_sumsq", "_count"):
            old = getattr(self, name)
            new = old.new_zeros(capacity, *old.shape[1:])
            new[: len(used)] = old[old_rows]
            setattr(self, name, new)
        for new_row, (_, owner) in enumerate(used):
            owner.row = new_row
        self._owners = [owner for _, owner in used]
        self._free_rows = []


def _grow(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros_like(t)])
