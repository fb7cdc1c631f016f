"""The rules a stream's or a watch's labels follow: they travel in every listing, to Redis and into the journals."""

from __future__ import annotations

from mosaic_core.errors import InvalidArgumentError

MAX_LABELS = 32
MAX_LABEL_NAME_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256


def check_label_shape(labels: dict, owner: str) -> None:
    """Refuses more than ``MAX_LABELS`` labels, or one that is not a non-empty name with a string: what every
    stored watch has always met, so a record read back is checked with this and no more."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(f"{owner} takes at most {MAX_LABELS} labels, got {len(labels)}")
    if not all(isinstance(name, str) and isinstance(value, str) and name for name, value in labels.items()):
        raise InvalidArgumentError("labels must map non-empty names to strings")


def check_labels(labels: dict, owner: str) -> None:
    """``check_label_shape``, and refuses an overlong name or value, or one that is not printable text (it is
    shown in terminals and pages): the rules of a new stream or watch. ``owner`` names what carries them ("a
    stream", "a watch")."""
    check_label_shape(labels, owner)
    for name, value in labels.items():
        if len(name) > MAX_LABEL_NAME_CHARS or len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgumentError(
                f"label {name[:MAX_LABEL_NAME_CHARS]!r}: names take at most {MAX_LABEL_NAME_CHARS} characters and "
                f"values {MAX_LABEL_VALUE_CHARS}"
            )
        if not (name.isprintable() and value.isprintable()):
            raise InvalidArgumentError(f"label {name!r}: names and values must be printable text")
