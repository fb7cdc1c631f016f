"""Frames decoded at the size the model needs: a 720p or 4K camera's pictures are scaled down as they are decoded,
aspect ratio kept, so that their geometry, and so their tokens, are those of the full-size picture."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosaic_core.errors import InvalidArgumentError
from mosaic_core.model.geometry import choose_geometry, downscaled_size, model_pixels
from mosaic_core.model.video import iter_video_frames, sample_clip_path
from services.config import ServiceConfig
from services.frames import decode_frame, encode_image, jpeg_lowres
from services.gen.mosaic.v1 import mosaic_pb2 as pb

CAP = 4 * model_pixels(128)  # 401,408: the service's default at 128 tokens a frame
CAMERA_SIZES = [(720, 1280), (1080, 1920), (2160, 3840), (576, 704), (1080, 1440), (1944, 2592), (1080, 3840)]


@pytest.mark.parametrize(("height", "width"), CAMERA_SIZES)
def test_a_scaled_down_size_keeps_the_geometry_and_fits_the_cap(height, width):
    scaled = downscaled_size(height, width, CAP)
    assert scaled[0] * scaled[1] <= CAP < height * width
    assert abs(scaled[1] / scaled[0] - width / height) < 0.005 * width / height
    assert choose_geometry(*scaled, target_tokens=128) == choose_geometry(height, width, target_tokens=128)


def test_small_frames_and_no_cap_keep_their_size():
    assert downscaled_size(272, 640, CAP) == (272, 640)
    assert downscaled_size(2160, 3840, None) == (2160, 3840)


def test_a_720p_clip_decodes_scaled_down_to_what_a_full_size_frame_resizes_to():
    clip = sample_clip_path("bigbuckbunny.mp4")  # 1280 x 720
    full = list(itertools.islice(iter_video_frames(clip, fps=1.0), 3))
    small = list(itertools.islice(iter_video_frames(clip, fps=1.0, max_pixels=CAP), 3))
    assert [f.timestamp_s for f in small] == [f.timestamp_s for f in full]
    for big, little in zip(full, small, strict=True):
        assert little.rgb.shape == (*downscaled_size(720, 1280, CAP), 3) and little.rgb.dtype == np.uint8
        assert little.rgb.flags.c_contiguous
        resized = F.interpolate(torch.from_numpy(big.rgb).permute(2, 0, 1)[None].float(), size=little.rgb.shape[:2],
                                mode="area")[0].permute(1, 2, 0)  # fmt: skip
        assert (resized - torch.from_numpy(little.rgb).float()).abs().mean() < 3.0  # of 255: the same picture


def test_a_clip_smaller_than_the_cap_decodes_unchanged():
    clip = sample_clip_path("bikes.mp4")  # 640 x 272
    full = next(iter_video_frames(clip, fps=1.0))
    capped = next(iter_video_frames(clip, fps=1.0, max_pixels=CAP))
    assert np.array_equal(full.rgb, capped.rgb)


def test_a_cap_that_is_not_a_positive_integer_is_refused():
    with pytest.raises(InvalidArgumentError, match="max_pixels"):
        next(iter_video_frames(sample_clip_path("bikes.mp4"), fps=1.0, max_pixels=0))


@pytest.mark.parametrize("payload", ["encoded", "raw"])
def test_pushed_frames_are_scaled_down_as_they_are_decoded(payload):
    rgb = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
    if payload == "encoded":
        frame = pb.Frame(stream_id="cam", timestamp_s=0.0, encoded=encode_image(rgb))
    else:
        frame = pb.Frame(stream_id="cam", timestamp_s=0.0, raw=pb.RawFrame(rgb=rgb.tobytes(), height=720, width=1280,
                                                                           channels=3))  # fmt: skip
    assert decode_frame(frame).shape == (720, 1280, 3)
    scaled = decode_frame(frame, CAP)
    assert scaled.shape == (*downscaled_size(720, 1280, CAP), 3) and scaled.flags.c_contiguous


def test_a_4k_jpeg_is_decoded_at_a_quarter_of_its_size_to_the_same_picture():
    """FFmpeg's reduced-size JPEG decoding, where a quarter of each side still has the pixels the cap keeps."""
    small = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (36, 64, 3), dtype=np.uint8))
    picture = F.interpolate(small.permute(2, 0, 1)[None].float(), size=(2160, 3840), mode="bilinear")[0]
    picture = picture.permute(1, 2, 0).round().to(torch.uint8).numpy()
    frame = pb.Frame(stream_id="cam", timestamp_s=0.0, encoded=encode_image(picture))
    assert jpeg_lowres(frame.encoded, CAP) == 2 and jpeg_lowres(frame.encoded, None) == 0
    assert jpeg_lowres(encode_image(picture[:1080, :1920]), CAP) == 0  # a quarter of 1080p is under the cap
    scaled = decode_frame(frame, CAP)
    assert scaled.shape[0] * scaled.shape[1] <= CAP
    assert choose_geometry(*scaled.shape[:2], target_tokens=128) == choose_geometry(2160, 3840, target_tokens=128)
    full_size = F.interpolate(torch.from_numpy(decode_frame(frame)).permute(2, 0, 1)[None].float(),
                              size=scaled.shape[:2], mode="area")[0].permute(1, 2, 0)  # fmt: skip
    assert (full_size - torch.from_numpy(scaled).float()).abs().mean() < 4.0  # of 255: the same picture


def test_the_service_caps_decoded_pixels_by_its_tokens_a_frame():
    assert ServiceConfig().decode_max_pixels() == 4 * model_pixels(64)  # the service's default: 64 tokens
    assert ServiceConfig(engine={"target_tokens_per_frame": 128}).decode_max_pixels() == CAP
    assert ServiceConfig(decode_oversample=0).decode_max_pixels() is None
