"""Scenario B's ingest calls with the service's pauses (``mosaic bench engine --b-pauses off,every4,...``).

The service's engine loop pauses its ingest calls every few layers (``mosaic_core.engine.ingest_pauses``) and starts
there the questions that arrived during the call; scenario B without pauses ingests and asks one after the other. With
pauses, B's ingest calls stop where the service's do, with the host waiting for the device as the service's does, and a
question asked during a call starts at the call's first pause (after the vision tower), as one that arrived during the
tower would in the service. Its TTFT then counts from that pause.

A variant is named ``off`` or ``every<L>[-ahead<K>][-skip-idle]``: pauses before every L-th layer, the host at most K
chunks ahead of the device at a pause (1 if not given), and with ``-skip-idle`` passing the pauses where no question
waits, as the service does with ``ingest_pause_skip_idle``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mosaic_core.engine.ingest_pauses import IngestPauses
from mosaic_core.engine.results import Answer

_VARIANT = re.compile(r"every(?P<layers>[1-9][0-9]*)(-ahead(?P<ahead>[1-9][0-9]*))?(?P<skip>-skip-idle)?")


@dataclass(frozen=True, slots=True)
class PauseVariant:
    """How B's ingest calls pause (module doc); ``every_layers`` 0: no pauses."""

    every_layers: int = 0
    lookahead: int = 1
    skip_idle: bool = False

    @classmethod
    def parse(cls, name: str) -> PauseVariant:
        if name == "off":
            return cls()
        match = _VARIANT.fullmatch(name)
        if match is None:
            raise ValueError(
                f"pause variant {name!r}: write off or every<L>[-ahead<K>][-skip-idle], e.g. every4-ahead3"
            )
        return cls(int(match["layers"]), int(match["ahead"] or 1), match["skip"] is not None)

    @property
    def name(self) -> str:
        if self.every_layers == 0:
            return "off"
        ahead = f"-ahead{self.lookahead}" if self.lookahead != 1 else ""
        return f"every{self.every_layers}{ahead}{'-skip-idle' if self.skip_idle else ''}"


def call_pauses(variant: PauseVariant, asked: QuestionAtPause | None = None) -> IngestPauses | None:
    """A new call's pauses (None when ``off``), starting ``asked`` at the first that serves it (nothing if None)."""
    if variant.every_layers == 0:
        return None
    has_work = None
    if variant.skip_idle:
        has_work = (lambda: False) if asked is None else (lambda: not asked.started)
    return IngestPauses(
        (lambda: None) if asked is None else asked.serve,
        every_layers=variant.every_layers,
        lookahead=variant.lookahead,
        has_work=has_work,
    )


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
