"""Every GPU call script in ``bench/calls`` runs commands whose flags the benchmarks accept and whose results land
under ``$OUT``: a typo found on the H200 costs minutes of a scarce device budget, found here it costs nothing.

Each script runs with ``MOSAIC_CALLS_DRY_RUN=1``, which prints each step's command instead of running it; each
command is then parsed by its benchmark's own argument checks, which exit before anything loads."""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CALLS = sorted(p for p in (ROOT / "bench" / "calls").glob("*.sh") if p.name != "head.sh")
BENCH = ["python3", "-m", "mosaic_core.cli", "bench"]
PYTEST = ["python3", "-m", "pytest"]


def _commands(script: Path, out: Path, **env: str) -> list[list[str]]:
    run = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "MOSAIC_CALLS_DRY_RUN": "1", "OUT": str(out), **env},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return [shlex.split(line) for line in run.stdout.splitlines() if line.strip()]


def _check_bench(argv: list[str], out: Path) -> None:
    name, flags = argv[len(BENCH)], argv[len(BENCH) + 1 :]
    if name == "engine":
        from mosaic_core.bench.engine import main_args
    elif name == "service":
        from services.bench_service import main_args
    elif name == "decode":
        from mosaic_core.bench.decode_batch import main_args
    else:
        pytest.fail(f"no argument check for `mosaic bench {name}`; add it here")
    main_args(flags)  # argparse exits with status 2 on a bad flag or value
    assert "--out" in flags, "a call's results must come back"
    assert Path(flags[flags.index("--out") + 1]).parent == out, "results outside $OUT do not come back"


def test_the_calls_are_found():
    assert len(CALLS) >= 5


@pytest.mark.parametrize("script", CALLS, ids=lambda p: p.name)
def test_a_call_runs_benchmarks_and_tests_that_exist(script, tmp_path):
    commands = _commands(script, tmp_path)
    assert commands, f"{script.name} runs no step"
    for argv in commands:
        if argv[: len(BENCH)] == BENCH:
            _check_bench(argv, tmp_path)
        elif argv[:2] == ["python3", "-m"] and argv[2] in (
            "bench.copy_runs_sweep",
            "bench.host_growth",
            "bench.host_touch",
        ):
            flags = importlib.import_module(argv[2]).parse_args(argv[3:])  # exits with status 2 on a bad flag
            assert flags.out.parent == tmp_path, "results outside $OUT do not come back"
        elif argv[: len(PYTEST)] == PYTEST:
            paths = [arg for arg in argv[len(PYTEST) :] if not arg.startswith("-") and arg != "no:cacheprovider"]
            assert paths, argv
            for path in paths:
                assert (ROOT / path.split("::")[0]).exists(), path
        else:
            pytest.fail(f"{script.name}: a step this test cannot check: {shlex.join(argv)}")


@pytest.mark.parametrize(("script", "env"), [("closing-service.sh", {"EXTRA": "--no-tower-stream --no-encode-ahead"}),
                                             ("closing-engine.sh", {"TOWER_STREAM": "off,on"})])  # fmt: skip
def test_a_calls_settings_reach_its_command(script, env, tmp_path):
    (command,) = _commands(ROOT / "bench" / "calls" / script, tmp_path, **env)
    _check_bench(command, tmp_path)
    for value in env.values():
        assert all(word in command for word in value.split()), command


def test_a_bad_flag_fails_the_check(tmp_path):
    """The check this file relies on: the service benchmark refuses a flag it does not know."""
    with pytest.raises(SystemExit) as stop:
        _check_bench([*BENCH, "service", "--no-such-flag", "--out", str(tmp_path / "x")], tmp_path)
    assert stop.value.code == 2
