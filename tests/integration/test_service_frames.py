"""Frame payloads (JPEG, PNG, raw), error mapping and service configuration."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mosaic_core.errors import (
    AlreadyExistsError,
    ConfigError,
    InvalidFrameError,
    OutOfRangeError,
    UnknownStreamError,
)
from mosaic_core.model.video import iter_video_frames, sample_clip_path
from services.config import load_config
from services.errors import status_for
from services.frames import decode_frame, decode_image, decode_raw, encode_image
from services.gen.mosaic.v1 import mosaic_pb2 as pb


@pytest.fixture(scope="module")
def clip_frame() -> np.ndarray:
    return next(iter(iter_video_frames(sample_clip_path("carphone_pristine.mp4"), fps=1.0, max_frames=1))).rgb


def test_png_round_trips_exactly_and_jpeg_closely(clip_frame):
    assert np.array_equal(decode_image(encode_image(clip_frame, "png")), clip_frame)
    jpeg = decode_image(encode_image(clip_frame, "jpeg"))
    assert jpeg.shape == clip_frame.shape
    assert np.abs(jpeg.astype(int) - clip_frame.astype(int)).mean() < 6  # a real photo compresses well


def test_raw_frames_are_checked_against_their_shape(clip_frame):
    h, w, _ = clip_frame.shape
    message = pb.Frame(stream_id="a", raw=pb.RawFrame(rgb=clip_frame.tobytes(), height=h, width=w, channels=3))
    assert np.array_equal(decode_frame(message), clip_frame)
    with pytest.raises(InvalidFrameError, match="needs"):
        decode_raw(clip_frame.tobytes()[:-1], height=h, width=w, channels=3)
    with pytest.raises(InvalidFrameError, match="channels"):
        decode_raw(clip_frame.tobytes(), height=h, width=w, channels=4)


@pytest.mark.parametrize(
    "payload",
    [b"", b"GIF89a....", b"\xff\xd8\xff" + b"\x00garbage" * 20, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "gif", "corrupt-jpeg", "corrupt-png"],
)
def test_corrupt_or_unknown_images_are_invalid_frames(payload):
    with pytest.raises(InvalidFrameError):
        decode_frame(pb.Frame(stream_id="a", encoded=payload))


def test_frame_without_payload_is_invalid():
    with pytest.raises(InvalidFrameError, match="no payload"):
        decode_frame(pb.Frame(stream_id="a", timestamp_s=1.0))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidFrameError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownStreamError("nope"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExistsError("dup"), grpc.StatusCode.ALREADY_EXISTS),
        (OutOfRangeError("old"), grpc.StatusCode.OUT_OF_RANGE),
        (ZeroDivisionError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_status_codes_with_a_sentence(error, code):
    status = status_for(error)
    assert status.code == code
    assert status.message.endswith(".")
    if code == grpc.StatusCode.INTERNAL:
        assert "bug" not in status.message and "incident" in status.message  # internals stay in the log


def test_config_layers_file_environment_and_flags(tmp_path, monkeypatch):
    path = tmp_path / "serve.yaml"
    path.write_text("workers: 3\nmode: token\nengine:\n  target_tokens_per_frame: 32\n  eviction_policy: heat\n")
    monkeypatch.setenv("MOSAIC_API_KEY", "from-env")
    config = load_config(path, mode="full", host=None)
    assert (config.workers, config.mode, config.api_key, config.host) == (3, "full", "from-env", "127.0.0.1")
    engine = config.engine_config(worker_subdir="worker-0")
    assert engine.target_tokens_per_frame == 32 and engine.eviction_policy == "heat"
    assert engine.formation.max_tokens <= engine.retrieval_budget_tokens


@pytest.mark.parametrize(
    "overrides",
    [{"workers": 0}, {"tls_cert": "cert.pem"}, {"disk_budget_bytes": 10}, {"no_such_option": 1}],
    ids=["workers", "tls-pair", "disk-dir", "unknown"],
)
def test_bad_config_is_a_config_error_naming_the_value(overrides):
    with pytest.raises(ConfigError, match="invalid service config"):
        load_config(None, **overrides)
