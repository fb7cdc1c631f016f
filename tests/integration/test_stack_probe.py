"""The stack probe counts a thread's time to the functions it was in, a C call that holds the GIL at its length."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services import stack_probe


def _spin_in_python(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _held_in_c(limit: int) -> int:
    return sum(range(limit))  # one C call: the sampler cannot look until it returns


def _work(durations: dict[str, float]) -> None:
    started = time.perf_counter()
    _spin_in_python(0.6)
    durations["spin"] = time.perf_counter() - started
    started = time.perf_counter()
    _held_in_c(20_000_000)
    durations["held"] = time.perf_counter() - started


def _sampled(tmp_path, work, args, **sample_kwargs) -> dict:
    """Runs ``work(*args)`` on a thread that the probe samples until it ends; returns the last snapshot."""
    worker = threading.Thread(target=work, args=args, name="worked")
    path, stop = tmp_path / "stacks-test-1.json", threading.Event()
    sampler = threading.Thread(target=stack_probe.sample, args=(worker, path, stop), kwargs=sample_kwargs, daemon=True)
    worker.start()
    sampler.start()
    worker.join(30)
    sampler.join(10)
    return stack_probe.read_latest(tmp_path, "test")


def _sampled_in_a_process_of_its_own(tmp_path) -> tuple[dict, dict]:
    """``_sampled(tmp_path, _work, ...)`` in a new Python process: (durations, totals)."""
    script = (
        "import json, sys; from pathlib import Path; sys.path[:0] = sys.argv[1:3]; import test_stack_probe as probe; "
        "durations = {}; totals = probe._sampled(Path(sys.argv[3]), probe._work, (durations,)); "
        "print(json.dumps([durations, totals]))"
    )
    here = Path(__file__).resolve().parent
    run = subprocess.run(
        [sys.executable, "-c", script, str(here), str(here.parents[1]), str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    durations, totals = json.loads(run.stdout)
    return durations, totals


def test_the_probe_counts_each_function_at_its_length_a_gil_holding_c_call_included(tmp_path):
    """Sampled in a process of its own: in the test process, threads earlier tests left behind could take the GIL
    that the C call gives up before the sampler did (once in a whole CI run), and the time went to the caller."""
    durations, totals = _sampled_in_a_process_of_its_own(tmp_path)
    inclusive = totals["inclusive"]
    assert inclusive["test_stack_probe.py:_spin_in_python"] > 0.7 * durations["spin"]
    assert durations["held"] > 0.1  # long enough for the sampler to have wanted the GIL many times
    assert inclusive["test_stack_probe.py:_held_in_c"] > 0.7 * durations["held"]
    assert inclusive["test_stack_probe.py:_work"] >= inclusive["test_stack_probe.py:_held_in_c"]
    assert any(key.startswith("test_stack_probe.py:_held_in_c:") for key in totals["self"])


def test_busiest_ranks_what_grew_between_two_snapshots_per_second_sampled():
    before = {"sampled_s": 10.0, "self": {"a.py:f:1": 4.0}, "inclusive": {"a.py:f": 4.0, "a.py:main": 10.0}}
    after = {
        "sampled_s": 12.0,
        "self": {"a.py:f:1": 4.5, "b.py:g:7": 1.5},
        "inclusive": {"a.py:f": 4.5, "b.py:g": 1.5, "a.py:main": 12.0},
    }
    busiest = stack_probe.busiest(before, after, top=2)
    assert busiest["window_s"] == 2.0
    assert busiest["self"] == [("b.py:g:7", 0.75), ("a.py:f:1", 0.25)]
    assert busiest["inclusive"] == [("a.py:main", 1.0), ("b.py:g", 0.75)]
    assert stack_probe.busiest(after, before) is None


def _stall_then_spin(durations: dict[str, float], chances: list[float]) -> None:
    started = time.perf_counter()
    _spin_in_python(0.5)  # no chance to start a question all this while
    durations["stall"] = time.perf_counter() - started
    started = time.perf_counter()
    until = started + 0.5
    while time.perf_counter() < until:  # a chance every few milliseconds
        chances[0] = time.perf_counter()
        _held_in_c(20_000)
    durations["served"] = time.perf_counter() - started


def test_the_probe_counts_apart_what_the_thread_did_in_stretches_without_a_chance(tmp_path):
    durations: dict[str, float] = {}
    chances = [time.perf_counter()]
    since_chance = lambda: time.perf_counter() - chances[0]  # noqa: E731
    totals = _sampled(tmp_path, _stall_then_spin, (durations, chances), since_chance=since_chance)
    slow = totals["slow_inclusive"]
    # the first SLOW_STRETCH_S of the stall is not yet slow; the served half never is
    expected = durations["stall"] - stack_probe.SLOW_STRETCH_S
    assert 0.7 * expected < totals["slow_sampled_s"] < durations["stall"] + 0.05
    assert slow["test_stack_probe.py:_spin_in_python"] > 0.7 * expected
    assert slow.get("test_stack_probe.py:_held_in_c", 0.0) < 0.05
    assert totals["inclusive"]["test_stack_probe.py:_held_in_c"] > 0.3 * durations["served"]
    busiest = stack_probe.busiest({"sampled_s": 0.0, "self": {}, "inclusive": {}}, totals)
    assert busiest["slow_s_per_s"] == totals["slow_sampled_s"] / totals["sampled_s"]
    assert busiest["slow_inclusive"][0][1] > 0
    assert "slow_after" not in totals  # no chance_kind given


def _stall_after_each_kind(durations: dict[str, float], chances: list) -> None:
    for kind, stall_s in (("call_start", 0.5), ("pause", 0.25)):
        chances[0] = (kind, time.perf_counter())
        _spin_in_python(stall_s)
        durations[kind] = stall_s


def test_the_probe_splits_the_slow_stretches_by_the_chance_they_began_at(tmp_path):
    durations: dict[str, float] = {}
    chances = [("loop", time.perf_counter())]
    totals = _sampled(
        tmp_path,
        _stall_after_each_kind,
        (durations, chances),
        since_chance=lambda: time.perf_counter() - chances[0][1],
        chance_kind=lambda: chances[0][0],
    )
    after = totals["slow_after"]
    for kind, stall_s in durations.items():
        assert 0.7 * (stall_s - stack_probe.SLOW_STRETCH_S) < after[kind] < stall_s + 0.05
    assert after["call_start"] > after["pause"]
    assert sum(after.values()) == pytest.approx(totals["slow_sampled_s"])
    lines = {key.split(" | ")[0] for key, seconds in totals["slow_after_self"].items() if seconds > 0}
    assert lines <= {"call_start", "pause"}
    busiest = stack_probe.busiest({"sampled_s": 0.0, "self": {}, "inclusive": {}}, totals)
    assert [kind for kind, _ in busiest["slow_after"]] == ["call_start", "pause"]
    assert busiest["slow_after_self"][0][0].startswith("call_start | test_stack_probe.py:_spin_in_python:")
