"""The results of ``mosaic bench service``: one step's figures, the real-time rule, the table and the files."""

from __future__ import annotations

import json
from pathlib import Path

from services import gc_watch, stack_probe
from services.bench_service_step import (
    LAG_LIMIT_S,
    MAX_BACKLOG_GROWTH_SHARE,
    MIN_INGESTED_SHARE,
    MIN_QUESTIONS_SENT_SHARE,
    MIN_RECEIVED_SHARE,
    StepResult,
)

UNBOUNDED_GIB = 2.0**20  # a tier budget this large (a PiB) is the service's "no budget"


def describe(step: StepResult) -> str:
    f = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}"  # noqa: E731
    failures = step.failures
    return (
        f"{f(step.received_fps)} received, {step.ingested_fps:.1f} ingested of {step.offered_fps:.0f} frames/s, lag "
        f"p99 {f(step.lag_p99_s, ' s')} (worst camera {f(step.worst_camera_lag_p99_s, ' s')}), {step.dropped} dropped, "
        f"TTFT p99 {f(step.ttft_p99_ms, ' ms')}, "
        + ("real-time" if not failures else "NOT real-time: " + "; ".join(failures))
    )


COLUMNS = (
    # (header, key, format); a key of None is a cell built from several (cell)
    ("N", "cameras", "{:d}"),
    ("pull/push", None, None),
    ("offered/s", "offered_fps", "{:.1f}"),
    ("received/s", "received_fps", "{:.1f}"),
    ("ingested/s", "ingested_fps", "{:.1f}"),
    ("backlog +", "backlog_growth_frames", "{:+.0f}"),
    ("lag p50 s", "lag_p50_s", "{:.2f}"),
    ("lag p99 s", "lag_p99_s", "{:.2f}"),
    ("worst cam p99 s", "worst_camera_lag_p99_s", "{:.2f}"),
    ("to-KV p50 s", "ingest_latency_p50_s", "{:.2f}"),
    ("to-KV p99 s", "ingest_latency_p99_s", "{:.2f}"),
    ("drops", "dropped", "{:d}"),
    ("push skipped", "push_skipped", "{:d}"),
    ("questions", None, None),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
    ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}"),
    ("decode ms/tok", "decode_ms_per_token", "{:.1f}"),
    ("GPU MiB", "gpu_memory_used_mib", "{:.0f}"),
    ("KV dev GiB", "device_kv_gib", "{:.3g}"),
    ("router cpu/s", "router_cpu_per_s", "{:.2f}"),
    ("worker cpu/s", "worker_cpu_per_s", "{:.2f}"),
    ("decode cpu/s", "decode_cpu_per_s", "{:.3f}"),
    ("decode cpu/s est", "decode_cpu_estimate_per_s", "{:.3f}"),
    ("real-time", "real_time", None),
)


def cell(step: dict, header: str) -> str:
    """A cell built from several of the step's figures: pulled/pushed cameras; questions answered/sent/nominal."""
    if header == "pull/push":
        return f"{step['pulled']}/{step['pushed']}"
    return f"{step['questions']}/{step['questions_sent']}/{step['questions_nominal']:.0f}"


def step_row(step: StepResult) -> dict:
    """A step as the report's JSON holds it: its fields, its derived figures, and the rule's verdict."""
    failures = step.failures
    return {
        **{name: getattr(step, name) for name in StepResult.__slots__},
        "device_kv_gib": step.device_kv_gib,
        "failures": failures,
        "real_time": not failures,
    }


def table(report: dict) -> str:
    """The steps' columns, the footer, then each step's notes, a line each beginning with its N."""
    lines = _column_lines(report["steps"])
    lines += footer(report)
    settle_s = report["args"].get("settle_s")
    for step in report["steps"]:
        notes = [
            *_rule_notes(step, settle_s),
            *_engine_thread_notes(step),
            *_latency_notes(step),
            *_storage_notes(step),
            *_stack_notes(step.get("engine_stacks")),
        ]
        lines += [f"N={step['cameras']}: {note}" for note in notes]
    return "\n".join(lines)


