"""Cross-camera questions ("which camera saw the forklift?"): one question, several streams, one answer.

The question runs on every target stream at once (their workers may differ), and the answers are merged
**answer by answer, never token by token** (interleaved tokens of two answers would be unreadable):

- the first stream to produce a token streams live; the others keep decoding and buffer;
- when it ends, the stream with the most buffered output goes next, and so on;
- each answer is introduced by a header chunk ``[stream_id] `` (text only, no token ids) and closed by a
  newline chunk, so a client can split the text per camera;
- the evidence of all answers is merged and ranked by score, so the top span names the camera whose
  history best matches the question ("which camera saw X" reads off ``evidence.spans[0].stream_id``).

A stream whose history does not reach the question's time range (OUT_OF_RANGE), that has no frames yet, or that
was deleted after the question was checked (NOT_FOUND) is left out of a multi-stream answer; the call fails with the
first such status only when every stream is left out. Any other failure of one stream fails the call as soon as it
arrives, even while another stream's answer is being streamed: the call would fail anyway, and the other answers are
cancelled instead of decoded for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mosaic_core.engine.results import Answer, EvidenceSpan, TokenEvent
from mosaic_core.errors import OutOfRangeError, UnknownStreamError

_END = object()
# Left out of a multi-stream answer: no history in the range or no frames yet (OutOfRangeError), or deleted since the
# question was checked (UnknownStreamError: the servicer refuses a question naming an unknown stream before this).
_SKIPPED = (OutOfRangeError, UnknownStreamError)


@dataclass(slots=True)
class Chunk:
    """A piece of merged output: a token of ``stream_id``'s answer, or a header (``token_id`` None)."""

    stream_id: str
    text: str
    token_id: int | None = None


async def merge_answers(sources: dict[str, AsyncIterator[object]], *, headers: bool) -> AsyncIterator[Chunk | Answer]:
    """Yields every stream's tokens as contiguous runs (``Chunk``), then each stream's ``Answer``."""
    queues: dict[str, asyncio.Queue] = {sid: asyncio.Queue() for sid in sources}
    arrived = asyncio.Event()

    async def pump(stream_id: str, events: AsyncIterator[object]) -> None:
        try:
            async for event in events:
                await queues[stream_id].put(event)
                arrived.set()
            await queues[stream_id].put(_END)
        except Exception as err:
            if headers and isinstance(err, _SKIPPED):
                queues[stream_id].put_nowait(err)
            else:  # into every queue, so the answer being streamed now ends with it
                for queue in queues.values():
                    queue.put_nowait(err)
        arrived.set()

    tasks = [asyncio.create_task(pump(sid, events)) for sid, events in sources.items()]
    answers: list[Answer] = []
    skipped: list[Exception] = []
    try:
        remaining = list(sources)
        while remaining:
            active = await _next_ready(remaining, queues, arrived)
            remaining.remove(active)
            async for item in _drain(active, queues[active], headers=headers, skipped=skipped):
                if isinstance(item, Answer):
                    answers.append(item)
                else:
                    yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not answers and skipped:
        raise skipped[0]
    for answer in answers:
        yield answer


async def _next_ready(remaining: list[str], queues: dict[str, asyncio.Queue], arrived: asyncio.Event) -> str:
    while True:
        arrived.clear()
        ready = [sid for sid in remaining if not queues[sid].empty()]
        if ready:
            return max(ready, key=lambda sid: queues[sid].qsize())
        await arrived.wait()


async def _drain(stream_id: str, queue: asyncio.Queue, *, headers: bool, skipped: list) -> AsyncIterator:
    started = False
    while (event := await queue.get()) is not _END:
        if isinstance(event, _SKIPPED) and headers:
            skipped.append(event)  # nothing of this camera to answer from; the others still answer
            if started:  # deleted mid-answer: the next answer starts on a line of its own
                yield Chunk(stream_id, "\n")
            return
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, TokenEvent):
            if headers and not started:
                yield Chunk(stream_id, f"[{stream_id}] ")
            started = True
            yield Chunk(stream_id, event.text, event.token_id)
        elif isinstance(event, Answer):
            if headers and started:
                yield Chunk(stream_id, "\n")
            yield event


def merged_evidence(answers: list[Answer], limit: int) -> list[EvidenceSpan]:
    """Every answer's clusters ranked by score (best first) and renumbered from rank 1, as the engine ranks: the
    spans of one cluster (the visits of a recurring scene) share its rank, and ``limit`` counts clusters. Each span
    keeps its keyframe ids (they name their stream, so spans of several cameras cannot mix them up)."""
    spans = sorted(
        (span for answer in answers for span in answer.evidence),
        key=lambda s: (-s.score, s.stream_id, s.cluster_id, s.start_s),
    )
    ranks: dict[tuple[str, str], int] = {}
    merged = []
    for s in spans:
        cluster = (s.stream_id, s.cluster_id)
        if cluster not in ranks:
            if len(ranks) == limit:
                break  # a cluster's spans are consecutive: every span of the ranked clusters is in
            ranks[cluster] = len(ranks) + 1
        merged.append(
            EvidenceSpan(s.stream_id, s.cluster_id, s.start_s, s.end_s, s.score, ranks[cluster], list(s.keyframe_ids))
        )
    return merged
