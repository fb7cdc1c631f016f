"""Upkeep after an answer (caching what it retrieved on the device, merges and splits) is best effort: when it fails
(here a spill the disk refuses), the answer, whose tokens went out already, still ends with its evidence."""

from __future__ import annotations

import errno
import logging

from mosaic_core.engine.results import Answer
from mosaic_core.engine.tiering import TierManager
from tests.engine.engine_helpers import feed, make_engine


def test_an_answer_ends_with_its_evidence_when_the_upkeep_after_it_fails(tiny_model, bikes_frames, monkeypatch, caplog):
    engine = make_engine(tiny_model)
    engine.open_stream("cam")

    feed(engine, "cam", bikes_frames[:24])

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TierManager, "promote", disk_full)
    with caplog.at_level(logging.ERROR, logger="mosaic_core.engine.questions"):
        events = list(engine.ask("cam", "What moved?", max_new_tokens=2))
    answer = events[-1]
    assert isinstance(answer, Answer) and answer.evidence and len(answer.token_ids) == 2
    assert "caching what it retrieved after a question failed" in caplog.text and "No space left" in caplog.text
    engine.close()
