"""A question's answer from one stream's worker (``QuestionsMixin.ask``), mixed into ``Coordinator``.

**A worker marked down** by the telemetry poll (``services.coordinator_polls``) ends the answers the router waits
for from it at once, UNAVAILABLE with a sentence naming it: a frozen or hung worker would otherwise hold them until
their deadline (at most ``MAX_QUESTION_S``), and a question sent to it while it is down is refused at once.

**A cancel goes to the worker only when the router abandons an answer** (its client went away, its deadline passed
in the router, or another stream of the question failed) while the worker is live. A worker that ended the answer
itself, died, or was marked down gets none: a cancel there found no question, and on a restarting worker it failed
(logged by Ray as an unhandled error) or, taken by the new process, waited in its early-cancel map for an ask that
never comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from mosaic_core.engine.results import Answer
from services.worker_actor import send_ask

log = logging.getLogger(__name__)


class QuestionsMixin:
    """``Coordinator``'s questions, mixed into it: uses the coordinator's ``workers``, ``started``, ``_alive``,
    ``_gone`` and ``_cancels``, and its ``_index_of``, ``_call``, ``is_down``, ``down_signal`` and ``down_error``."""

    async def ask(
        self,
        question_id: str,
        stream_id: str,
        question: str,
        *,
        max_new_tokens: int,
        time_range,
        timeout_s: float,
    ) -> AsyncIterator[object]:
        """One stream's answer: ``TokenEvent``s then the ``Answer``.

        Ends UNAVAILABLE (``down_error``) as soon as a telemetry poll marks the worker down. Cancels the worker's side
        only when the router abandons the answer (its caller went away or ended it) while the worker is live: a worker
        that ended the answer itself, died, or stopped answering has nothing to cancel.
        """
        index = self._index_of(stream_id)
        worker = self.workers[index]
        if self.started and self.is_down(index):
            raise self.down_error(index, stream_id)
        down = self.down_signal(index)
        sent_s = time.monotonic()
        refs = aiter(send_ask(worker, question_id, stream_id, question, max_new_tokens, time_range, timeout_s))
        first_back_s = None
        abandoned = True
        try:
            while True:
                try:
                    ref = await self._unless_down(index, stream_id, anext(refs), down)
                except StopAsyncIteration:
                    break
                event = await self._unless_down(index, stream_id, self._call(index, ref), down)
                first_back_s = first_back_s or time.monotonic()
                if isinstance(event, Answer):
                    event.timings.transport_s = max(0.0, first_back_s - sent_s - event.timings.worker_first_token_s)
                yield event
            abandoned = False
        except Exception:
            abandoned = False  # the worker ended it (its error), died, or stopped answering
            raise
        finally:
            if abandoned and index in self._alive and index not in self._gone:
                self._send_cancel(index, question_id)

    async def _unless_down(self, index: int, stream_id: str, step, down: asyncio.Future):
        """Awaits one step of an answer, or raises ``down_error`` once worker ``index`` is marked down."""
        task = asyncio.ensure_future(step)
        try:
            await asyncio.wait((task, down), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if not task.done():  # the worker went down first
            task.cancel()
            raise self.down_error(index, stream_id)
        return task.result()

    def _send_cancel(self, index: int, question_id: str) -> None:
        """Asks worker ``index`` to stop a question; its answer is awaited, so a failure (the worker restarting
        meanwhile) is logged here as a line, never by Ray as an unhandled error."""

        async def cancel() -> None:
            try:
                await self.workers[index].cancel.remote(question_id)
            except Exception as err:
                log.info("worker %d did not take the cancel of question %s: %s", index, question_id, err)

        task = asyncio.get_running_loop().create_task(cancel())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