def _column_lines(steps: list[dict]) -> list[str]:
    rows = [[header for header, _, _ in COLUMNS]]
    for step in steps:
        row = []
        for header, key, fmt in COLUMNS:
            if key is None:
                row.append(cell(step, header))
            elif key == "real_time":
                row.append("yes" if step[key] else "no")
            else:
                row.append("-" if step[key] is None else fmt.format(step[key]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return ["  ".join(text.rjust(w) for text, w in zip(row, widths, strict=True)) for row in rows]


def _rule_notes(step: dict, settle_s: float | None) -> list[str]:
    """Why the step is not real-time, and when its lags settled."""
    notes = []
    if step.get("failures"):
        notes.append("not real-time: " + "; ".join(step["failures"]))
    if "settled_after_s" in step:
        settled = step["settled_after_s"]
        notes.append(
            f"every lag under {LAG_LIMIT_S:.0f} s "
            + (f"{settled:.0f} s after the warm-up" if settled is not None else f"never within {settle_s:g} s")
            + "; measured after that"
        )
    return notes


def _engine_thread_notes(step: dict) -> list[str]:
    """The worker's engine thread's time and ingest calls, its GPU allocator, kernel compiles and GIL waits."""
    share = ", ".join(f"{part} {s:.2f}" for part, s in step["engine_thread_share"].items())
    per_call, passes = step["frames_per_ingest_call"], step.get("forward_passes_per_ingest_call")
    ahead = step.get("ingest_calls_encoded_ahead")
    notes = [
        f"the worker's engine thread, seconds per second: {share or '-'}; frames per "
        f"ingest call: {'-' if per_call is None else f'{per_call:.1f}'}, forward passes per call: "
        f"{'-' if passes is None else f'{passes:.2f}'}"
        + ("" if ahead is None else f", share of calls with their tower queued ahead: {ahead:.2f}")
    ]
    if step.get("allocator_events"):
        events = ", ".join(f"{event} {n}" for event, n in step["allocator_events"].items())
        notes.append(
            f"the GPU allocator during the step: {events} (a retry gave back the cache and waited for the GPU)"
        )
    if step.get("kernel_compiles"):
        notes.append(
            f"Triton kernel variants compiled during the step: {step['kernel_compiles']} "
            "(each held the engine thread; the warm-up missed them)"
        )
    gil = step.get("worker_gil")
    if gil is not None:
        notes.append(
            f"the worker's GIL: a 2-ms sleep woke {gil['mean_late_ms']:.2f} ms late on "
            f"average, {gil['share_over_1ms']:.0%} of them over 1 ms late"
        )
    return notes


def _latency_notes(step: dict) -> list[str]:
    """Where a question's time to first token went, and the gaps between the engine's chances to start one."""
    notes = []
    if step.get("start_wait_p50_ms") is not None:
        notes.append(
            f"the server's TTFT p50 / p99 {step['server_ttft_p50_ms']:.0f} / "
            f"{step['server_ttft_p99_ms']:.0f} ms; of a question's, waiting on the worker for the engine "
            f"{step['start_wait_p50_ms']:.0f} / {step['start_wait_p99_ms']:.0f} ms, the engine's prefill to first "
            f"token {step['engine_ttft_p50_ms']:.0f} / {step['engine_ttft_p99_ms']:.0f} ms (each its own "
            "percentiles)"
        )
    if step.get("transport_p50_ms") is not None:
        notes.append(
            f"outside the engine thread, the first token from the engine thread to the "
            f"thread sending it {step['handoff_p50_ms']:.1f} / {step['handoff_p99_ms']:.1f} ms, between router "
            f"and worker both ways {step['transport_p50_ms']:.1f} / {step['transport_p99_ms']:.1f} ms (p50 / p99)"
        )
    gaps = step.get("question_start_gaps")
    if gaps:
        parts = [
            f"{between} {g['count']} (p50 < {g['p50_under_ms']:.0f}, p99 < {g['p99_under_ms']:.0f} ms, "
            f"{g['over_100ms']} over 100 ms)"
            for between, g in sorted(gaps.items(), key=lambda item: -item[1]["p99_under_ms"])
        ]
        notes.append("gaps between chances to start a question: " + "; ".join(parts))
    return notes


def _storage_notes(step: dict) -> list[str]:
    """The durable history's writes, and the KV each tier held and moved."""
    notes = []
    durable = step.get("durable")
    if durable is not None:
        notes.append(
            f"durable history: {durable['written_mb_per_s']:.1f} MB/s of records written, "
            f"the writer threads busy {durable['writers_busy_s_per_s']:.2f} s/s (summed), the engine thread "
            f"waiting for them {durable['ingest_wait_s_per_s']:.2f} s/s"
        )
    tiers = step.get("tiers")
    if tiers:
        used = {key.removeprefix("used_gib:"): gib for key, gib in tiers.items() if key.startswith("used_gib:")}
        held = ", ".join(
            f"{tier} {gib:.1f} of {_capacity(tiers.get(f'capacity_gib:{tier}'))}" for tier, gib in sorted(used.items())
        )
        moved = ", ".join(
            f"{key.removesuffix('_mb_per_s')} {value:.0f}"
            for key, value in sorted(tiers.items())
            if key.endswith("_mb_per_s")
        )
        notes.append(f"KV held at the step's end: {held}; moved between tiers, MB/s: {moved}")
    return notes


def _stack_notes(stacks: dict | None) -> list[str]:
    """Where the engine thread was (``--stack-probe``): busiest places, slow stretches and garbage collections."""
    if stacks is None:
        return []
    notes = []
    for kind, what in (("inclusive", "inside"), ("self", "at")):
        busiest = "; ".join(f"{where} {per_s:.3f}" for where, per_s in stacks[kind])
        notes.append(f"the engine thread was {what}, seconds per second: {busiest}")
    if "slow_s_per_s" in stacks:
        for kind, what in (("slow_inclusive", "inside"), ("slow_self", "at")):
            busiest = "; ".join(f"{where} {per_s:.3f}" for where, per_s in stacks[kind])
            notes.append(
                f"{stacks['slow_s_per_s']:.3f} s/s with no chance to start a question "
                f"for {stack_probe.SLOW_STRETCH_S * 1000:.0f} ms or more, the engine thread {what}: {busiest}"
            )
    collections = (stacks.get("gc") or {}).get("by_generation")
    if collections:
        notes.append(f"the worker's garbage collections: {_gc_summary(collections, stacks['gc'].get('frozen'))}")
    if stacks.get("slow_after"):
        kinds = "; ".join(f"{kind} {per_s:.3f}" for kind, per_s in stacks["slow_after"])
        at = "; ".join(f"{where} {per_s:.3f}" for where, per_s in stacks["slow_after_self"])
        notes.append(f"those stretches by the chance they began at, s/s: {kinds}")
        notes.append(f"those stretches by the chance they began at, the thread at: {at}")
    return notes


def _gc_summary(collections: dict, frozen: dict | None) -> str:
    per_gen = "; ".join(
        f"generation {gen} {g['collections']} ({g['s_per_s'] * 1000:.1f} ms/s, {g['over_long']} over "
        f"{gc_watch.LONG_S * 1000:.0f} ms)"
        for gen, g in collections.items()
    )
    if frozen:
        per_gen += (
            f"; {frozen['objects']} start-up objects frozen, a full collection "
            f"{frozen['full_collection_before_s'] * 1000:.0f} ms before, "
            f"{frozen['full_collection_after_s'] * 1000:.0f} ms after"
        )
    return per_gen


def footer(report: dict) -> list[str]:
    """The rule, the run's settings, what each column means, and the errors by N."""
    settings = report.get("settings", {})
    batch, fps = settings.get("max_batch_frames", "?"), report["args"]["fps"]
    cost = report["decode_cost"]
    errors = {s["cameras"]: (s["push_errors"], s["question_errors"], s["stats_errors"]) for s in report["steps"]}
    errors = {n: e for n, e in errors.items() if any(e)}
    window = (
        f"warm-up {settings['warmup_s']:g} s, settle up to {settings['settle_s']:g} s, measure "
        f"{settings['measure_s']:g} s, questions' wait after it {settings['question_wait_s']:g} s"
        if settings
        else "windows not recorded"
    )
    return [
        f"largest real-time N: {report['largest_real_time_cameras']} (a step is real-time when the lag p99, pooled and "
        f"of the worst camera, is under {LAG_LIMIT_S:.0f} s with every camera's lag known; nothing dropped or refused; "
        f"received >= {MIN_RECEIVED_SHARE:.0%} of fps x N x window less N x (1 + fps x telemetry interval) frames of "
        f"window edge; ingested >= {MIN_INGESTED_SHARE:.0%} of offered; the backlog grew by at most one ingest call "
        f"({batch} frames) + {MAX_BACKLOG_GROWTH_SHARE:.0%} of the window's nominal frames; >= "
        f"{MIN_QUESTIONS_SENT_SHARE:.0%} of the nominal questions sent (less one), none failed or unfinished; no push "
        "or /metrics errors)",
        f"model {report['service'].get('model', 'tiny')}, {fps:g} fps per camera, retention "
        f"{settings.get('retention_s', '?')} s, {settings.get('max_new_tokens', '?')} tokens per answer, questions "
        f"{report['args']['questions_per_s']:g}/s open-loop from up to {settings.get('question_clients', '?')} "
        f"clients, {settings.get('push_clients', '?')} push clients, up to {batch} frames per ingest call, "
        f"telemetry every {settings.get('telemetry_interval_s', '?')} s; {window}; service up after "
        f"{report['start_s']:.0f} s",
        "columns: offered = fps x N; received = frames the worker queued (mosaic_frames_received_total); backlog + = "
        "change of the frames queued for ingest over the window, all cameras (least-squares slope x span); lag = wait "
        "of a camera's oldest queued frame, once a second, pooled over cameras and seconds; worst cam p99 = each "
        "camera's own p99, the largest; to-KV = each frame's receipt to KV written, from mosaic_ingest_latency_seconds"
        "' change over the window, interpolated linearly within buckets as Prometheus's histogram_quantile does; "
        "questions = answered/sent/nominal, by send time, TTFT over the answered ones; GPU MiB = the worker's "
        "processes (nvidia-smi --query-compute-apps), else the only GPU's memory.used; KV dev GiB = device tier held "
        "at the step's end; worker cpu/s = its process tree; decode cpu/s = measured in the worker's decoding "
        "processes (pulled sources; pushed JPEGs decode in the worker's threads, inside worker cpu/s)",
        f"decode cost here: JPEG {1e3 * cost['jpeg_s']:.2f} ms, clip frame {1e3 * cost['video_s']:.2f} ms "
        f"({cost['frame_px']} px); decode cpu/s est = fps x cameras x that cost (an estimate, not measured)",
        f"client errors (push, question, /metrics) by N: {errors or 'none'}",
    ]


def write(report: dict, prefix: str | None) -> None:
    """``prefix``.json and .txt, with this machine's checkout, home and temporary folders replaced by names in
    angle brackets (results are committed)."""
    if prefix:
        Path(f"{prefix}.json").write_text(without_local_paths(json.dumps(report, indent=1)))
        Path(f"{prefix}.txt").write_text(without_local_paths(table(report)) + "\n")


def without_local_paths(text: str) -> str:
    import tempfile

    places = {str(Path.cwd()): "<checkout>", tempfile.gettempdir(): "<tmp>", str(Path.home()): "<home>"}
    for path, name in sorted(places.items(), key=lambda item: -len(item[0])):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def _capacity(gib: float | None) -> str:
    """A tier's budget in GiB; a disk tier without a budget reports an effectively unbounded one."""
    if gib is None:
        return "?"
    return "no limit" if gib >= UNBOUNDED_GIB else f"{gib:.1f} GiB"
