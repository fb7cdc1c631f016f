"""Help texts that name choices or defaults say what the code does: a list written out by hand fell behind
(``mosaic --help`` named eight of the nine benchmarks, without ``pages``)."""

from __future__ import annotations

import contextlib
import io

import pytest

from mosaic_core.cli import BENCH_TARGETS, build_parser


def _help(parse, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(argv)
    return " ".join(out.getvalue().split())  # argparse wraps lines wherever the terminal width puts them


def test_mosaic_help_names_every_benchmark(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse would break a word longer than a narrow terminal's line
    text = _help(build_parser().parse_args, ["--help"])
    assert f"mosaic bench {'|'.join(BENCH_TARGETS)} [ARGS...]" in text
