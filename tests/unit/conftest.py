"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

import mosaic_core.durable.checks as checks
import mosaic_core.durable.manifest as manifest
import mosaic_core.durable.retired as retired


@pytest.fixture
def synced_dirs(monkeypatch) -> list[str]:
    """Every folder the durable modules sync (``fsync_dir``), in order; each is still synced."""
    synced: list[str] = []
    real_fsync_dir = manifest.fsync_dir

    def fsync_dir(directory) -> None:
        synced.append(str(directory))
        real_fsync_dir(directory)

    for module in (manifest, retired, checks):
        monkeypatch.setattr(module, "fsync_dir", fsync_dir)
    return synced
