"""ListStreams by pages: stream-id order, a token that resumes after the page before, and a reply past the server's
message limit refused with a sentence saying what page size fits."""

from __future__ import annotations

import pytest

from mosaic_core.errors import CapacityError, InvalidArgumentError
from services.convert import streams_page
from services.metadata import StreamRecord
from services.worker_results import StreamInfo


def _info(stream_id: str, label_chars: int = 0) -> StreamInfo:
    labels = {f"k{i}": "v" * label_chars for i in range(8)} if label_chars else {}
    record = StreamRecord(stream_id=stream_id, fps=1.0, labels=labels)
    return StreamInfo(record, 0, 0, 0, 0, {}, {}, None, None, 0.0, 0, 0, "")


def _ids(reply) -> list[str]:
    return [s.stream_id for s in reply.streams]


def test_pages_follow_stream_id_order_and_end_with_an_empty_token():
    infos = [_info(name) for name in ("gate-3", "dock", "gate-1", "yard", "gate-2")]
    first = streams_page(infos, page_size=2, page_token="")
    assert (_ids(first), first.next_page_token) == (["dock", "gate-1"], "gate-1")
    second = streams_page(infos, page_size=2, page_token=first.next_page_token)
    assert (_ids(second), second.next_page_token) == (["gate-2", "gate-3"], "gate-3")
    last = streams_page(infos, page_size=2, page_token=second.next_page_token)
    assert (_ids(last), last.next_page_token) == (["yard"], "")


def test_page_size_zero_lists_every_stream_in_one_reply():
    infos = [_info(name) for name in ("b", "a", "c")]
    reply = streams_page(infos, page_size=0, page_token="")
    assert (_ids(reply), reply.next_page_token) == (["a", "b", "c"], "")


def test_a_stream_deleted_between_pages_does_not_shift_the_next_page():
    infos = [_info(name) for name in ("a", "b", "c", "d")]
    first = streams_page(infos, page_size=2, page_token="")
    after_delete = [info for info in infos if info.record.stream_id != "b"]  # the token's own stream is gone
    assert _ids(streams_page(after_delete, page_size=2, page_token=first.next_page_token)) == ["c", "d"]


@pytest.mark.parametrize(
    ("page_size", "page_token", "named"),
    [(-1, "", "page_size -1 is negative"), (0, "../etc", "page_token '../etc' is not one this server gives")],
)
def test_a_bad_page_request_is_an_invalid_argument_naming_it(page_size, page_token, named):
    with pytest.raises(InvalidArgumentError, match=named):
        streams_page([_info("a")], page_size=page_size, page_token=page_token)


def test_a_reply_past_the_message_limit_says_what_page_size_fits():
    infos = [_info(f"cam-{i:03d}", label_chars=200) for i in range(40)]
    whole = streams_page(infos, page_size=0, page_token="").ByteSize()
    limit = whole // 4
    with pytest.raises(CapacityError, match=r"the 40 streams asked for come to .* MiB \(max_message_bytes\)") as err:
        streams_page(infos, page_size=0, page_token="", max_bytes=limit)
    fit = int(str(err.value).rsplit("at most ", 1)[1])
    assert 5 <= fit < 10, err.value
    page = streams_page(infos, page_size=fit, page_token="", max_bytes=limit)  # the advice works
    assert len(page.streams) == fit and page.ByteSize() <= limit
    with pytest.raises(CapacityError, match="even one stream is larger than that"):
        streams_page(infos, page_size=1, page_token="", max_bytes=100)
