"""A stream's labels follow a watch's rules: they travel in every listing, to Redis and into the journals."""

from __future__ import annotations

import pytest

from mosaic_core.errors import InvalidArgumentError
from services import convert
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.labels import MAX_LABELS


def _create(labels: dict) -> pb.CreateStreamRequest:
    return pb.CreateStreamRequest(stream_id="cam", fps=1.0, labels=labels)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, f"at most {MAX_LABELS} labels"),  # 20,000 went through
        ({"site": "v" * 257}, "at most 63 characters and values 256"),
        ({"k" * 64: "v"}, "at most 63 characters"),
        ({"site": "\x1b]0;owned\x07"}, "printable"),  # it reaches operators' terminals and pages
    ],
)
def test_a_streams_labels_past_the_rules_are_refused_with_a_sentence(labels, words):
    with pytest.raises(InvalidArgumentError, match=words):
        convert.record_from_request(_create(labels), max_fps=60.0)


def test_labels_within_the_rules_are_kept():
    labels = {f"k{i}": "north gate, lane 2" for i in range(MAX_LABELS)}
    assert convert.record_from_request(_create(labels), max_fps=60.0).labels == labels


def test_a_new_watchs_labels_follow_the_rules_and_a_stored_one_is_read_back_as_it_was():
    """A watch stored under the older rules (a long label value) still comes back after an upgrade."""
    from services.metadata.watches import decode_watch, encode_watch
    from services.watches_convert import record_from_request
    from services.watches_spec import WatchRecord

    request = pb.CreateWatchRequest(question="Is a truck at the gate?", labels={"note": "v" * 300})
    with pytest.raises(InvalidArgumentError, match="values 256"):
        record_from_request(request, default_threshold=0.0, default_cooldown_s=60.0)
    stored = WatchRecord(watch_id="w", question="Is a truck at the gate?", labels={"note": "v" * 300})
    assert decode_watch(encode_watch(stored)) == stored
