"""The vision attention's chunk plans are built once per frame grid and batch size, even when an ingest call runs
the tower for several geometries in turn, and from the host's bounds, never read back from the device; a new batch
size's tower inputs equal transformers' own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from mosaic_core.model import vision_attention
from mosaic_core.model.geometry import choose_geometry
from mosaic_core.model.presets import preset_config_kwargs
from mosaic_core.model.vision_tower import TowerInputs


def test_three_geometries_in_turn_reuse_their_chunk_plans(tiny_model):
    rng = np.random.default_rng(0)
    sizes = [(272, 640), (144, 176), (720, 1280)]  # the three sample clips' frames: three geometries
    geometries = [tiny_model.choose_geometry(h, w, 16) for h, w in sizes]
    assert len(set(geometries)) == 3

    def one_call():
        for (h, w), geometry in zip(sizes, geometries, strict=True):
            tiny_model.encode_frames(rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8), geometry)

    one_call()
    plans = [(id(tensor), id(plan)) for tensor, plan in vision_attention._recent_plans]
    assert len(plans) >= 4  # at least two distinct grids, each with a window and a frame plan
    one_call()
    assert [(id(tensor), id(plan)) for tensor, plan in vision_attention._recent_plans] == plans


def test_a_new_batch_size_has_its_chunk_plans_before_the_tower_runs(tiny_model):
    """``TowerInputs`` builds the plans from the host's bounds, so the attention never reads them back from the
    device (a wait for everything queued) when a call brings a batch size not seen before."""
    geometry = tiny_model.choose_geometry(272, 640, 16)
    inputs = tiny_model.tower_inputs.get(geometry, 37, tiny_model.device)  # a size no other test uses
    for name in ("cu_seqlens", "cu_window_seqlens"):
        tensor = inputs[name]
        kept = [plan for kept_tensor, plan in vision_attention._recent_plans if kept_tensor is tensor]
        assert len(kept) == 1, name
        rebuilt = vision_attention.remember_plan(tensor.clone(), tensor.tolist())
        assert [length for length, _ in kept[0]] == [length for length, _ in rebuilt]
        for (_, index), (_, expected) in zip(kept[0], rebuilt, strict=True):
            assert (index is None and expected is None) or bool((index == expected).all())


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-vl-7b"])
@pytest.mark.parametrize("num_frames", [1, 2, 37, 128])
def test_tower_inputs_of_frames_alike_equal_transformers_loop_over_frames(preset, num_frames):
    config = Qwen2_5_VLConfig(**preset_config_kwargs(preset)).vision_config
    visual = SimpleNamespace(config=config)
    for height, width in ((272, 640), (144, 176), (720, 1280)):
        geometry = choose_geometry(
            height, width, target_tokens=128, patch_size=config.patch_size, merge_size=config.spatial_merge_size
        )
        grid_thw = torch.tensor([[1, geometry.grid_h, geometry.grid_w]] * num_frames)
        expected_index, expected_bounds = get_vision_window_index(
            grid_thw, spatial_merge_size=config.spatial_merge_size, window_size=config.window_size,
            patch_size=config.patch_size,
        )  # fmt: skip
        index, bounds, positions = TowerInputs(visual)._frames_alike(geometry, num_frames)
        assert torch.equal(index, expected_index) and index.dtype == expected_index.dtype
        assert torch.equal(bounds, expected_bounds) and bounds.dtype == expected_bounds.dtype
        assert torch.equal(positions, get_vision_position_ids(grid_thw, config.spatial_merge_size))


def test_a_tower_on_another_stream_gets_inputs_made_on_that_stream(tiny_model):
    """An entry is freed in the order of the stream it was made on, so a tower queued on another stream (the tower
    stream, or a second engine's) must not share it: its memory could be handed out on the first stream while
    that tower still reads it. On the CPU there is one entry per grid and size."""
    geometry = tiny_model.choose_geometry(272, 640, 16)
    device = tiny_model.device
    first = tiny_model.tower_inputs.get(geometry, 41, device)  # a size no other test uses
    assert tiny_model.tower_inputs.get(geometry, 41, device) is first
    if device.type != "cuda":
        return
    with torch.cuda.stream(torch.cuda.Stream(device)):
        other = tiny_model.tower_inputs.get(geometry, 41, device)
        assert tiny_model.tower_inputs.get(geometry, 41, device) is other
    assert other is not first
    for name in ("cu_seqlens", "cu_window_seqlens", "position_ids", "window_index"):
        assert torch.equal(other[name], first[name]), name
    assert tiny_model.tower_inputs.get(geometry, 41, device) is first
