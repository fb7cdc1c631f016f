"""The service's queues in isolation: per-stream ingest queues, the question queue, cross-stream merging."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from mosaic_core.engine.results import Answer, AnswerTimings, EvidenceSpan, RetrievalStats, TokenEvent
from mosaic_core.errors import InvalidArgumentError, OutOfRangeError, TimestampOrderError, UnknownStreamError
from services.errors import DeadlineError, QueueFullError, UnavailableError, status_for
from services.fanout import Chunk, merge_answers, merged_evidence
from services.ingest_queue import IngestQueues, PutOutcome, QueuedFrame
from services.scheduler import QueryQueue

RGB = np.zeros((4, 4, 3), np.uint8)


def _frame(stream_id: str, t: float) -> QueuedFrame:
    return QueuedFrame(stream_id, t, RGB, 0.0)


# -- ingest queues ---------------------------------------------------------------------------------


def test_full_queue_drops_oldest_and_keeps_the_newest():
    queues = IngestQueues(3)
    queues.add_stream("a", fps=100.0)
    outcomes = [queues.put(_frame("a", t / 10)) for t in range(5)]
    assert outcomes.count(PutOutcome.QUEUED_DROPPED_OLDEST) == 2
    assert queues.depth("a") == 3
    assert [f.timestamp_s for f in queues.take_call(10, frames_per_stream=5)] == [0.2, 0.3, 0.4]


def test_frames_taken_ahead_count_against_the_bound_until_released():
    """Frames the engine loop takes early for the next call (``hold``) leave the queue but not its bound: a full queue
    drops its oldest frame when it would have with them still queued, and not once the call has begun."""
    queues = IngestQueues(3)
    queues.add_stream("a", fps=100.0)
    queues.add_stream("b", fps=100.0)
    for t in range(3):
        queues.put(_frame("a", t / 10))
    held = queues.take_call(10, frames_per_stream=1, hold=True)
    assert [f.timestamp_s for f in held] == [0.0]
    assert queues.put(_frame("a", 0.3)) is PutOutcome.QUEUED_DROPPED_OLDEST  # 2 queued + 1 held: full
    assert queues.depth("a") == 3  # the frame held counts in the depth as in the bound
    queues.release(held)
    assert queues.put(_frame("a", 0.4)) is PutOutcome.QUEUED
    assert queues.put(_frame("a", 0.5)) is PutOutcome.QUEUED_DROPPED_OLDEST
    queues.release(held)  # released twice: nothing more to release
    assert queues.put(_frame("a", 0.6)) is PutOutcome.QUEUED_DROPPED_OLDEST
    queues.take_call(10, frames_per_stream=1)  # without hold: out of the bound at once
    assert queues.put(_frame("a", 0.7)) is PutOutcome.QUEUED
    assert queues.put(_frame("b", 0.0)) is PutOutcome.QUEUED  # another stream's bound is its own


def test_sampling_keeps_one_frame_per_fps_slot_without_drift():
    queues = IngestQueues(100)
    queues.add_stream("a", fps=5.0)
    kept = [t for t in range(100) if queues.put(_frame("a", t / 25)) is not PutOutcome.SAMPLED_OUT]
    assert kept == list(range(0, 100, 5))  # 25 fps pushed into a 5 fps stream: every fifth frame


@pytest.mark.parametrize("fps", [1.0, 3.0, 10.0, 30.0])
def test_frames_at_the_streams_own_fps_on_unix_time_are_all_kept(fps):
    """What `mosaic push` stamps: its start in Unix time, then start + i / fps. The float error of t - t0 there
    (about 1e-7 s) put a third of a 3-fps camera's frames in the slot before theirs, sampled out uncounted."""
    queues = IngestQueues(10_000)
    queues.add_stream("cam", fps)
    start_s = 1_754_000_000.123456
    outcomes = [queues.put(_frame("cam", start_s + i / fps)) for i in range(60)]
    assert [i for i, outcome in enumerate(outcomes) if outcome is PutOutcome.SAMPLED_OUT] == []


def test_a_frame_a_little_early_on_its_grid_keeps_its_slot():
    queues = IngestQueues(10_000)
    queues.add_stream("cam", 1.0)
    stamps = [i - (0.001 if i % 2 else 0.0) for i in range(20)]  # a capture clock 1 ms early now and then
    assert all(queues.put(_frame("cam", t)) is not PutOutcome.SAMPLED_OUT for t in stamps)


def test_frames_sampled_by_their_producer_are_all_queued_however_close():
    """A source reader samples to the stream's fps itself; the queue's grid (its own anchor and margin) must not
    refuse one of its frames for being a little closer than one interval to the one before."""
    queues = IngestQueues(10_000)
    queues.add_stream("cam", 29.0)
    stamps = [i / 29.97 for i in range(60)]  # a 29.97-fps clip read at 29 fps: every frame is a sample
    outcomes = [queues.put(_frame("cam", t), presampled=True) for t in stamps]
    assert outcomes == [PutOutcome.QUEUED] * 60
    assert queues.put(_frame("cam", stamps[-1] + 0.001)) is PutOutcome.SAMPLED_OUT  # a pushed one is still sampled


