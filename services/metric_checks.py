"""Checks of metric label values and samples, shared by the service's metric classes."""

from __future__ import annotations


def check_label(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{kind} {value!r} is not one of {allowed}")
    return value


def worker_label(worker: int | str) -> str:
    label = str(worker)
    if not label.isdigit() or not label.isascii():
        raise ValueError(f"worker {worker!r} must be a worker index such as '0' or 1")
    return label


def non_negative(name: str, value: float) -> float:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name}={value!r} must be >= 0")
    return value
