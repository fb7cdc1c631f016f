"""``mosaic serve`` says it is still starting while its workers build their engines and restore their streams: a
start with much history takes minutes, and the workers' own lines stay in Ray's session logs by default."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services import cli
from services.config import load_config


def _notes(config, caplog, *, workers_log_here: bool, wait_s: float) -> list[str]:
    async def starting_for_a_while() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cli.say_while_starting(config, workers_log_here=workers_log_here), wait_s)

    with caplog.at_level(logging.INFO, logger="mosaic.serve"):
        asyncio.run(starting_for_a_while())
    return [r.getMessage() for r in caplog.records if r.name == "mosaic.serve"]


def test_a_long_start_says_every_interval_that_it_is_still_starting_and_where_the_progress_is(caplog, monkeypatch):
    monkeypatch.setattr(cli, "STARTING_NOTE_S", 0.1)
    config = load_config(None, workers=2, worker_start_timeout_s=600)
    notes = _notes(config, caplog, workers_log_here=False, wait_s=0.35)
    assert 2 <= len(notes) <= 3, notes
    assert all(n.startswith("still starting after ") for n in notes)
    assert "2 worker(s) build their engines and restore their streams" in notes[0]
    assert "worker_start_timeout_s=600s" in notes[0] and "Ray's session logs" in notes[0]


def test_a_start_quicker_than_the_interval_says_nothing_more(caplog):
    assert _notes(load_config(None), caplog, workers_log_here=True, wait_s=0.1) == []
