"""The engine's command line, run as a user would, on a real sample clip."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _mosaic(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mosaic_core.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ask_video_streams_an_answer_with_evidence_and_stats():
    result = _mosaic(
        "ask-video", "bikes.mp4", "--question", "When did the cyclist pass?", "--fps", "2", "--max-frames", "12",
        "--tokens-per-frame", "16", "--window-tokens", "48", "--budget-tokens", "96", "--max-new-tokens", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "answer:" in out and "random weights" in out
    assert "evidence (ranked time spans the answer drew on):" in out and "#1" in out
    for row in ("frames", "clusters", "bytes per tier", "time to first token", "decode"):
        assert row in out
    assert "encoding " in result.stderr and "12/12" in result.stderr  # progress while encoding (plain lines: no TTY)


def test_the_readmes_ask_video_command_answers_with_evidence():
    # The command a newcomer copies first, as the README spells it: the whole clip at the default budgets, whose
    # default device budget must hold a question's working set however the clip's frames fill the arena's pages.
    line = next(
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(".venv/bin/mosaic ask-video")
    )
    result = _mosaic(*shlex.split(line)[1:])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout, result.stdout
    evidence = result.stdout.split("evidence (ranked time spans the answer drew on):")[1].split("stats:")[0]
    assert "#1" in evidence and "(none" not in evidence


def test_ask_video_reports_a_missing_file_clearly():
    result = _mosaic("ask-video", "no-such-clip.mp4", "--question", "hi?")
    assert result.returncode == 2
    assert "error:" in result.stderr and "no-such-clip.mp4" in result.stderr


def test_ask_video_on_a_four_frame_clip_still_gives_evidence():
    # carphone_pristine.mp4 lasts 4 s: at 1 fps the default window must leave frames to cluster
    result = _mosaic("ask-video", "carphone_pristine.mp4", "--question", "What moved?", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    evidence = result.stdout.split("evidence (ranked time spans the answer drew on):")[1].split("stats:")[0]
    assert "#1" in evidence and "(none" not in evidence
