"""``bench.host_growth`` off a GPU: the same steps with unpinned chunks, so a broken script is found here, not on
the device."""

from __future__ import annotations

import json

import pytest
import torch

from bench import host_growth
from mosaic_core.memory import arena


def test_the_bench_runs_both_ways_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(arena, "HOST_CHUNK_BYTES", arena.HOST_CHUNK_BYTES)  # restored after ``--chunk-mib``
    out = tmp_path / "host-growth.json"
    flags = ["--device", "cpu", "--gib", "0.05", "--chunk-mib", "16", "--window-pages", "1", "--every-ms", "1"]
    flags += ["--start-ms", "100"]

    assert host_growth.main([*flags, "--out", str(out)]) == 0

    off, on = json.loads(out.read_text())["rows"]
    assert (off["ahead"], on["ahead"]) == (False, True)
    assert off["takes"] == on["takes"] == 7 and off["pinned_gib"] == on["pinned_gib"]
    assert (off["chunks_sync"], off["chunks_ahead"]) == (4, 0)
    assert (on["chunks_sync"], on["chunks_ahead"]) == (0, 4)  # the first as the pools were made


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_the_bench_says_it_needs_cuda(tmp_path, capsys):
    assert host_growth.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "CUDA is needed" in capsys.readouterr().err
