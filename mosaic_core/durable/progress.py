"""How far a restart's restore has come, logged while it runs.

Hundreds of streams with terabytes of records take minutes to read back and reopen, and a worker whose log says
nothing meanwhile looks hung. ``RestoreProgress`` counts the streams a pass has been through, with their cluster
records and bytes, and logs a line at most every ``PROGRESS_INTERVAL_S`` while streams remain. A caller may also
watch each step (``on_step``): a service's worker tells its router, which waits for it, that it is still moving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 10.0  # between two progress lines of one pass; read at each step


class RestoreProgress:
    """One pass over the streams found at a start (reading them, or reopening them).

    Args:
        doing: what the pass does, for the log ("reading streams", "reopening streams").
        num_streams: the streams the pass goes through.
        on_step: called with this progress after every stream (and once as the pass begins), on the restoring
            thread; it must be quick, and what it raises is the restore's.
    """

    def __init__(self, doing: str, num_streams: int, on_step: Callable[[RestoreProgress], None] | None = None) -> None:
        self.doing = doing
        self.num_streams = num_streams
        self.on_step = on_step
        self.num_done = 0
        self.num_records = 0
        self.num_bytes = 0
        self.started_s = self._logged_s = time.monotonic()
        if on_step is not None:
            on_step(self)

    def step(self, *, num_records: int = 0, num_bytes: int = 0) -> None:
        """One more stream done (restored or not), with the cluster records and bytes of history it holds."""
        self.num_done += 1
        self.num_records += num_records
        self.num_bytes += num_bytes
        if self.on_step is not None:
            self.on_step(self)
        now = time.monotonic()
        if self.num_done < self.num_streams and now - self._logged_s >= PROGRESS_INTERVAL_S:
            self._logged_s = now
            log.info(
                "restoring history, %s: %d of %d done so far, with %d cluster records (%s), in %.1f s",
                self.doing, self.num_done, self.num_streams, self.num_records, size_text(self.num_bytes),
                self.elapsed_s,
            )  # fmt: skip

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_s


def size_text(num_bytes: int) -> str:
    """``num_bytes`` for a person: 3.2 GiB, 512.0 KiB."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
