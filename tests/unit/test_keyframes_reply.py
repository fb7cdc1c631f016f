"""GetKeyframes' reply against the server's message limit, with real JPEG keyframes of bikes.mp4: a reply too large
for gRPC to send is refused with a sentence that says how many keyframes fit, not with gRPC's own refusal."""

from __future__ import annotations

import pytest

from mosaic_core.engine.keyframes import Keyframe, encode_jpeg
from mosaic_core.engine.thumbnails import thumbnail
from mosaic_core.errors import CapacityError
from services.convert import keyframes_response


@pytest.fixture(scope="module")
def keyframes(bikes_frames) -> list[Keyframe]:
    kept = []
    for index, (timestamp_s, rgb) in enumerate(bikes_frames[:8]):
        small = thumbnail(rgb, 1024)
        jpeg = encode_jpeg(small, 95)
        kept.append(Keyframe(f"cam/f{index}", "cam", "cam/c000000", index, timestamp_s, jpeg, small.shape[1],
                             small.shape[0]))  # fmt: skip
    return kept


def test_a_reply_within_the_limit_carries_every_keyframe(keyframes):
    reply = keyframes_response(keyframes, max_bytes=16 * 2**20)
    assert [k.id for k in reply.keyframes] == [k.keyframe_id for k in keyframes]
    assert reply.keyframes[3].jpeg == keyframes[3].jpeg


def test_a_reply_over_the_limit_says_how_many_fit(keyframes):
    whole = keyframes_response(keyframes).ByteSize()
    three = keyframes_response(keyframes[:3]).ByteSize()
    with pytest.raises(CapacityError, match=r"the 8 keyframes asked for .* ask for at most 3 of them at a time"):
        keyframes_response(keyframes, max_bytes=three + 10)
    assert whole > three + 10
    with pytest.raises(CapacityError, match="even one is larger than that"):
        keyframes_response(keyframes, max_bytes=1024)
