"""What the ``mosaic`` commands print: escaped model text, evidence times, and progress lines with an ETA.

Plain Python with no third-party imports: every command, and ``--help``, imports it.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import TextIO

# Timestamps above this are Unix time (2001-09-09 onwards), not seconds since a stream started.
UNIX_TIME_THRESHOLD_S = 1e9
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_for_terminal(text: str) -> str:
    """``text`` with control characters written as escapes, so model output cannot move the cursor or clear
    the screen (random weights emit raw newlines and escape sequences)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0 or 0x2028 <= code <= 0x2029 or 0x202A <= code <= 0x202E:
            out.append(_NAMED_ESCAPES.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


def iso_time(unix_s: float) -> str:
    """``2026-12-01T15:20:03.5Z``: UTC, tenths of a second."""
    moment = datetime.fromtimestamp(unix_s, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{moment.microsecond // 100_000}Z"


def format_span(start_s: float, end_s: float, *, stream_start_s: float | None = None) -> str:
    """One evidence span for people: stream-relative seconds, plus wall-clock time for live streams.

    A stream whose timestamps are Unix time (a pushed or live camera) shows seconds since its first frame
    (``stream_start_s``, when known) and the ISO wall-clock time; a file's stream shows its own seconds. A
    span of one frame shows its time once.

        12.00s-15.00s                                       (a file: stream seconds)
        12.00s-15.00s (2026-12-01T15:20:03.0Z-15:20:06.0Z)  (a live camera that started 12 s before)
        2.00s                                               (one frame)
    """
    live = start_s > UNIX_TIME_THRESHOLD_S
    origin = (stream_start_s or 0.0) if live else 0.0
    if live and stream_start_s is None:
        relative = ""
    elif end_s - start_s < 5e-3:
        relative = f"{start_s - origin:.2f}s"
    else:
        relative = f"{start_s - origin:.2f}s-{end_s - origin:.2f}s"
    if not live:
        return relative
    wall = iso_time(start_s) if end_s - start_s < 5e-3 else f"{iso_time(start_s)}-{iso_time(end_s)[11:]}"
    return f"{relative} ({wall})" if relative else wall


class Progress:
    """Progress of ``total`` steps on ``stream``: a redrawn bar with an ETA on a terminal, plain lines otherwise.

    Plain lines are printed at most every ``every_s`` seconds (and for the last step), so a log file gets a
    readable trail rather than one line per step.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last_line = -float("inf")

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else None
        eta_text = "ETA --" if eta is None else ("done" if done >= self.total else f"ETA {_duration(eta)}")
        text = f"{self.label} {done}/{self.total} {eta_text}, {_duration(elapsed)} elapsed"
        if note:
            text += f" ({note})"
        if self.tty:
            width = 24
            filled = min(width, width * done // self.total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r\x1b[K{self.label} [{bar}] " + text[len(self.label) + 1 :])
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self._last_line >= self.every_s or done >= self.total or done == 0:
            self._last_line = now
            print(text, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
