"""The benchmark report never reads a missing measurement as a number, and KL is zero only for equal states."""

from __future__ import annotations

import torch

from mosaic_core.bench.report import format_report
from mosaic_core.engine.probes import next_token_kl, probe_spans


def _row(**overrides) -> dict:
    row = {
        "mode": "cluster",
        "scorer": None,
        "ttft_p50_ms": 40.0,
        "ttft_p95_ms": 50.0,
        "decode_ms_per_token": 20.0,
        "bytes_per_question": 1 << 20,
        "bytes_all_per_question": 2 << 20,
        "copies_per_question": 10,
        "transfer_gbs": None,
        "hit_ratio": None,
        "peak_gpu_bytes": 0,
        "floor_ms": 30.0,
        "recall": None,
        "recall_by_scorer": {},
        "probe_found": None,
        "probe_found_by_scorer": {},
        "probe_span_mass": None,
    }
    return row | overrides


def test_missing_recall_and_probe_read_as_not_measured_never_as_met():
    report = {
        "gpu": "NVIDIA H200",
        "pcie_gbs": 50.0,
        "budget_tokens": 100,
        "A": {"frame": _row(mode="frame", ttft_p50_ms=60.0), "cluster": _row()},
    }
    text = format_report(report)
    assert "[not measured] recall: cluster missing vs missing" in text
    assert "[not measured] planted-probe found fraction: cluster missing vs missing" in text
    assert "[met] recall" not in text


def test_measured_recall_is_compared():
    report = {
        "gpu": "NVIDIA H200",
        "pcie_gbs": 50.0,
        "A": {"frame": _row(mode="frame", recall=0.6, probe_found=0.9), "cluster": _row(recall=0.5, probe_found=0.8)},
    }
    text = format_report(report)
    assert "[NOT met] recall: cluster 0.500 vs 0.600" in text
    assert "[NOT met] planted-probe found fraction: cluster 0.800 vs 0.900" in text


def test_next_token_kl_is_zero_for_equal_states_and_positive_otherwise(tiny_model):
    hidden = torch.randn(tiny_model.config.text_config.hidden_size)
    assert next_token_kl(tiny_model, hidden, hidden) == 0.0
    assert next_token_kl(tiny_model, hidden, -hidden) > 0.0


def test_probe_spans_stay_inside_the_stored_frames():
    spans = probe_spans(100, 3, span_frames=4)
    assert len(spans) == 3 and len(set(spans)) == 3
    assert all(first >= 0 and last == first + 3 and last < 100 for first, last in spans)
