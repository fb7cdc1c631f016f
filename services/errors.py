"""Errors to gRPC statuses: every failure leaves the service as a status code with one human sentence.

- Typed errors (``mosaic_core.errors`` and the service errors below) name their code in ``grpc_code``.
- A worker's error crosses Ray wrapped in ``RayTaskError``; it is unwrapped to the original first.
- A restarting worker, or a Redis that cannot be reached or did not answer in time, is ``UNAVAILABLE``: retrying
  later may work. A worker Ray will not restart again is ``FAILED_PRECONDITION`` (``WorkerGoneError``): only a
  restart of the server brings it back.
- Anything else is a bug: ``INTERNAL``, logged with its traceback and an incident id the client sees.

``RESOURCE_EXHAUSTED`` carries a retry hint twice: in the sentence, and as trailing metadata
``retry-after-ms`` (an integer) for programs.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from dataclasses import dataclass

import grpc

from mosaic_core.errors import CapacityError, MosaicError, NotFoundError, OutOfRangeError, UnknownStreamError

RETRY_AFTER_KEY = "retry-after-ms"
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the header of a task error's text
log = logging.getLogger(__name__)


class QueueFullError(CapacityError):
    """A bounded queue is full; ``retry_after_s`` estimates when room frees up."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        # Pickled as it crosses Ray from a worker: rebuilt with its keyword, which ``args`` alone would lose.
        return functools.partial(QueueFullError, retry_after_s=self.retry_after_s), self.args


class DeadlineError(MosaicError):
    """The caller's deadline passed before the work finished."""

    grpc_code = "DEADLINE_EXCEEDED"


class NoFramesYetError(OutOfRangeError):
    """A question about a stream that has ingested nothing yet.

    FAILED_PRECONDITION for the caller; an ``OutOfRangeError`` inside, so that a question over several
    streams skips such a stream the way it skips one whose history misses the time range.
    """

    grpc_code = "FAILED_PRECONDITION"


class QuestionCancelled(MosaicError):
    """The router gave up on the question (client went away)."""

    grpc_code = "CANCELLED"


class StreamDeletedError(UnknownStreamError):
    """The stream was deleted while a question about it waited or was answered: NOT_FOUND, as a question asked after
    the delete is (CANCELLED would tell the client that it cancelled the call itself)."""


class UnavailableError(MosaicError):
    """A worker or the metadata store cannot be reached right now."""

    grpc_code = "UNAVAILABLE"


class WorkerGoneError(MosaicError):
    """A worker Ray will not restart again (it died past its restarts, or failed to start): its streams are served
    again only once the server restarts and a new worker restores them from the data directory."""

    grpc_code = "FAILED_PRECONDITION"


class HistoryNotDeletedError(MosaicError):
    """A stream's history could not be deleted from the disk (a full or failing volume); nothing was deleted, so a
    retry of the delete, once the volume is fixed, deletes it. The sentence names no host path: the log does."""

    grpc_code = "INTERNAL"


class WorkerStartError(MosaicError):
    """A worker whose start (engine build, restore) failed: its process lives but serves nothing, its history left
    as it is on disk, until the server restarts (a ``WorkerGoneError`` would let a DeleteStream delete that history
    from the router, behind a live process)."""

    grpc_code = "FAILED_PRECONDITION"


class UnauthenticatedError(MosaicError):
    """The call carried no API key, or the wrong one."""

    grpc_code = "UNAUTHENTICATED"


class UnknownWatchError(NotFoundError):
    """No watch with this id."""


@dataclass(slots=True)
class Status:
    """What one failed call returns: code, sentence and trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's ``RayTaskError`` wrappers (nested ones included). An untyped one (a bug,
    logged as INTERNAL) gets the worker's traceback as a note, since its own traceback stayed in the worker."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover - ray is a service dependency
        return exc
    remote = _ANSI_COLOUR.sub("", str(exc)) if isinstance(exc, RayTaskError) else None  # the worker's traceback
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if remote and not isinstance(exc, MosaicError):
        exc.add_note(f"in the worker:\n{remote}")
    return exc


def _is_unavailable(exc: BaseException) -> bool:
    try:
        from ray.exceptions import GetTimeoutError, RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, RayActorError | GetTimeoutError)


def is_store_outage(exc: BaseException) -> bool:
    """True for a Redis error that retrying later may cure: the store is down, cut off or frozen, not misused."""
    return _store_sentence(exc) is not None


def _store_sentence(exc: BaseException) -> str | None:
    """What a client is told of a Redis error that retrying later may cure; None for any other exception."""
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, redis.exceptions.TimeoutError):  # frozen, or cut off: past the client's redis_timeout_s
        return "The metadata store (Redis) did not answer in time; retry shortly."
    if isinstance(exc, redis.exceptions.ConnectionError):
        return "The metadata store (Redis) cannot be reached; retry shortly."
    return None


MAX_MESSAGE_BYTES = 6000  # percent-encoded: under gRPC's 8-KiB soft limit on a status message (16 KiB is refused)


def _message(exc: BaseException) -> str:
    text = within_status_limit(str(exc).strip())
    if not text:
        return type(exc).__name__
    return text if text[-1] in ".!?" else text + "."


def within_status_limit(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text``, cut (and said so) where its percent-encoding as a status message passes ``limit`` bytes: gRPC
    sends printable ASCII as it is and every other byte of the UTF-8 as three, so a character may cost up to 12."""
    if len(text) * 12 <= limit:
        return text
    size = 0
    for end, char in enumerate(text):
        size += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "surrogatepass"))
        if size > limit - 60:  # room for the note
            return f"{text[:end]}... (cut: the message was {len(text)} characters)"
    return text


def status_for(exc: BaseException) -> Status:
    """Maps an exception to the status the client sees; logs the unexpected ones."""
    exc = unwrap(exc)
    if isinstance(exc, MosaicError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, QueueFullError):
            trailing = ((RETRY_AFTER_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
        return Status(code, _message(exc), trailing)
    if isinstance(exc, TimeoutError):  # a worker's engine thread or a call to it busy past its wait: retry
        log.warning("timed out: %s", exc)
        return Status(grpc.StatusCode.UNAVAILABLE, f"A worker did not answer in time ({exc}); retry shortly.")
    if (sentence := _store_sentence(exc)) is not None:
        log.warning("metadata store unavailable: %s: %s", type(exc).__name__, exc)
        return Status(grpc.StatusCode.UNAVAILABLE, sentence)
    if _is_unavailable(exc):
        log.warning("backend unavailable: %s", exc)
        return Status(
            grpc.StatusCode.UNAVAILABLE,
            f"A worker or the metadata store is unavailable ({type(exc).__name__}); retry shortly.",
        )
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, incident %s", incident, exc_info=(type(exc), exc, exc.__traceback__))
    return Status(grpc.StatusCode.INTERNAL, f"Internal error (incident {incident}); the server log has details.")


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, metrics=None) -> None:
    """Ends the call with ``exc``'s status (counted in ``mosaic_errors_total``); never returns."""
    status = status_for(exc)
    if metrics is not None:
        metrics.error(status.code.name)
    await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata)