def test_out_of_order_and_unknown_frames_are_refused():
    queues = IngestQueues(4)
    queues.add_stream("a", fps=1.0)
    queues.put(_frame("a", 5.0))
    with pytest.raises(TimestampOrderError):
        queues.put(_frame("a", 5.0))
    with pytest.raises(UnknownStreamError):
        queues.put(_frame("zz", 1.0))


def test_a_call_takes_the_streams_longest_behind_each_giving_one_row_of_frames():
    queues = IngestQueues(10)
    arrivals = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}  # when each stream's first waiting frame came
    for stream_id, received_s in arrivals.items():
        queues.add_stream(stream_id, fps=100.0)
        for t in range(3):
            queues.put(QueuedFrame(stream_id, t / 10, RGB, received_s + 10 * t))
    call = queues.take_call(3)
    assert [(f.stream_id, f.timestamp_s) for f in call] == [("b", 0.0), ("c", 0.0), ("a", 0.0)]
    assert queues.depths() == {"a": 2, "b": 2, "c": 2, "d": 3}
    call = queues.take_call(3)  # d, left out, is now the furthest behind
    assert [(f.stream_id, f.timestamp_s) for f in call] == [("d", 0.0), ("b", 0.1), ("c", 0.1)]
    rows = queues.take_call(5, frames_per_stream=2)  # rows of two frames; the last stream gets what is left
    assert [(f.stream_id, f.timestamp_s) for f in rows] == [("a", 0.1), ("a", 0.2), ("d", 0.1), ("d", 0.2), ("b", 0.2)]
    assert queues.remove_stream("c") == 1


def test_a_stream_with_a_backlog_gives_one_frame_a_call_in_order_and_never_starves_the_others():
    queues = IngestQueues(100)
    queues.add_stream("backlog", fps=100.0)
    for i in range(50):
        queues.put(QueuedFrame("backlog", i / 10, RGB, 0.0))
    for i, stream_id in enumerate(("b", "c", "d")):
        queues.add_stream(stream_id, fps=100.0)
        queues.put(QueuedFrame(stream_id, 0.0, RGB, 1.0 + i))
    taken = [queues.take_call(2) for _ in range(4)]
    assert [[f.stream_id for f in call] for call in taken] == [
        ["backlog", "b"],
        ["backlog", "c"],
        ["backlog", "d"],
        ["backlog"],
    ]
    assert [f.timestamp_s for call in taken for f in call if f.stream_id == "backlog"] == [0.0, 0.1, 0.2, 0.3]
    with pytest.raises(InvalidArgumentError):
        queues.take_call(0)


# -- question queue --------------------------------------------------------------------------------


def test_question_queue_is_fair_across_streams_and_respects_priority():
    async def scenario():
        queue = QueryQueue(max_waiting=10, max_running=1)
        running = queue.admit("cam-1", 2)
        waiting = [
            queue.admit(key, prio) for key, prio in [("cam-1", 2), ("cam-1", 2), ("cam-2", 2), ("x", 1), ("y", 3)]
        ]
        order = []
        for _ in waiting:
            queue.release(running)
            running = next(t for t in waiting if t.granted.done() and t not in order)
            order.append(running)
        return [(t.key, t.priority) for t in order]

    # HIGH first, then NORMAL round-robin across cam-1 and cam-2, then LOW.
    assert asyncio.run(scenario()) == [("y", 3), ("cam-1", 2), ("cam-2", 2), ("cam-1", 2), ("x", 1)]


def test_full_question_queue_refuses_with_a_retry_hint():
    async def scenario():
        queue = QueryQueue(max_waiting=2, max_running=1)
        queue.admit("a", 2)
        queue.admit("a", 2)
        queue.admit("b", 2)
        with pytest.raises(QueueFullError) as info:
            queue.admit("c", 2)
        return info.value

    err = asyncio.run(scenario())
    status = status_for(err)
    assert status.code.name == "RESOURCE_EXHAUSTED"
    assert "retry in about" in status.message
    assert dict(status.trailing_metadata)["retry-after-ms"].isdigit()


def test_waiting_past_the_deadline_leaves_the_queue():
    async def scenario():
        queue = QueryQueue(max_waiting=2, max_running=1)
        queue.admit("a", 2)
        late = queue.admit("b", 2)
        with pytest.raises(DeadlineError):
            await queue.wait_turn(late, 0.05)
        return queue.num_waiting

    assert asyncio.run(scenario()) == 0


def test_the_running_gauge_follows_every_grant_and_release_back_to_zero():
    """What ``mosaic_queries_running`` is set to: the questions let run after each change, a waiter let run in a
    release's place included, and 0 once all have ended however they ended."""

    async def scenario():
        reported = []
        queue = QueryQueue(max_waiting=2, max_running=2, on_running=reported.append)
        first, second = queue.admit("a", 2), queue.admit("b", 2)
        after = [reported[-1]]
        third = queue.admit("c", 2)  # waits
        queue.release(first)  # the third runs in its place
        after.append(reported[-1])
        queue.release(second)
        after.append(reported[-1])
        queue.release(third)
        queue.release(third)  # twice: nothing more to release
        after.append(reported[-1])
        return after

    assert asyncio.run(scenario()) == [2, 2, 1, 0]


