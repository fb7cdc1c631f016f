"""How the split-K attention kernels (``kernels.attention``) are launched: their tile sizes, and how many splits a
call's keys are cut into so that the grid fills the SMs once."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.kernels import cdiv, next_power_of_2

_MAX_SPLITS = 64
_MIN_SPLIT_BLOCKS = 4  # a split shorter than this many key blocks costs more to merge than it saves
# Stage-1 programs an SM in the grids that ran fastest in session 30's sweep on an H200 (bench/NOTES.md): 4 with
# 16-row tiles (decode), 2 with taller ones (questions); a grid a few programs larger was slow, as a second wave is.
_RESIDENT_PER_SM_SMALL_TILES = 4
_RESIDENT_PER_SM = 2
SPLIT_PLANS = ("resident", "twice_the_sms")
_split_plan = "resident"


@dataclass(frozen=True, kw_only=True)
class AttentionLaunch:
    """Everything the stage-1 launch needs beyond the tensors, for one call."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    q_len: int
    head_dim: int
    max_kv_tokens: int
    causal_shift: int
    page_tokens: int  # 0 when not paged
    slots: bool = False  # the page table is a slot table (one entry per key)

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True, kw_only=True)
class AttentionTiles:
    """The stage-1 kernel's tile sizes and launch shape (``bench/slot_attention_sweep.py`` tries others)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def kernel_config(launch: AttentionLaunch) -> AttentionTiles:
    """Tile sizes and launch shape for the stage-1 kernel.

    Swept on one H200 (bf16, 28 q / 4 kv heads, head_dim 128; decode b1-b32 over 4k-16k keys, prefill
    32x16k, 128x4k, 1024x1024): 64x64 tiles, 4 warps and 3 stages were best or within noise of the best
    everywhere. Session 30's sweep of the slot tables the engine's graphs read (``bench/slot_attention_sweep.py``)
    found the same tiles within 1% of the best in every case once the split count was right, and the split plan below.
    """
    rows = launch.q_len * launch.group_size
    return AttentionTiles(
        block_m=max(16, min(64, next_power_of_2(rows))),
        block_n=64 if launch.head_dim <= 128 else 32,
        num_warps=4,
        num_stages=3,
    )


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_split_plan(name: str) -> None:
    """Chooses how calls without ``num_splits`` split their keys, for side-by-side runs in one process.

    ``resident`` (the default): as many programs as the SMs hold at once, ``_RESIDENT_PER_SM*`` each.
    ``twice_the_sms``: the plan before session 30, at least two programs an SM, whose grids came out a few programs
    larger (288 programs for 8 answers' decode, 85.7 µs a layer on an H200 against 71.5 at 512).
    """
    global _split_plan
    if name not in SPLIT_PLANS:
        raise InvalidArgumentError(f"split plan {name!r} is not one of {SPLIT_PLANS}")
    _split_plan = name


def plan_splits(
    launch: AttentionLaunch, block_m: int, block_n: int, num_splits: int | None, device: torch.device
) -> tuple[int, int]:
    """Picks (num_splits, split_tokens): the most programs the SMs hold at once (``use_split_plan``), splits of
    >= 4 key blocks."""
    max_blocks = max(1, cdiv(launch.max_kv_tokens, block_n))
    if num_splits is None:
        tiles = cdiv(launch.q_len * launch.group_size, block_m) * launch.batch * launch.num_kv_heads
        if _split_plan == "resident":
            per_sm = _RESIDENT_PER_SM_SMALL_TILES if block_m <= 16 else _RESIDENT_PER_SM
            wanted = per_sm * num_sms(device) // tiles
        else:
            wanted = cdiv(2 * num_sms(device), tiles)
        num_splits = max(1, min(wanted, max_blocks // _MIN_SPLIT_BLOCKS, _MAX_SPLITS))
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise InvalidArgumentError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    split_tokens = cdiv(max_blocks, num_splits) * block_n
    return cdiv(max(launch.max_kv_tokens, 1), split_tokens), split_tokens
