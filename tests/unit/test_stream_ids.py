"""A stream id names a folder of the data directory and starts every keyframe id: only the documented characters,
the whole id."""

from __future__ import annotations

import pytest

from mosaic_core.engine.keyframes import make_keyframe_id, parse_keyframe_id
from mosaic_core.engine.stream import check_stream_id
from mosaic_core.errors import InvalidArgumentError


@pytest.mark.parametrize("stream_id", ["cam", "Gate-2", "lot_3.north", "7", "x" * 128])
def test_a_valid_id_is_kept_and_its_keyframe_ids_parse(stream_id):
    assert check_stream_id(stream_id) == stream_id
    assert parse_keyframe_id(make_keyframe_id(stream_id, 3)) == (stream_id, 3)


@pytest.mark.parametrize("stream_id", ["", ".hidden", "-x", "a/b", "../up", "cam\n", "cam\r", "ca m", "x" * 129, 7])
def test_anything_else_is_refused_with_the_rule(stream_id):
    with pytest.raises(InvalidArgumentError, match="use 1-128 letters, digits"):
        check_stream_id(stream_id)


@pytest.mark.parametrize("stream_id", ["", "-x", "x" * 129, "caf\u00e9", "a\x00b"])
def test_create_stream_refuses_a_bad_id_with_the_same_rule(stream_id):
    # CreateStream's record checks ids as the metadata store does, whose rule allows '/' (cluster ids): the
    # sentence told the client a slash was allowed in a stream id, which every call then refused.
    from services import convert
    from services.gen.mosaic.v1 import mosaic_pb2 as pb

    with pytest.raises(InvalidArgumentError) as refused:
        convert.record_from_request(pb.CreateStreamRequest(stream_id=stream_id))
    with pytest.raises(InvalidArgumentError) as rule:
        check_stream_id(stream_id)
    assert str(refused.value) == str(rule.value)
