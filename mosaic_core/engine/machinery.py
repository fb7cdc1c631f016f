"""How a question's units are scored, moved and cached (``Machinery``), derived from the config by ``machinery_for``.

The mode picks the retrieval unit and the machinery (``Machinery``); ``Retriever`` (``retrieval.py``) reads the
machinery, never the mode, so two modes with the same machinery differ only in their unit and scorer:

| mode    | unit          | scorer (default) | gather                  | shared choice | device cache |
| ------- | ------------- | ---------------- | ----------------------- | ------------- | ------------ |
| full    | cluster       | none: everything | batched (retrieval.py)  | no            | all resident |
| token   | one frame     | mean key         | one copy per block      | no            | no           |
| frame   | one frame     | mean key         | batched                 | yes           | yes          |
| cluster | cluster       | share per token  | batched                 | yes           | yes          |

``token`` is the faithful ReKV stand-in (ReKV's own code copies block by block, scores every layer and keeps
nothing on the GPU); ``frame`` is the same unit on Mosaic's machinery, so ``frame`` vs ``cluster`` is what the unit
alone buys. ``EngineConfig.scorer`` swaps the scorer of any mode (random, recent, or the other key scorer).

``layer_groups`` cuts layers into the groups ``Machinery.staging_groups`` names.
"""

from __future__ import annotations

from dataclasses import dataclass

from mosaic_core.config import EngineConfig, RetrievalMode


@dataclass(frozen=True, slots=True, kw_only=True)
class Machinery:
    """How a question's units are scored, moved and cached; derived from the config by ``machinery_for``."""

    choose_all: bool  # full mode: no choice, every unit
    scorer: str
    batched_gather: bool
    staging_copy: str  # how paged staging moves bytes: "dma" (copy engines) or "kernel" (slab gather)
    staging_groups: tuple[int, ...]  # dma: layers of a page copied as one run, group by group (``layer_groups``)
    staging_streams: int  # dma: streams a group's runs are dealt to
    staging_batch: bool  # dma: one batched call a stream and group (``EngineConfig.staging_batch``)
    prefetch_after_layer: int | None
    device_cache: bool


def machinery_for(config: EngineConfig) -> Machinery:
    mode = config.mode
    rekv = mode is RetrievalMode.TOKEN
    return Machinery(
        choose_all=mode is RetrievalMode.FULL,
        scorer=config.scorer or mode.own_scorer,
        batched_gather=not rekv,
        staging_copy=config.staging_copy,
        staging_groups=config.staging_groups or (config.prefill_graph_layers,),
        staging_streams=config.staging_streams,
        staging_batch=config.staging_batch,
        prefetch_after_layer=None if rekv or mode is RetrievalMode.FULL else config.prefetch_after_layer,
        device_cache=mode.caches_on_device,
    )


def layer_groups(layers: range, sizes: tuple[int, ...]) -> list[range]:
    """``layers`` cut into consecutive groups of ``sizes`` layers, the last size repeating; the last group stops at
    the last layer.

    range(2, 28), (8, 8, 6, 4)  ->  [2, 10), [10, 18), [18, 24), [24, 28)
    range(2, 28), (4,)          ->  [2, 6), [6, 10), ... [22, 26), [26, 28)
    """
    groups, start = [], layers.start
    for i in range(len(layers)):
        if start >= layers.stop:
            break
        size = sizes[min(i, len(sizes) - 1)]
        groups.append(range(start, min(start + size, layers.stop)))
        start += size
    return groups
