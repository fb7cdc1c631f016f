"""The load of ``mosaic bench service``: pushed cameras and question clients on background threads.

Pushers send one JPEG per camera every 1/fps seconds, each carrying its camera's clock; question clients ask at a
fixed total rate about one random camera each and time the answer's events as they arrive.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from services.local_service import LocalService

QUESTIONS = ("what happened?", "was anyone there?", "what moved last?", "describe the scene")


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
class Load:
    """Pushed cameras and question clients on background threads; what they saw, taken per measurement."""

    service: LocalService
    jpegs: list[bytes]
    fps: float
    questions_per_s: float
    max_new_tokens: int
    push_clients: int
    question_clients: int
    pushed: list[str] = field(default_factory=list)  # camera ids, read by the pushers on every tick
    cameras: list[str] = field(default_factory=list)  # every camera, for questions
    answers: list[Answer] = field(default_factory=list)
    push_errors: Counter = field(default_factory=Counter)
    question_errors: Counter = field(default_factory=Counter)
    refused: int = 0
    dropped: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        targets = [(self._push, k) for k in range(self.push_clients)]
        if self.questions_per_s > 0:  # 0: no questions at all
            targets += [(self._ask, k) for k in range(self.question_clients)]
        for target, k in targets:
            thread = threading.Thread(target=target, args=(k,), daemon=True, name=f"{target.__name__}-{k}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def take(self) -> tuple[list[Answer], Counter, Counter, int, int]:
        """Answers, errors, refused and dropped frames since the last call."""
        with self._lock:
            taken = (self.answers, self.push_errors, self.question_errors, self.refused, self.dropped)
            self.answers, self.push_errors, self.question_errors = [], Counter(), Counter()
            self.refused = self.dropped = 0
        return taken

    def _push(self, k: int) -> None:
        import grpc

        from services.gen.mosaic.v1 import mosaic_pb2 as pb

        index, start = 0, time.monotonic()
        with self.service.client() as client:
            # Frame k is due at start + k/fps and carries that time; frames due while a push ran are skipped, as
            # a live camera's would be, so the stream clock stays on the wall clock.
            while not self._stop.wait(max(0.0, start + (index + 1) / self.fps - time.monotonic())):
                index = max(index + 1, int((time.monotonic() - start) * self.fps))
                mine = self.pushed[k :: self.push_clients]
                if not mine:
                    continue
                jpeg = self.jpegs[index % len(self.jpegs)]
                frames = [pb.Frame(stream_id=sid, timestamp_s=index / self.fps, encoded=jpeg) for sid in mine]
                try:
                    response = client.push_frames(frames, timeout_s=30)
                except grpc.RpcError as err:
                    with self._lock:
                        self.push_errors[err.code().name] += 1
                    continue
                with self._lock:
                    self.refused += response.frames_rejected
                    self.dropped += response.frames_dropped

    def _ask(self, k: int) -> None:
        import grpc

        rng = random.Random(k)
        interval_s = self.question_clients / self.questions_per_s
        start = time.monotonic() + interval_s * k / self.question_clients  # clients spread over the interval
        n = 0
        with self.service.client() as client:
            while not self._stop.wait(max(0.0, start + n * interval_s - time.monotonic())):
                n = max(n + 1, int((time.monotonic() - start) / interval_s))  # late questions are skipped
                if not self.cameras:
                    continue
                camera = rng.choice(self.cameras)
                try:
                    answer = ask_timed(client, rng.choice(QUESTIONS), camera, self.max_new_tokens)
                except grpc.RpcError as err:
                    with self._lock:
                        self.question_errors[err.code().name] += 1
                    continue
                with self._lock:
                    self.answers.append(answer)


def ask_timed(client, question: str, camera: str, max_new_tokens: int) -> Answer:
    """Asks and times the answer's events as they arrive: first token, and the gaps between later tokens."""
    sent = time.perf_counter()
    first = last = None
    num_tokens, timings = 0, None
    for event in client.query(question, [camera], max_new_tokens=max_new_tokens, timeout_s=120):
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
