"""``Engine.warm_up``: captures the prefill and decode graphs, and compiles what big passes need, before users wait.

Its questions run on a scratch stream, and its ingest passes on scratch streams, none of them durable; every one is
gone when it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from mosaic_core.engine import ingest
from mosaic_core.engine.prefill_graphs import QUESTION_STEP, padded_length
from mosaic_core.engine.results import FrameInput, WarmUpResult
from mosaic_core.engine.stream import StreamState
from mosaic_core.errors import AlreadyExistsError, BudgetError, CapacityError

log = logging.getLogger(__name__)
WARM_UP_STREAM = "mosaic-warm-up"  # ``Engine.warm_up``'s scratch stream, gone when it returns
# ``Engine.warm_up`` ingests one pass of about this many tokens (blank frames on scratch streams, each near
# ``target_tokens_per_frame``), so that the functions the adapter compiles for big passes are compiled before cameras
# wait for them: Qwen2.5-VL's vision tower, and its language model from 1,024 tokens a pass
# (``mosaic_core.model.text_fusion``); twice that, so frames a little under the target still make a big pass.
WARM_UP_INGEST_TOKENS = 2048
WARM_UP_FRAME_SIZE = (360, 640)  # height, width of the blank frames
WARM_UP_HISTORY_FRAMES = 64  # at most, into the scratch question stream, until a cluster has left its window


class WarmUpMixin:
    """``Engine``'s warm-up, mixed into it: uses the engine's ``model``, ``config``, ``streams``, ``parts`` and
    ``tiering``, opens and forgets its scratch streams with ``_open_state`` and ``_forget_stream``
    (``StreamLifecycleMixin``), and asks with ``Engine.ask`` and ``Engine.answer``."""

    def warm_up(
        self,
        *,
        max_new_tokens: int = 32,
        max_question_tokens: int = 64,
        ingest: bool | None = None,
        decode_batch: int | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> WarmUpResult:
        """Answers one question of each prefill-graph length up to ``max_question_tokens`` on a scratch stream, so
        the engine captures its prefill and decode graphs before a user's first questions do (a question that
        captured held the engine for 0.3 to 7 s on the H200: ``bench/NOTES.md``, session 11). Then, for every count
        from 2 to ``decode_batch`` (None: ``DecodeGraphs.max_batch`` where decode steps run from fixed buffers, else
        none), that many answers decode together, so each batch size's step is captured too, not when that many of
        the users' answers first run at once; up to the first count the device budget has no room for, whose step
        and larger ones are captured by the first users' answers that run that many together. The graphs' tables
        are as wide as any question of the stream can need (``decode_graphs.graph_width``), so these are the graphs
        users' questions replay on streams with the default system prompt, as every stream of the service has; a
        stream opened with a longer one may need wider tables, whose graphs its first questions capture.

        With ``ingest`` (None: on CUDA, where the adapter compiles), it first ingests one pass of blank frames on
        scratch streams (``WARM_UP_INGEST_TOKENS``), unless the device budget cannot hold their windows; and blank
        frames into the question's scratch stream, one pass each, until a cluster has left its window
        (``WARM_UP_HISTORY_FRAMES`` at most), so the questions score, choose and read history as users' questions
        over a camera's past do, and the kernels that takes are compiled then. Scratch streams are never durable
        and leave nothing behind.

        ``on_step`` hears each step as it begins, a short phrase with its count (``question 3 of 4 (prefill
        graphs)``): a worker's start says with it that it moves.

        Raises:
            AlreadyExistsError: a stream named like a scratch stream is open (warm up before opening streams).
        """
        step = on_step or _unheard
        ingest = ingest if ingest is not None else self.model.device.type == "cuda"
        rows = -(-WARM_UP_INGEST_TOKENS // self.config.target_tokens_per_frame) if ingest else 0
        scratch = [f"{WARM_UP_STREAM}-{row}" for row in range(rows)]
        self._check_scratch_names_free([WARM_UP_STREAM, *scratch])
        graphs = self.parts.decode_graphs
        if decode_batch is None:
            decode_batch = graphs.max_batch if graphs.enabled else 1

        def ask_questions(tell: Callable[[str], None]):
            return self._warm_up_questions(max_question_tokens, max_new_tokens, decode_batch, tell)

        state = None
        with self._users_counts_kept():
            try:
                ingested = self._warm_up_ingest(scratch, step) if ingest else False
                state = self._open_state(WARM_UP_STREAM, 1.0, None)
                with_history = self._warm_up_history(state, step) if ingest else False
                try:
                    asked, batches = ask_questions(step)
                except CapacityError:
                    if not with_history:
                        raise
                    # A device budget this tight has no room for a question beside the history: ask without it.
                    step("the questions again, with no history (no device room for it beside them)")
                    self._forget_stream(state)
                    state, with_history = self._open_state(WARM_UP_STREAM, 1.0, None), False
                    # Told apart from the first try's steps: a state the router saw before is not progress.
                    asked, batches = ask_questions(lambda text: step(f"{text}, again with no history"))
            finally:
                if state is not None:
                    self._forget_stream(state)
        return WarmUpResult(questions=asked, ingested=ingested, decode_batches=batches, with_history=with_history)

    def _check_scratch_names_free(self, names: list[str]) -> None:
        taken = [name for name in names if name in self.streams]
        if taken:
            raise AlreadyExistsError(
                f"a stream named {taken[0]!r} is open, and warm_up would use that name for a scratch stream; warm "
                "the engine up before opening or restoring streams"
            )

    @contextmanager
    def _users_counts_kept(self) -> Iterator[None]:
        """The hit ratio and the bytes moved between tiers as they were before, once the block ends: they count
        users' work, not the warm-up's. The history keeper is off inside it: nothing of the scratch streams is
        durable (a merge or a split their questions make must not reach the journal)."""
        lookups = (self.tiering.device_lookups, self.tiering.device_hits)
        moved = self.tiering.tiers.stats
        counts = (dict(moved.bytes_by_direction), dict(moved.copies_by_direction))
        history, self.parts.history = self.parts.history, None
        try:
            yield
        finally:
            self.parts.history = history
            self.tiering.device_lookups, self.tiering.device_hits = lookups
            moved.bytes_by_direction, moved.copies_by_direction = counts

    def _warm_up_questions(
        self, max_question_tokens: int, max_new_tokens: int, decode_batch: int, step: Callable[[str], None]
    ):
        """``warm_up``'s questions on its scratch stream: one of each prefill-graph length, then each count of answers
        decoding together; returns how many questions, and the counts."""
        batches = []
        lengths = range(QUESTION_STEP, max_question_tokens + 1, QUESTION_STEP)
        questions = [question for length in lengths if (question := self._question_of_length(length)) is not None]
        for number, question in enumerate(questions, start=1):
            step(f"question {number} of {len(questions)} (prefill graphs)")
            self.answer(WARM_UP_STREAM, question, max_new_tokens=max_new_tokens)
        for count in range(2, decode_batch + 1):
            step(f"{count} answers decoded together (decode graphs, 2 to {decode_batch})")
            try:
                self._answer_together(WARM_UP_STREAM, "What happened?", count)
            except CapacityError as err:
                log.info("warm-up: no device room for %d answers at once; no larger batch warmed up: %s", count, err)
                break
            batches.append(count)
        return len(questions), tuple(batches)

    def _answer_together(self, stream_id: str, question: str, count: int) -> None:
        """``count`` answers of two tokens each, asked at once and read in turn, as the service's engine loop reads
        its running answers: each one's first token comes from its own prefill, and the second from one decode
        step that takes them all (``DecodeGraphs``: every answer waiting for its next token steps together)."""
        answers = [self.ask(stream_id, question, max_new_tokens=2) for _ in range(count)]
        try:
            for answer in answers:
                next(answer)  # the prefill's token; the answer now waits for its next step
            for answer in answers:
                for _ in answer:  # the rest, up to the Answer
                    pass
        finally:
            for answer in answers:
                answer.close()  # an answer left unread by an error gives its pages back now

    def _warm_up_ingest(self, names: list[str], step: Callable[[str], None]) -> bool:
        """One ingest pass of a blank frame per scratch stream (``warm_up`` has the history keeper off); False when
        the device budget cannot hold the scratch streams' windows."""
        step(f"an ingest pass of {len(names)} blank frames")
        states = []
        try:
            for name in names:
                states.append(self._open_state(name, 1.0, None))
            blank = np.zeros((*WARM_UP_FRAME_SIZE, 3), dtype=np.uint8)
            ingest.ingest(self.parts, [FrameInput(n, 0.0, blank) for n in names])
            return True
        except BudgetError:
            return False
        finally:
            for state in states:
                self._forget_stream(state)

    def _warm_up_history(self, state: StreamState, step: Callable[[str], None]) -> bool:
        """Blank frames into ``state``, one pass each, until a cluster has left its window
        (one a question can retrieve); False when none has after ``WARM_UP_HISTORY_FRAMES``, or the device budget
        cannot hold them."""
        blank = np.zeros((*WARM_UP_FRAME_SIZE, 3), dtype=np.uint8)

        def retrievable() -> bool:
            tracked = self.tiering.residency.tracked_ids()
            return any(record.cluster_id in tracked for record in state.former.records_to_read())

        for index in range(WARM_UP_HISTORY_FRAMES):
            if retrievable():
                return True
            step(f"a history to ask over, blank frame {index + 1} (of at most {WARM_UP_HISTORY_FRAMES})")
            try:
                ingest.ingest(self.parts, [FrameInput(state.stream_id, float(index), blank)])
            except BudgetError:
                return False
        return retrievable()

    def _question_of_length(self, padded: int) -> str | None:
        """A question whose tokens round up to ``padded`` (None when no number of words lands there)."""
        words = ["What"]
        while (length := padded_length(len(self.model.question_ids(" ".join(words) + "?")))) < padded:
            words.append("happened")
        return " ".join(words) + "?" if length == padded else None


def _unheard(step: str) -> None:
    """``warm_up``'s steps where no one asked to hear them."""
