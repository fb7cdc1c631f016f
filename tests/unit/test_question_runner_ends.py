"""How the questions waiting on a worker's engine thread end when it stops or their stream goes: each one's caller
reads the status it is told and a sentence, and the stream's count of questions goes back to 0."""

from __future__ import annotations

import threading

import pytest

from services.errors import StreamDeletedError, UnavailableError, status_for
from services.question_job import DONE, QuestionJob
from services.question_runner import QuestionRunner


def _job(question_id: str, stream_id: str) -> QuestionJob:
    return QuestionJob(
        question_id=question_id, stream_id=stream_id, question="what moved?", max_new_tokens=4, time_range=None,
        deadline_s=float("inf"),
    )  # fmt: skip


def _ends(job: QuestionJob) -> list:
    return [job.events.get_nowait() for _ in range(job.events.qsize())]


@pytest.mark.parametrize(
    ("end", "error", "code", "words"),
    [
        (lambda runner: runner.close(), UnavailableError, "UNAVAILABLE", "shutting down"),
        (lambda runner: runner.cancel_stream_questions("cam"), StreamDeletedError, "NOT_FOUND", "'cam' was deleted"),
    ],
    ids=["worker-stops", "stream-deleted"],
)
def test_waiting_questions_end_with_their_status_and_a_sentence(end, error, code, words):
    """A worker that stops (its shutdown) is UNAVAILABLE, to be asked again once it is back; CANCELLED would tell the
    client that it cancelled the call itself."""
    runner = QuestionRunner(None, None, None, threading.Event())  # no engine step runs before these ends
    jobs = [runner.submit(_job(f"q{n}", "cam")) for n in range(2)]
    end(runner)
    for job in jobs:
        failure, done = _ends(job)
        assert isinstance(failure, error) and done is DONE
        status = status_for(failure)
        assert status.code.name == code and words in status.message
    assert runner.questions_of("cam") == 0
