"""What GetStream and ListStreams show of a stream's source: its URL without the password a camera URL may carry."""

from __future__ import annotations

from services.convert import stream_to_proto
from services.metadata import StreamRecord
from services.worker_results import StreamInfo


def _info(source_url: str | None) -> StreamInfo:
    record = StreamRecord(stream_id="gate", fps=1.0, source_url=source_url)
    return StreamInfo(record, 0, 0, 0, 0, {}, {}, None, None, 0.0, 0, 0, "")


def test_a_source_url_is_shown_without_its_password():
    assert stream_to_proto(_info("rtsp://admin:hunter2@10.0.0.5/live")).source_url == "rtsp://***@10.0.0.5/live"
    assert stream_to_proto(_info("rtsp://10.0.0.5/live")).source_url == "rtsp://10.0.0.5/live"
    assert not stream_to_proto(_info(None)).HasField("source_url")
