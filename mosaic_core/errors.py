"""Typed errors for misuse of the engine.

Three kinds of failure, kept apart on purpose:
- an expected shortfall (no room) is a return value (``None`` or a result that says so), not an error;
- misuse raises one of the errors below, with the offending values in the message;
- a broken internal invariant is an ``assert`` with a message.

The service maps these classes to gRPC status codes, so each class names the code it stands for.
"""

from __future__ import annotations


def cut(text: str, limit: int) -> str:
    """``text``, or when it is longer than ``limit`` characters, its first ``limit`` and how long it was: what a
    message or a reply repeats of a value a caller sent, which may be megabytes (gRPC refuses a status message over
    16 KiB, with a status of its own and no sentence)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: object, limit: int = 64) -> str:
    """``value`` quoted for a message (``repr``), a string cut to ``limit`` characters as ``cut`` does."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


class MosaicError(Exception):
    """Base class of every error the engine raises on purpose. ``stream_id``, set by an ingest call that fails: the
    stream whose frames alone made it fail, so that the caller can go on without them; None where no one stream
    did."""

    grpc_code = "INTERNAL"
    stream_id: str | None = None


class InvalidArgumentError(MosaicError, ValueError):
    """The caller passed something malformed: a bad frame, shape, id or setting."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidFrameError(InvalidArgumentError):
    """A frame has the wrong dtype, rank or size, or could not be decoded."""


class EmptyBatchError(InvalidArgumentError):
    """An ingest call carried no frames."""


class TimestampOrderError(InvalidArgumentError):
    """A frame's timestamp is not later than the previous frame of its stream."""


class RefusedSourceError(InvalidArgumentError):
    """A source serves what this server refuses to read (from a file or over HTTP, a playlist or another container
    outside ``SOURCE_FORMATS``): trying again cannot help."""


class ConfigError(InvalidArgumentError):
    """A configuration value is out of range or inconsistent with another."""


class BudgetError(ConfigError):
    """A memory or token budget cannot hold what it must always hold (sink + local window)."""


class UnknownPolicyError(ConfigError):
    """An eviction policy or mode was named that does not exist."""


class NotFoundError(MosaicError, KeyError):
    """Something addressed by id does not exist."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnknownStreamError(NotFoundError):
    """No stream with this id is open on this engine."""


class UnknownClusterError(NotFoundError):
    """No cluster with this id is tracked."""


class AlreadyExistsError(MosaicError):
    """A stream or cluster with this id already exists."""

    grpc_code = "ALREADY_EXISTS"


class StreamClosedError(MosaicError):
    """The stream was closed; it accepts no frames or questions."""

    grpc_code = "FAILED_PRECONDITION"


class StateError(MosaicError):
    """An operation is not valid in the current state (double free, unpin below zero, ...)."""

    grpc_code = "FAILED_PRECONDITION"


class OutOfRangeError(MosaicError):
    """A requested time range lies outside what the stream retains."""

    grpc_code = "OUT_OF_RANGE"


class CapacityError(MosaicError):
    """No room now: every tier is full of pinned data. Retrying later may succeed."""

    grpc_code = "RESOURCE_EXHAUSTED"
