"""``bench.host_touch`` on a small amount of memory, so a broken script is found here, not on the device."""

from __future__ import annotations

import json

import pytest

from bench import host_touch


def test_both_passes_write_what_the_first_wrote(tmp_path):
    out = tmp_path / "touch.json"

    assert host_touch.main(["--gib", "0.05", "--chunk-gib", "0.02", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    first, second = report["first"], report["second"]
    assert first["bytes"] == second["bytes"] == int(0.05 * host_touch.GIB)
    assert len(first["chunk_gb_per_s"]) == len(second["chunk_gb_per_s"]) == 3  # 0.02 + 0.02 + 0.01 GiB
    assert all(rate > 0 for rate in first["chunk_gb_per_s"] + second["chunk_gb_per_s"])


def test_the_time_limit_ends_the_first_pass_and_sizes_the_second(tmp_path):
    out = tmp_path / "touch.json"

    assert host_touch.main(["--gib", "0.05", "--chunk-gib", "0.01", "--max-s", "0", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["first"]["bytes"] == report["second"]["bytes"] == int(0.01 * host_touch.GIB)  # one chunk, then stop


def test_a_chunk_larger_than_the_total_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        host_touch.parse_args(["--gib", "1", "--chunk-gib", "2", "--out", "x.json"])
    assert stop.value.code == 2
    assert "--chunk-gib" in capsys.readouterr().err
