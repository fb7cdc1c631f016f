"""Formats the benchmark's JSON report as tables, with each target marked met or not met."""

from __future__ import annotations


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    out = [title, line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def format_report(report: dict) -> str:
    parts = [f"GPU: {report.get('gpu', 'none (CPU)')}; pinned host->device peak {report['pcie_gbs']:.1f} GB/s"]
    a = report.get("A")
    if a:
        rows = []
        for mode, r in a.items():
            recall = "-" if r["recall"] is None else f"{r['recall']:.3f}"
            peak = report["pcie_gbs"]
            frac = f"{r['transfer_gbs'] / peak:.0%}" if peak and r.get("transfer_gbs") else "-"
            rows.append(
                [
                    mode,
                    f"{r['ttft_p50_ms']:.1f}",
                    f"{r['ttft_p95_ms']:.1f}",
                    f"{r['decode_ms_per_token']:.1f}",
                    _fmt_bytes(r["bytes_per_question"]),
                    f"{r['copies_per_question']:.0f}",
                    f"{r['transfer_gbs']:.1f}" if r.get("transfer_gbs") else "-",
                    frac,
                    _fmt_bytes(r["peak_gpu_bytes"]),
                    recall,
                    f"{r.get('hit_ratio', 0):.2f}",
                    str(r.get("layers_scored", "-")),
                    f"{r['ingest_frames_per_s']:.1f}",
                ]
            )
        header = [
            "mode",
            "TTFT p50 ms",
            "p95 ms",
            "decode ms/tok",
            "bytes/q",
            "copies/q",
            "xfer GB/s",
            "of peak",
            "peak GPU mem",
            "recall",
            "hit ratio",
            "layers scored",
            "ingest fps",
        ]
        parts.append(_table("Scenario A: one long stream", header, rows))
        breakdown = []
        for mode, r in a.items():
            profiled = r.get("profiled_ttft_ms", r["ttft_p50_ms"])
            score, fetch = r.get("score_ms", 0.0), r.get("fetch_ms", 0.0)
            row = [mode, f"{profiled:.1f}", f"{score:.1f}", f"{fetch:.1f}", f"{profiled - score - fetch:.1f}"]
            breakdown.append([*row, f"{r.get('floor_ms', 0):.1f}"])
        title = "Scenario A: time to first token by stage (median ms of profiled questions, each stage synchronised)"
        parts.append(_table(title, ["mode", "TTFT", "score", "fetch", "forward+rest", "floor"], breakdown))
    decode = report.get("decode")
    if decode:
        rows = [
            [
                "once per question" if every == "0" else f"every {every} tokens",
                f"{r['decode_ms_per_token']:.1f}",
                _fmt_bytes(r["decode_bytes_per_question"]),
                "-" if r["decode_recall"] is None else f"{r['decode_recall']:.3f}",
                f"{r['prefill_recall']:.3f}",
            ]
            for every, r in decode.items()
        ]
        header = ["re-scoring", "decode ms/tok", "bytes/answer", "decode recall", "prefill recall"]
        parts.append(_table("Decode: re-scoring interval (cluster mode)", header, rows))
    c = report.get("C")
    if c:
        rows = [
            [mode, f"{p['minutes']:.1f}", f"{p['ttft_s'] * 1e3:.1f}", _fmt_bytes(p["peak_bytes"])]
            for mode, points in c.items()
            for p in points
        ]
        parts.append(
            _table("Scenario C: scaling with stream length", ["mode", "minutes", "TTFT ms", "peak GPU mem"], rows)
        )
    b = report.get("B")
    if b:
        rows = [
            [
                mode,
                f"{r['ingest_frames_per_s']:.1f}",
                f"{r['realtime_cameras']:.0f}",
                f"{r.get('ingest_pass_ms', 0):.0f}",
                f"{r.get('vision_ms_per_pass', 0):.0f}",
                f"{r['ttft_p50_ms']:.1f}",
                f"{r['ttft_p99_ms']:.1f}",
                f"{r['hit_ratio']:.2f}",
                _fmt_bytes(r["device_bytes_used"]),
                _fmt_bytes(r["host_bytes_used"]),
            ]
            for mode, r in b.items()
        ]
        header = [
            "mode",
            "ingest fps",
            "1-fps cams",
            "pass ms",
            "vision ms",
            "TTFT p50 ms",
            "p99 ms",
            "hit ratio",
            "device",
            "host",
        ]
        parts.append(_table("Scenario B: many cameras", header, rows))
    parts.append(_targets(report))
    return "\n\n".join(parts)


def _targets(report: dict) -> str:
    lines = ["Targets:"]
    a, b = report.get("A", {}), report.get("B", {})
    if "cluster" in a and "token" in a:
        cl, tk = a["cluster"], a["token"]
        speedup = tk["ttft_p50_ms"] / max(cl["ttft_p50_ms"], 1e-9)
        recall_ok = (cl["recall"] or 0) >= (tk["recall"] or 0) - 1e-9
        lines.append(
            _line(
                speedup >= 1.5 and recall_ok,
                f"cluster TTFT {speedup:.2f}x faster than token (>= 1.5x), recall "
                f"{cl['recall'] or 0:.3f} vs {tk['recall'] or 0:.3f} (>=)",
            )
        )
        frac = cl.get("transfer_gbs", 0) / report["pcie_gbs"] if report["pcie_gbs"] else 0
        lines.append(_line(frac >= 0.9, f"cluster retrieval transfers at {frac:.0%} of the measured peak (>= 90%)"))
        floor = cl.get("floor_ms", 0)
        ratio = cl["ttft_p50_ms"] / floor if floor else float("inf")
        lines.append(_line(ratio <= 2.0, f"cluster TTFT {ratio:.2f}x its floor of {floor:.1f} ms (<= 2x)"))
    if "cluster" in b:
        cams = b["cluster"]["realtime_cameras"]
        lines.append(_line(cams >= 100, f"{cams:.0f} real-time 1-fps cameras ingested (>= 100)"))
    return "\n".join(lines)


def _line(met: bool, text: str) -> str:
    return f"  [{'met' if met else 'NOT met'}] {text}"
