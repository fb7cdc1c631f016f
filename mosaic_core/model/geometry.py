"""The size a stream's frames are resized to, and the patch grid that follows from it (Qwen2-VL / Qwen2.5-VL).

``choose_geometry`` picks a frame size near a target of LLM tokens per frame for a source's aspect ratio;
``largest_frame_tokens`` bounds what it gives any source (the KV arena's page length), and ``downscaled_size``
shrinks a source ahead of decoding without changing its geometry. The resizing and patching are ``pixels``'s.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from mosaic_core.errors import ConfigError

NUM_CHANNELS = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class VisionGeometry:
    """The size every frame of a stream is resized to, and the patch grid that follows from it.

    Attributes:
        patch_size: side of one vision patch in pixels.
        temporal_patch_size: frames stacked into one patch along time.
        spatial_merge_size: side of the window of patches merged into one LLM token.
        height_px: resized frame height; a multiple of ``patch_size * spatial_merge_size``.
        width_px: resized frame width; a multiple of ``patch_size * spatial_merge_size``.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    height_px: int
    width_px: int

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "spatial_merge_size", "height_px", "width_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"VisionGeometry.{name} must be a positive integer, got {value!r}.")
        factor = self.patch_size * self.spatial_merge_size
        if self.height_px % factor or self.width_px % factor:
            raise ConfigError(
                f"VisionGeometry height_px={self.height_px} and width_px={self.width_px} must both be "
                f"multiples of patch_size * spatial_merge_size = {self.patch_size} * "
                f"{self.spatial_merge_size} = {factor}."
            )

    @property
    def grid_h(self) -> int:
        """Patch rows of one frame."""
        return self.height_px // self.patch_size

    @property
    def grid_w(self) -> int:
        """Patch columns of one frame."""
        return self.width_px // self.patch_size

    @property
    def num_patches_per_frame(self) -> int:
        """Rows of ``pixel_values_videos`` per frame."""
        return self.grid_h * self.grid_w

    @property
    def patch_dim(self) -> int:
        """Columns of ``pixel_values_videos``: channel * temporal * patch * patch values."""
        return NUM_CHANNELS * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens one frame turns into, after the spatial merge."""
        return self.grid_h * self.grid_w // self.spatial_merge_size**2

    @property
    def llm_grid_h(self) -> int:
        """Rows of the frame's LLM token grid (what M-RoPE's height axis counts)."""
        return self.grid_h // self.spatial_merge_size

    @property
    def llm_grid_w(self) -> int:
        """Columns of the frame's LLM token grid (what M-RoPE's width axis counts)."""
        return self.grid_w // self.spatial_merge_size


def choose_geometry(
    src_height: int,
    src_width: int,
    *,
    target_tokens: int,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> VisionGeometry:
    """Picks the resized frame size for a source of ``src_height`` x ``src_width`` pixels.

    The choice is over LLM token grids ``rows x cols``, each token ``patch_size * merge_size`` pixels a side.
    It minimises ``2 * |log(tokens / target)| + |log(aspect / source aspect)|``: the token count weighs twice
    as much as the aspect ratio, because it sets the KV budget, yet a 4:3 source is not squashed to 2:1 just
    to hit a power of two exactly. Ties go to the count nearer the target, then to fewer rows.

    Examples with ``target_tokens=128``: 640x360 -> 224x448 (8 x 16 = 128 tokens), 176x144 -> 280x364
    (10 x 13 = 130 tokens).

    Raises:
        ConfigError: a size or the target is not a positive integer.
    """
    for name, value in (
        ("src_height", src_height),
        ("src_width", src_width),
        ("target_tokens", target_tokens),
        ("patch_size", patch_size),
        ("merge_size", merge_size),
        ("temporal_patch_size", temporal_patch_size),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"choose_geometry: {name} must be a positive integer, got {value!r}.")
    src_aspect = src_width / src_height
    best_key: tuple[float, int, int] | None = None
    best_rows_cols = (1, 1)
    for rows, cols in _candidate_grids(target_tokens):
        tokens = rows * cols
        cost = 2 * abs(math.log(tokens / target_tokens)) + abs(math.log(cols / rows / src_aspect))
        key = (round(cost, 12), abs(tokens - target_tokens), rows)
        if best_key is None or key < best_key:
            best_key, best_rows_cols = key, (rows, cols)
    unit_px = patch_size * merge_size
    rows, cols = best_rows_cols
    return VisionGeometry(
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        spatial_merge_size=merge_size,
        height_px=rows * unit_px,
        width_px=cols * unit_px,
    )


def _candidate_grids(target_tokens: int) -> list[tuple[int, int]]:
    """The ``rows x cols`` token grids ``choose_geometry`` weighs. For fixed rows its cost is piecewise linear in
    log(cols), steepest around target/rows: the best integer cols is one of its two neighbours."""
    grids = []
    for rows in range(1, target_tokens + 1):
        # a set, iterated as before the candidates moved here: an exact tie keeps the grid it chose
        for cols in {max(1, target_tokens // rows), max(1, math.ceil(target_tokens / rows))}:
            grids.append((rows, cols))
    return grids


@functools.cache
def largest_frame_tokens(target_tokens: int) -> int:
    """The most tokens ``choose_geometry`` gives a frame of any size at ``target_tokens``: 66 at 64 (a 16:9
    camera's frame), 133 at 128. A page of the KV arena this long holds any frame whole, where a page of
    ``target_tokens`` would give a frame a token over it a second page, nearly empty.

    Each grid's cost is ``k + |x - x_g|`` in the source's log aspect ``x``: a cone of slope 1 with its apex at the
    grid's own log aspect ``x_g``, where it costs ``k = 2 |log(tokens / target)|``. Cones of equal slopes have this
    property: one that is lowest anywhere is lowest at its own apex. So a grid is chosen for some source exactly when
    no other grid costs less at its apex (ties count as chosen: the result is never below the truth). The lowest
    cost at every apex comes from one pass over the apexes in order each way."""
    if not isinstance(target_tokens, (int, np.integer)) or target_tokens < 1:
        raise ConfigError(f"largest_frame_tokens: target_tokens must be a positive integer, got {target_tokens!r}.")
    grids = sorted((math.log(cols / rows), 2 * abs(math.log(rows * cols / target_tokens)), rows * cols)
                   for rows, cols in _candidate_grids(int(target_tokens)))  # fmt: skip
    lowest = [cost for _, cost, _ in grids]
    for order in (range(1, len(grids)), range(len(grids) - 2, -1, -1)):
        for i in order:
            before = i - 1 if order.step == 1 else i + 1
            lowest[i] = min(lowest[i], lowest[before] + abs(grids[i][0] - grids[before][0]))
    return max(tokens for (_, cost, tokens), low in zip(grids, lowest, strict=True) if cost <= low + 1e-9)


def model_pixels(target_tokens: int, *, patch_size: int = 14, merge_size: int = 2) -> int:
    """Pixels of the frame the model takes at ``target_tokens`` a frame, whatever its aspect ratio: each LLM token
    covers ``(patch_size * merge_size)^2`` of them (100,352 for 128 tokens of Qwen2.5-VL's 28x28)."""
    return target_tokens * (patch_size * merge_size) ** 2


def downscaled_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """``(height, width)`` scaled down, aspect ratio kept, to at most ``max_pixels`` pixels; unchanged when it has
    no more than that or ``max_pixels`` is None. ``choose_geometry`` reads only the aspect ratio, so a source keeps
    its geometry (``tests/unit/test_video_downscale.py`` checks common camera sizes).

    1280x720, 401,408 px  ->  844x475 (height 475, width 844)
    """
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
