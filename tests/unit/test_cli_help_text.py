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


def test_bench_service_help_names_the_device_budget_its_default_tower_stream_gives(monkeypatch):
    from mosaic_core.config import BENCH_DEVICE_BUDGET_SHARE, GIB, budget_workspace_bytes
    from services.bench_service_args import main_args
    from services.config import ServiceConfig

    monkeypatch.setenv("COLUMNS", "200")
    text = _help(main_args, ["--help"])
    tower_stream = ServiceConfig().engine_config().tower_stream
    assert tower_stream, "the service runs the vision tower on its own CUDA stream by default"
    less_on = budget_workspace_bytes(tower_stream=True) / GIB
    less_off = budget_workspace_bytes(tower_stream=False) / GIB
    share = f"{BENCH_DEVICE_BUDGET_SHARE:.0%}"
    expected = f"{share} of the GPU memory free once the model is loaded, less {less_on:g} GiB, or {less_off:g} GiB"
    assert f"(default: {expected} with --no-tower-stream)" in text
