"""The GIL probe sees a thread that keeps the GIL: its sleeps wake late by about the switch interval."""

from __future__ import annotations

import sys
import threading
import time

from services import gil_probe


def _spin(seconds: float) -> int:
    """Pure Python for ``seconds``: it keeps the GIL until the interpreter makes it switch."""
    count, until = 0, time.perf_counter() + seconds
    while time.perf_counter() < until:
        count += 1
    return count


def test_a_thread_holding_the_gil_makes_the_probe_wake_late(tmp_path):
    path = tmp_path / "gil-test-1.jsonl"
    stop = threading.Event()
    thread = threading.Thread(target=gil_probe.probe, args=(path, stop), daemon=True)
    before_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.02)  # a thread that wants the GIL waits up to 20 ms for the spinner to give it up
    try:
        thread.start()
        time.sleep(1.2)  # a first line, with the GIL free most of the time
        first = gil_probe.read_latest(tmp_path, "test")
        _spin(2.5)
        time.sleep(1.2)  # a line after the spin
        last = gil_probe.read_latest(tmp_path, "test")
    finally:
        sys.setswitchinterval(before_interval)
        stop.set()
        thread.join(5)
    assert first is not None and last is not None and last["wakes"] > first["wakes"]
    share = gil_probe.wait_share(first, last)
    assert share["max_late_ms_so_far"] >= 10  # waited for at least half a 20-ms switch interval
    assert share["share_over_1ms"] > 0
    assert gil_probe.wait_share(last, first) is None  # not a window
