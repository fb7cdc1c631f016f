"""Scenario B's ingest calls with the service's pauses (``mosaic bench engine --b-pause-layers L``).

The service's engine loop pauses its ingest calls every few layers (``mosaic_core.engine.ingest_pauses``) and starts
there the questions that arrived during the call; scenario B without pauses ingests and asks one after the other. With
pauses, B's ingest calls stop where the service's do, with the host waiting for the device as the service's does, and a
question asked during a call starts at the call's first pause (after the vision tower), as one that arrived during the
tower would in the service. Its TTFT then counts from that pause.
"""

from __future__ import annotations

from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import Answer


def call_pauses(every_layers: int, lookahead: int, serve=None) -> IngestPauses | None:
    """A new call's pauses every ``every_layers`` layers (None when 0), calling ``serve`` at each (nothing if None)."""
    if every_layers == 0:
        return None
    return IngestPauses(serve or (lambda: None), every_layers=every_layers, lookahead=lookahead)


class QuestionAtPause:
    """One question, started at the first pause that serves it (its prefill and first token) and finished after."""

    def __init__(self, engine, stream_id: str, question: str, max_new_tokens: int) -> None:
        self.engine, self.stream_id, self.question, self.max_new_tokens = engine, stream_id, question, max_new_tokens
        self.events: list = []
        self._answer = None

    @property
    def started(self) -> bool:
        return self._answer is not None

    def serve(self) -> None:
        if self._answer is None:
            self._answer = self.engine.ask(self.stream_id, self.question, max_new_tokens=self.max_new_tokens)
            self.events.append(next(self._answer))

    def finish(self) -> Answer:
        """The rest of the answer, after the call (started now if no pause served it)."""
        self.serve()
        self.events.extend(self._answer)
        return self.events[-1]
