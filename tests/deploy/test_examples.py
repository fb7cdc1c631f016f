"""The example client builds valid requests from the generated stubs and starts as a script."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT = REPO_ROOT / "deploy" / "examples" / "client.py"


def _load_client():
    spec = importlib.util.spec_from_file_location("mosaic_example_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_frames_are_valid_raw_frames() -> None:
    frames = list(_load_client().synthetic_frames("cam-1", num_frames=5, height=64, width=96))
    assert [f.stream_id for f in frames] == ["cam-1"] * 5
    assert all(b.timestamp_s > a.timestamp_s for a, b in itertools.pairwise(frames))
    for frame in frames:
        assert frame.WhichOneof("payload") == "raw"
        assert len(frame.raw.rgb) == frame.raw.height * frame.raw.width * frame.raw.channels == 64 * 96 * 3


def test_client_starts_as_a_script() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(CLIENT), "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0 and "--target" in result.stdout, result.stderr
