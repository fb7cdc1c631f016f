"""Frames to Qwen2-VL vision inputs, checked against transformers' own processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.errors import ConfigError, EmptyBatchError, InvalidFrameError
from mosaic_core.model.geometry import VisionGeometry, choose_geometry
from mosaic_core.model.pixels import CLIP_MEAN, CLIP_STD, frames_to_vision_input, resize_frames, validate_frames

GEOMETRY = VisionGeometry(height_px=56, width_px=84)  # 4 x 6 patches, 2 x 3 merge windows


def random_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)


def normalised(frames: np.ndarray) -> torch.Tensor:
    """[N, 3, H, W] float32, normalised the way the transformers torch backend does."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
    return (pixels - mean) / std


def video_processor_patchify(videos: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """Transcribed from transformers' Qwen2VLVideoProcessor.patchify (which needs torchvision to import)."""
    batch, num_frames, channels, height, width = videos.shape
    if pad := -num_frames % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // temporal, height // patch, width // patch
    patches = videos.reshape(
        batch, grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(batch * grid_t * grid_h * grid_w, channels * temporal * patch * patch)


def test_matches_transformers_pil_image_processor() -> None:
    pil_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    frames = random_frames(3, 100, 150)
    vision = frames_to_vision_input(frames, GEOMETRY)
    resized = resize_frames(validate_frames(frames), GEOMETRY).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    processor = pil_module.Qwen2VLImageProcessorPil()
    # One image is what a one-frame video becomes: the processor repeats it temporal_patch_size times.
    expected = processor(images=list(resized), do_resize=False, return_tensors="np")
    np.testing.assert_array_equal(vision.video_grid_thw.numpy(), expected["image_grid_thw"])
    assert vision.pixel_values_videos.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(vision.pixel_values_videos.numpy(), expected["pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    ],
)
def test_matches_transformers_video_processor_end_to_end(device: str) -> None:
    pytest.importorskip("torchvision", reason="the transformers video processor needs torchvision")
    from transformers.image_utils import SizeDict
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    geometry = VisionGeometry(height_px=224, width_px=420)  # a non-integer downscale from 360x640

    class FixedSizeProcessor(Qwen2VLVideoProcessor):
        def resize(self, videos, size, resample, factor, **kwargs):  # skip smart_resize, keep the resampling
            target = SizeDict(height=geometry.height_px, width=geometry.width_px)
            return super(Qwen2VLVideoProcessor, self).resize(image=videos, size=target, resample=resample)

    frames = random_frames(3, 360, 640, seed=3)
    videos = [torch.from_numpy(frame[None]).permute(0, 3, 1, 2) for frame in frames]
    expected = FixedSizeProcessor()(
        videos=videos, do_sample_frames=False, cap_pixels_per_frame=False, device=device, return_tensors="pt"
    )
    vision = frames_to_vision_input(frames, geometry, device=device)
    assert torch.equal(vision.video_grid_thw.cpu(), expected["video_grid_thw"].cpu())
    torch.testing.assert_close(
        vision.pixel_values_videos, expected["pixel_values_videos"].to(device), rtol=0, atol=1e-5
    )


def test_matches_video_processor_layout_exactly() -> None:
    frames = random_frames(2, 56, 84, seed=1)  # already the geometry's size: no resize
    vision = frames_to_vision_input(frames, GEOMETRY)
    videos = normalised(frames)[:, None]  # each frame a video of one frame
    expected = video_processor_patchify(videos, patch=14, merge=2, temporal=2)
    torch.testing.assert_close(vision.pixel_values_videos, expected, rtol=0, atol=0)


def test_grid_and_patch_order() -> None:
    frames = random_frames(2, 56, 84, seed=2)
    vision = frames_to_vision_input(frames, GEOMETRY)
    assert vision.video_grid_thw.dtype == torch.long
    assert vision.video_grid_thw.tolist() == [[1, 4, 6], [1, 4, 6]]
    assert vision.pixel_values_videos.shape == (2 * 24, 3 * 2 * 14 * 14)
    pixels = normalised(frames)

    def patch(frame: int, row: int, col: int) -> torch.Tensor:
        return pixels[frame, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14]  # [3, 14, 14]

    rows = vision.pixel_values_videos.reshape(2, 24, 3, 2, 14, 14)  # [frame, row, C, T, p, p]
    for temporal in range(2):  # both temporal copies hold the same frame
        torch.testing.assert_close(rows[0, 0, :, temporal], patch(0, 0, 0), rtol=0, atol=0)
    # One 2x2 merge window is 4 consecutive rows; the next window starts two patch columns right.
    window_order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for index, (row, col) in enumerate(window_order):
        torch.testing.assert_close(rows[1, index, :, 1], patch(1, row, col), rtol=0, atol=0)
    # After the first row of windows (3 windows = 12 patches) comes patch row 2.
    torch.testing.assert_close(rows[1, 12, :, 0], patch(1, 2, 0), rtol=0, atol=0)


def test_resize_is_a_bicubic_antialiased_downscale() -> None:
    flat = np.full((1, 280, 420, 3), 77, dtype=np.uint8)
    resized = resize_frames(flat, GEOMETRY)
    assert resized.shape == (1, 3, 56, 84)
    assert torch.all(resized == 77)  # a flat colour stays exactly flat through resize and rounding


def test_dtype_and_single_frame() -> None:
    vision = frames_to_vision_input(random_frames(1, 60, 60)[0], GEOMETRY, dtype=torch.bfloat16)
    assert vision.pixel_values_videos.dtype == torch.bfloat16
    assert vision.video_grid_thw.tolist() == [[1, 4, 6]]


@pytest.mark.parametrize(
    ("frames", "error", "words"),
    [
        (np.zeros((2, 8, 8, 3), dtype=np.float32), InvalidFrameError, "uint8"),
        (np.zeros((8, 8), dtype=np.uint8), InvalidFrameError, "rank 2"),
        (np.zeros((1, 8, 8, 4), dtype=np.uint8), InvalidFrameError, "3 RGB channels"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), EmptyBatchError, "empty"),
        (np.zeros((1, 0, 8, 3), dtype=np.uint8), InvalidFrameError, "empty side"),
        (np.zeros((1, 8193, 1, 3), dtype=np.uint8), InvalidFrameError, "8192"),
        ([[0, 0, 0]], InvalidFrameError, "numpy array"),
    ],
)
def test_validate_frames_rejects(frames: np.ndarray, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        validate_frames(frames)


def test_validate_frames_makes_contiguous_copy_of_flipped_view() -> None:
    frames = random_frames(1, 4, 4)
    bgr_view = frames[..., ::-1]
    out = validate_frames(bgr_view)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, bgr_view)


@pytest.mark.parametrize(("height", "width"), [(360, 640), (144, 176), (480, 640), (1080, 1920), (640, 360)])
def test_choose_geometry_near_128_tokens(height: int, width: int) -> None:
    geometry = choose_geometry(height, width, target_tokens=128)
    assert geometry.height_px % 28 == 0 and geometry.width_px % 28 == 0
    assert abs(geometry.tokens_per_frame - 128) <= 128 * 0.05
    aspect_error = (geometry.width_px / geometry.height_px) / (width / height)
    assert 0.8 < aspect_error < 1.25
    assert geometry.tokens_per_frame == geometry.llm_grid_h * geometry.llm_grid_w
    assert choose_geometry(height, width, target_tokens=128) == geometry  # deterministic


def test_choose_geometry_known_sizes() -> None:
    assert choose_geometry(360, 640, target_tokens=128) == VisionGeometry(height_px=224, width_px=448)
    assert choose_geometry(144, 176, target_tokens=128) == VisionGeometry(height_px=280, width_px=364)
    assert choose_geometry(448, 448, target_tokens=64).tokens_per_frame == 64  # 8 x 8, square stays square


def test_geometry_validation() -> None:
    with pytest.raises(ConfigError, match="multiples of"):
        VisionGeometry(height_px=56, width_px=70)
    with pytest.raises(ConfigError, match="positive"):
        VisionGeometry(height_px=0, width_px=56)
    with pytest.raises(ConfigError, match="target_tokens"):
        choose_geometry(360, 640, target_tokens=0)