# -- cross-stream merging --------------------------------------------------------------------------


def _answer(stream_id: str, score: float) -> Answer:
    span = EvidenceSpan(stream_id, f"{stream_id}/c000000", 0.0, 1.0, score, 1)
    return Answer(stream_id, "q", "", [], [span], AnswerTimings(), RetrievalStats())


async def _events(stream_id: str, n: int, delay_s: float, score: float, error=None):
    for i in range(n):
        await asyncio.sleep(delay_s)
        yield TokenEvent(i, f"{stream_id}{i} ")
    if error is not None:
        raise error
    yield _answer(stream_id, score)


def test_merge_streams_whole_answers_and_ranks_evidence_across_streams():
    async def scenario():
        sources = {"slow": _events("slow", 3, 0.03, 0.9), "fast": _events("fast", 3, 0.001, 0.2)}
        return [item async for item in merge_answers(sources, headers=True)]

    items = asyncio.run(scenario())
    chunks = [i for i in items if isinstance(i, Chunk)]
    text = "".join(c.text for c in chunks)
    assert text == "[fast] fast0 fast1 fast2 \n[slow] slow0 slow1 slow2 \n"  # answers never interleave
    answers = [i for i in items if isinstance(i, Answer)]
    ranked = merged_evidence(answers, limit=5)
    assert [(s.stream_id, s.rank) for s in ranked] == [("slow", 1), ("fast", 2)]


def test_merged_evidence_gives_the_visits_of_one_cluster_one_rank_and_counts_clusters():
    visits = [EvidenceSpan("a", "a/c1", t, t + 1.0, 0.9, 1) for t in (0.0, 40.0)]
    answers = [
        dataclasses.replace(_answer("a", 0.9), evidence=[*visits, EvidenceSpan("a", "a/c2", 5.0, 6.0, 0.1, 2)]),
        dataclasses.replace(_answer("b", 0.5), evidence=[EvidenceSpan("b", "b/c7", 2.0, 3.0, 0.5, 1)]),
    ]
    ranked = merged_evidence(answers, limit=2)
    assert [(s.cluster_id, s.start_s, s.rank) for s in ranked] == [
        ("a/c1", 0.0, 1),
        ("a/c1", 40.0, 1),
        ("b/c7", 2.0, 2),
    ]


def test_merge_skips_a_stream_out_of_range_but_fails_when_all_are():
    async def scenario(sources):
        return [item async for item in merge_answers(sources, headers=True)]

    items = asyncio.run(
        scenario({"a": _events("a", 2, 0.0, 0.5), "b": _events("b", 0, 0.0, 0.5, OutOfRangeError("b: nothing"))})
    )
    assert "".join(i.text for i in items if isinstance(i, Chunk)).startswith("[a] ")
    with pytest.raises(OutOfRangeError):
        asyncio.run(
            scenario(
                {
                    "b": _events("b", 0, 0.0, 0.5, OutOfRangeError("b: nothing")),
                    "c": _events("c", 0, 0.0, 0.5, OutOfRangeError("c")),
                }
            )
        )


def test_merge_leaves_out_a_stream_deleted_mid_answer_and_starts_the_next_answer_on_a_line_of_its_own():
    async def scenario():
        sources = {
            "gone": _events("gone", 2, 0.0, 0.5, UnknownStreamError("stream 'gone' was deleted")),
            "kept": _events("kept", 2, 0.02, 0.7),
        }
        return [item async for item in merge_answers(sources, headers=True)]

    items = asyncio.run(scenario())
    assert "".join(i.text for i in items if isinstance(i, Chunk)) == "[gone] gone0 gone1 \n[kept] kept0 kept1 \n"
    assert [i.stream_id for i in items if isinstance(i, Answer)] == ["kept"]


def test_merge_fails_as_soon_as_a_stream_fails_while_another_answer_streams():
    """A stream that fails for any other reason (its worker died: UNAVAILABLE) fails the call when it fails, not once
    the answer being streamed ends: the call fails either way, and the other answers stop decoding for nothing."""
    ended = []

    async def failing_late():
        await asyncio.sleep(0.05)  # after the other answer has begun streaming
        raise UnavailableError("worker 1 is unavailable")
        yield  # an async generator, as the coordinator's answers are

    async def long_answer():
        try:
            async for event in _events("long", 1000, 0.01, 0.5):
                yield event
        finally:
            ended.append("long")

    async def scenario():
        received = []
        with pytest.raises(UnavailableError):
            async for item in merge_answers({"long": long_answer(), "dead": failing_late()}, headers=True):
                received.append(item)
        return received

    started_s = time.monotonic()
    received = asyncio.run(scenario())
    assert 0 < len(received) < 100, "the failure waited for the other answer to end"
    assert time.monotonic() - started_s < 2.0
    assert ended == ["long"]  # the other answer was closed, not left decoding
