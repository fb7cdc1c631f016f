"""The load of ``mosaic bench service``: pushed cameras and questions on background threads.

Pushers send one JPEG per camera every 1/fps seconds, each carrying its camera's clock, and count the frames they
send and those that fell due while a call still ran (skipped, as a live camera's would be). Questions are open-loop:
a scheduler hands one question every 1/rate seconds to an idle question client, each about one random camera, or
counts it as not sent when every client is busy; each question keeps when it was due, sent and finished.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from services.local_service import LocalService

QUESTIONS = ("what happened?", "was anyone there?", "what moved last?", "describe the scene")
ASK_TIMEOUT_S = 120.0


@dataclass(slots=True)
class Answer:
    ttft_s: float
    decode_s_per_token: float | None
    server_ttft_s: float | None
    server_decode_s_per_token: float | None
    start_wait_s: float | None = None  # of server_ttft_s: on the worker, until its engine began the question
    engine_ttft_s: float | None = None  # of server_ttft_s: the engine's prefill to first token
    worker_ttft_s: float | None = None  # of server_ttft_s: on the worker, the call's arrival to its first token out
    handoff_s: float | None = None  # of worker_ttft_s: the first token from the engine thread to the call's thread
    transport_s: float | None = None  # of server_ttft_s: between router and worker, both ways


@dataclass(slots=True)
class Question:
    """One scheduled question; times are ``time.monotonic()``."""

    due_s: float
    sent_s: float | None = None  # None: every question client was busy when it fell due
    finished_s: float | None = None  # None: still running
    answer: Answer | None = None
    error: str | None = None  # the gRPC code's name, or the exception's type


@dataclass(slots=True)
class QuestionWindow:
    """The questions of one measurement window: those sent in it, and those due in it but not sent."""

    sent: list[Question]
    not_sent: int

    @property
    def answers(self) -> list[Answer]:
        return [q.answer for q in self.sent if q.answer is not None]

    @property
    def errors(self) -> Counter:
        return Counter(q.error for q in self.sent if q.error is not None)

    @property
    def unfinished(self) -> int:
        return sum(1 for q in self.sent if q.finished_s is None)


def questions_in(questions: list[Question], start_s: float, end_s: float) -> QuestionWindow:
    """The questions sent in [start_s, end_s), and the number due in it that were not sent."""
    sent = [q for q in questions if q.sent_s is not None and start_s <= q.sent_s < end_s]
    not_sent = sum(1 for q in questions if q.sent_s is None and start_s <= q.due_s < end_s)
    return QuestionWindow(sent, not_sent)


@dataclass(slots=True)
class PushCounts:
    """One push client's camera-frames since it started."""

    sent: int = 0  # in PushFrames calls (failed calls included)
    skipped: int = 0  # fell due while a call still ran, never sent
    refused: int = 0
    dropped: int = 0


def next_tick(index: int, start_s: float, now_s: float, fps: float) -> tuple[int, int]:
    """A pusher's next frame index after frame ``index`` once it wakes at ``now_s``, and how many frames of each
    camera fell due in between and are skipped: frame k is due at ``start_s + k / fps``, and a pusher that woke late
    sends the latest frame due, so the stream clock stays on the wall clock."""
    latest = max(index + 1, int((now_s - start_s) * fps))
    return latest, latest - index - 1


def push_delta(before: list[PushCounts], after: list[PushCounts]) -> list[PushCounts]:
    """Each push client's counts between two ``Load.push_counts`` snapshots."""
    return [
        PushCounts(a.sent - b.sent, a.skipped - b.skipped, a.refused - b.refused, a.dropped - b.dropped)
        for b, a in zip(before, after, strict=True)
    ]


