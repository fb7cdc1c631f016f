"""The soak benchmark's arithmetic: slopes per hour after warm-up, durations, the terminal plot."""

from __future__ import annotations

import argparse

import pytest

from services.bench_soak import Sample, parse_duration, slope_per_hour, sparkline


def _samples(values, step_s=60.0):
    return [
        Sample(t_s=i * step_s, router_rss_mb=0.0, worker_rss_mb=v, tier_bytes_mb=0.0, clusters=0.0, lag_max_s=0.0,
               dropped=0.0, ttft_p50_ms=None, ttft_p99_ms=None)
        for i, v in enumerate(values)
    ]  # fmt: skip


def test_slope_is_per_hour_and_ignores_warm_up():
    growing = _samples([500.0] * 5 + [1000.0 + 2.5 * i for i in range(30)])  # 2.5 MB a minute after 5 min
    assert slope_per_hour(growing, "worker_rss_mb", warmup_s=5 * 60) == pytest.approx(150.0)
    flat = _samples([100.0 + (i % 2) for i in range(40)])
    assert abs(slope_per_hour(flat, "worker_rss_mb", warmup_s=0)) < 1.0
    assert slope_per_hour(_samples([1.0, 2.0]), "worker_rss_mb", warmup_s=0) is None  # too few points
    assert slope_per_hour(growing, "ttft_p99_ms", warmup_s=0) is None  # no questions were asked


def test_durations_take_units():
    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1.5h")] == [90, 90, 1800, 7200, 5400]
    with pytest.raises(argparse.ArgumentTypeError, match="like 90s"):
        parse_duration("two hours")


def test_sparkline_spans_the_whole_series():
    line = sparkline([float(v) for v in range(200)])
    assert line.startswith("▁") and line.split()[0].endswith("█") and line.endswith("0..196")
    assert sparkline([]) == ""


def test_engine_thread_parts_become_milliseconds_a_second_between_samples():
    from services.bench_soak import engine_part_totals, per_second_ms

    def scrape(upkeep_w0: float, upkeep_w1: float, other: float) -> str:
        return "\n".join([
            f'mosaic_engine_loop_seconds_total{{worker="0",part="ingest_upkeep"}} {upkeep_w0}',
            f'mosaic_engine_loop_seconds_total{{worker="1",part="ingest_upkeep"}} {upkeep_w1}',
            f'mosaic_engine_loop_seconds_total{{worker="0",part="other"}} {other}',
            'mosaic_engine_loop_seconds_totalx{worker="0",part="other"} 99',
        ])  # fmt: skip

    before, now = engine_part_totals(scrape(1.0, 0.5, 2.0)), engine_part_totals(scrape(1.6, 0.9, 2.0))
    assert now == {"ingest_upkeep": 2.5, "other": 2.0}
    assert per_second_ms(now, before, "ingest_upkeep", 20.0) == pytest.approx(50.0)  # 1.0 s over 20 s
    assert per_second_ms(now, before, "other", 20.0) == 0.0
    assert per_second_ms(now, {}, "ingest_upkeep", 20.0) is None  # the first sample has nothing to compare with
