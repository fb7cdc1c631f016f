"""What the commands print: model text escaped for the terminal, evidence times, progress lines."""

from __future__ import annotations

import io

import pytest

from mosaic_core.terminal import Progress, escape_for_terminal, format_span, iso_time

LIVE_START_S = 1_796_133_300.0  # 2026-12-01T13:55:00Z


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain words", "plain words"),
        ("介绍介绍", "介绍介绍"),
        ("line\nbreak", "line\\nbreak"),
        ("\r\t", "\\r\\t"),
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear screen, cursor home
        ("bell\x07", "bell\\x07"),
        ("\x9b", "\\x9b"),  # C1 control sequence introducer
        ("\u202etxt", "\\u202etxt"),  # right-to-left override
    ],
)
def test_escape_for_terminal(text, shown):
    assert escape_for_terminal(text) == shown


@pytest.mark.parametrize(
    ("start_s", "end_s", "stream_start_s", "shown"),
    [
        (2.0, 5.5, None, "2.00s-5.50s"),
        (2.0, 2.0, None, "2.00s"),  # one frame: its time once
        (LIVE_START_S + 12, LIVE_START_S + 15, LIVE_START_S, "12.00s-15.00s (2026-12-01T13:55:12.0Z-13:55:15.0Z)"),
        (LIVE_START_S + 3, LIVE_START_S + 3, LIVE_START_S, "3.00s (2026-12-01T13:55:03.0Z)"),
        (LIVE_START_S + 3, LIVE_START_S + 4, None, "2026-12-01T13:55:03.0Z-13:55:04.0Z"),  # start unknown
    ],
)
def test_format_span(start_s, end_s, stream_start_s, shown):
    assert format_span(start_s, end_s, stream_start_s=stream_start_s) == shown


def test_iso_time_is_utc():
    assert iso_time(0.25) == "1970-01-01T00:00:00.2Z"


def test_progress_prints_plain_lines_with_an_eta_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress("fidelity", 4, stream=out, every_s=0.0)
    for done in range(5):
        progress.update(done, "mode cluster")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "\r" not in out.getvalue()
    assert lines[0].startswith("fidelity 0/4 ETA --")
    assert lines[2].startswith("fidelity 2/4 ETA ") and lines[2].endswith("(mode cluster)")
    assert lines[-1].startswith("fidelity 4/4 done")


def test_progress_throttles_plain_lines():
    out = io.StringIO()
    progress = Progress("push", 100, stream=out, every_s=3600)
    for done in range(101):
        progress.update(done)
    assert len(out.getvalue().splitlines()) == 2  # the first line and the last