@dataclass(slots=True)
class Load:
    """Pushed cameras and open-loop questions on background threads; what they did, kept for windows to read."""

    service: LocalService
    jpegs: list[bytes]
    fps: float
    questions_per_s: float
    max_new_tokens: int
    push_clients: int
    question_clients: int  # questions in flight at most, each client on a channel of its own
    pushed: list[str] = field(default_factory=list)  # camera ids, read by the pushers on every tick
    cameras: list[str] = field(default_factory=list)  # every camera, for questions
    questions: list[Question] = field(default_factory=list)
    push_errors: Counter = field(default_factory=Counter)  # since the start, by gRPC code
    _push: list[PushCounts] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _idle: threading.Semaphore | None = None
    _asks: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def start(self) -> None:
        self._push = [PushCounts() for _ in range(self.push_clients)]
        targets = [(self._pusher, k) for k in range(self.push_clients)]
        if self.questions_per_s > 0:  # 0: no questions at all
            self._idle = threading.Semaphore(self.question_clients)
            targets += [(self._schedule, 0)] + [(self._answer, k) for k in range(self.question_clients)]
        for target, k in targets:
            thread = threading.Thread(target=target, args=(k,), daemon=True, name=f"{target.__name__}-{k}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for _ in range(self.question_clients):
            self._asks.put(None)
        for thread in self._threads:
            thread.join(60)

    def push_counts(self) -> tuple[list[PushCounts], Counter]:
        """A snapshot of every push client's counts and the push errors, since the start."""
        with self._lock:
            return [PushCounts(c.sent, c.skipped, c.refused, c.dropped) for c in self._push], Counter(self.push_errors)

    def window(self, start_s: float, end_s: float, wait_s: float) -> QuestionWindow:
        """The questions of [start_s, end_s), once those sent in it finished or ``wait_s`` passed."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                found = questions_in(self.questions, start_s, end_s)
            if not found.unfinished or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def _pusher(self, k: int) -> None:
        import grpc

        from services.gen.mosaic.v1 import mosaic_pb2 as pb

        index, start = 0, time.monotonic()
        counts = self._push[k]
        with self.service.client() as client:
            while not self._stop.wait(max(0.0, start + (index + 1) / self.fps - time.monotonic())):
                index, skipped = next_tick(index, start, time.monotonic(), self.fps)
                mine = self.pushed[k :: self.push_clients]
                if not mine:
                    continue
                jpeg = self.jpegs[index % len(self.jpegs)]
                frames = [pb.Frame(stream_id=sid, timestamp_s=index / self.fps, encoded=jpeg) for sid in mine]
                with self._lock:
                    counts.skipped += skipped * len(mine)
                    counts.sent += len(frames)
                try:
                    response = client.push_frames(frames, timeout_s=30)
                except grpc.RpcError as err:
                    with self._lock:
                        self.push_errors[err.code().name] += 1
                    continue
                with self._lock:
                    counts.refused += response.frames_rejected
                    counts.dropped += response.frames_dropped

    def _schedule(self, _: int) -> None:
        """Question n falls due at start + n / rate whatever the answers before it do (open loop)."""
        interval_s, start, n = 1.0 / self.questions_per_s, time.monotonic(), 0
        while not self._stop.wait(max(0.0, start + n * interval_s - time.monotonic())):
            due, n = start + n * interval_s, n + 1
            if not self.cameras:
                continue  # before the first step's cameras: nothing to ask about
            question = Question(due_s=due)
            if self._idle.acquire(blocking=False):
                question.sent_s = time.monotonic()
                self._asks.put(question)
            with self._lock:
                self.questions.append(question)

    def _answer(self, k: int) -> None:
        import grpc

        rng = random.Random(k)
        with self.service.client() as client:
            while (question := self._asks.get()) is not None:
                try:
                    answer = ask_timed(client, rng.choice(QUESTIONS), rng.choice(self.cameras), self.max_new_tokens)
                except grpc.RpcError as err:
                    answer, error = None, err.code().name
                except Exception as err:  # counted as a failed question, not a dead client
                    answer, error = None, type(err).__name__
                else:
                    error = None
                with self._lock:
                    question.answer, question.error, question.finished_s = answer, error, time.monotonic()
                self._idle.release()


def ask_timed(client, question: str, camera: str, max_new_tokens: int) -> Answer:
    """Asks and times the answer's events as they arrive: first token, and the gaps between later tokens."""
    sent = time.perf_counter()
    first = last = None
    num_tokens, timings = 0, None
    for event in client.query(question, [camera], max_new_tokens=max_new_tokens, timeout_s=ASK_TIMEOUT_S):
        kind = event.WhichOneof("event")
        if kind == "token" and event.token.token_ids:
            now = time.perf_counter()
            first = first if first is not None else now
            last, num_tokens = now, num_tokens + len(event.token.token_ids)
        elif kind == "timings":
            timings = event.timings
    if first is None:
        first = last = time.perf_counter()
    decode = (last - first) / (num_tokens - 1) if num_tokens > 1 else None
    server_decode = None
    if timings is not None and timings.num_tokens > 1:
        server_decode = timings.decode_s / (timings.num_tokens - 1)
    return Answer(
        ttft_s=first - sent,
        decode_s_per_token=decode,
        server_ttft_s=timings.time_to_first_token_s if timings is not None else None,
        server_decode_s_per_token=server_decode,
        start_wait_s=timings.start_wait_s if timings is not None else None,
        engine_ttft_s=timings.engine_first_token_s if timings is not None else None,
        worker_ttft_s=timings.worker_first_token_s if timings is not None else None,
        handoff_s=timings.token_handoff_s if timings is not None else None,
        transport_s=timings.transport_s if timings is not None else None,
    )
