"""The rules a stream's or a watch's labels follow: they travel in every listing, to Redis and into the journals."""

from __future__ import annotations

from mosaic_core.errors import InvalidArgumentError

MAX_LABELS = 32
MAX_LABEL_NAME_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256


def check_labels(labels: dict, owner: str) -> None:
    """Refuses more than ``MAX_LABELS`` labels, an empty or overlong name or value, or one that is not printable
    text (it is shown in terminals and pages); ``owner`` names what carries them ("a stream", "a watch")."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(f"{owner} takes at most {MAX_LABELS} labels, got {len(labels)}")
    for name, value in labels.items():
        if not (isinstance(name, str) and isinstance(value, str) and name):
            raise InvalidArgumentError("labels must map non-empty names to strings")
        if len(name) > MAX_LABEL_NAME_CHARS or len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgumentError(
                f"label {name[:MAX_LABEL_NAME_CHARS]!r}: names take at most {MAX_LABEL_NAME_CHARS} characters and "
                f"values {MAX_LABEL_VALUE_CHARS}"
            )
        if not (name.isprintable() and value.isprintable()):
            raise InvalidArgumentError(f"label {name!r}: names and values must be printable text")
