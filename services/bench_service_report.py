"""The results of ``mosaic bench service``: one step's figures, the real-time rule, the table and the files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from services import gc_watch, stack_probe

LAG_LIMIT_S = 2.0
# A source that stopped, or a pusher that fell behind, queues nothing and shows no lag: the frames must arrive too.
MIN_INGESTED_SHARE = 0.9
UNBOUNDED_GIB = 2.0**20  # a tier budget this large (a PiB) is the service's "no budget"


@dataclass(slots=True)
class StepResult:
    """One N: what was offered and what the service sustained."""

    cameras: int
    pulled: int
    pushed: int
    measure_s: float
    offered_fps: float
    ingested_fps: float
    lag_p50_s: float | None
    lag_p99_s: float | None
    lag_max_s: float | None
    dropped: int
    refused: int
    push_errors: dict[str, int]
    stats_errors: dict[str, int]  # samples of /metrics the service did not answer
    questions: int
    question_errors: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    decode_ms_per_token: float | None
    server_ttft_p50_ms: float | None
    server_ttft_p99_ms: float | None
    server_decode_ms_per_token: float | None
    gpu_memory_used_mib: float | None
    router_cpu_per_s: float | None
    worker_cpu_per_s: float | None
    decode_cpu_per_s: float | None
    engine_thread_share: dict[str, float]  # seconds per second of the worker's engine thread, by part
    frames_per_ingest_call: float | None
    forward_passes_per_ingest_call: float | None
    worker_gil: dict | None = None  # how late the worker's GIL probe woke (services.gil_probe.wait_share)
    settled_after_s: float | None = None  # after the warm-up, until every lag was under LAG_LIMIT_S; None: never
    engine_stacks: dict | None = None  # where the engine thread was (services.stack_probe.busiest)
    durable: dict[str, float] | None = None  # the workers' record writing, per second (bench_service.durable_rates)
    tiers: dict[str, float] | None = None  # KV held and budgeted per tier, and moved (bench_service.tier_summary)
    # The workers' GPU allocator events in the step, by event (bench_service.engine_thread; empty off CUDA)
    allocator_events: dict[str, int] = field(default_factory=dict)
    kernel_compiles: int = 0  # variants of Mosaic's Triton kernels the workers compiled in the step (CUDA only)
    ingest_calls_encoded_ahead: float | None = None  # share of the ingest calls whose tower was queued the call before
    # Parts of the server's TTFT: waiting on the worker until the engine began the question, and the engine's
    # prefill to first token (QueryTimings.start_wait_s and engine_first_token_s)
    start_wait_p50_ms: float | None = None
    start_wait_p99_ms: float | None = None
    engine_ttft_p50_ms: float | None = None
    engine_ttft_p99_ms: float | None = None
    # Outside the engine thread: the first token's way from the engine thread to the thread that sends it
    # (QueryTimings.token_handoff_s), and between router and worker both ways (QueryTimings.transport_s)
    handoff_p50_ms: float | None = None
    handoff_p99_ms: float | None = None
    transport_p50_ms: float | None = None
    transport_p99_ms: float | None = None
    # Every answered question's TTFT and its parts in ms: client, server, start_wait, engine, worker, handoff and
    # transport (question_sample_ms)
    ttft_samples_ms: list[dict[str, float | None]] = field(default_factory=list)
    # Gaps between the engine thread's chances to start a question, by kind (bench_service.start_gaps)
    question_start_gaps: dict[str, dict] = field(default_factory=dict)

    @property
    def real_time(self) -> bool:
        arrived = self.ingested_fps >= MIN_INGESTED_SHARE * self.offered_fps
        kept_up = self.lag_p99_s is not None and self.lag_p99_s < LAG_LIMIT_S and not self.stats_errors
        answered = not self.question_errors and not self.push_errors  # the load must be served, not only the frames
        return arrived and kept_up and answered and self.dropped == 0 and self.refused == 0


def describe(step: StepResult) -> str:
    f = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}"  # noqa: E731
    return (
        f"{step.ingested_fps:.1f}/{step.offered_fps:.0f} frames/s, lag p99 {f(step.lag_p99_s, ' s')}, "
        f"{step.dropped} dropped, TTFT p99 {f(step.ttft_p99_ms, ' ms')}, "
        f"{'real-time' if step.real_time else 'NOT real-time'}"
    )


COLUMNS = (
    # (header, key, format)
    ("N", "cameras", "{:d}"),
    ("pull/push", None, None),
    ("frames/s", "ingested_fps", "{:.1f}"),
    ("lag p50 s", "lag_p50_s", "{:.2f}"),
    ("lag p99 s", "lag_p99_s", "{:.2f}"),
    ("drops", "dropped", "{:d}"),
    ("questions", "questions", "{:d}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
    ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}"),
    ("decode ms/tok", "decode_ms_per_token", "{:.1f}"),
    ("GPU MiB", "gpu_memory_used_mib", "{:.0f}"),
    ("router cpu/s", "router_cpu_per_s", "{:.2f}"),
    ("worker cpu/s", "worker_cpu_per_s", "{:.2f}"),
    ("decode cpu/s", "decode_cpu_per_s", "{:.3f}"),
    ("real-time", "real_time", None),
)


def table(report: dict) -> str:
    rows = [[header for header, _, _ in COLUMNS]]
    for step in report["steps"]:
        row = []
        for _, key, fmt in COLUMNS:
            if key is None:
                row.append(f"{step['pulled']}/{step['pushed']}")
            elif key == "real_time":
                row.append("yes" if step[key] else "no")
            else:
                row.append("-" if step[key] is None else fmt.format(step[key]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    cost = report["decode_cost"]
    errors = {s["cameras"]: (s["push_errors"], s["question_errors"], s["stats_errors"]) for s in report["steps"]}
    errors = {n: e for n, e in errors.items() if any(e)}
    lines += [
        f"largest real-time N (lag p99 < {LAG_LIMIT_S:.0f} s, no drops, no client errors, >= "
        f"{MIN_INGESTED_SHARE:.0%} of frames ingested): {report['largest_real_time_cameras']}",
        f"model {report['service'].get('model', 'tiny')}, {report['args']['fps']:g} fps per camera, questions "
        f"{report['args']['questions_per_s']:g}/s, service up after {report['start_s']:.0f} s",
        f"decode cost here: JPEG {1e3 * cost['jpeg_s']:.2f} ms, clip frame {1e3 * cost['video_s']:.2f} ms "
        f"({cost['frame_px']} px); decode cpu/s = fps x cameras x that cost",
        f"client errors (push, question, /metrics) by N: {errors or 'none'}",
    ]
    for step in report["steps"]:
        if "settled_after_s" in step:
            settled = step["settled_after_s"]
            limit = report["args"].get("settle_s")
            lines.append(
                f"N={step['cameras']}: every lag under {LAG_LIMIT_S:.0f} s "
                + (f"{settled:.0f} s after the warm-up" if settled is not None else f"never within {limit:g} s")
                + "; measured after that"
            )
        share = ", ".join(f"{part} {s:.2f}" for part, s in step["engine_thread_share"].items())
        per_call, passes = step["frames_per_ingest_call"], step.get("forward_passes_per_ingest_call")
        ahead = step.get("ingest_calls_encoded_ahead")
        lines.append(
            f"N={step['cameras']}: the worker's engine thread, seconds per second: {share or '-'}; frames per "
            f"ingest call: {'-' if per_call is None else f'{per_call:.1f}'}, forward passes per call: "
            f"{'-' if passes is None else f'{passes:.2f}'}"
            + ("" if ahead is None else f", share of calls with their tower queued ahead: {ahead:.2f}")
        )
        if step.get("allocator_events"):
            events = ", ".join(f"{event} {n}" for event, n in step["allocator_events"].items())
            lines.append(
                f"N={step['cameras']}: the GPU allocator during the step: {events} (a retry gave back the cache and "
                "waited for the GPU)"
            )
        if step.get("kernel_compiles"):
            lines.append(
                f"N={step['cameras']}: Triton kernel variants compiled during the step: {step['kernel_compiles']} "
                "(each held the engine thread; the warm-up missed them)"
            )
        gil = step.get("worker_gil")
        if gil is not None:
            lines.append(
                f"N={step['cameras']}: the worker's GIL: a 2-ms sleep woke {gil['mean_late_ms']:.2f} ms late on "
                f"average, {gil['share_over_1ms']:.0%} of them over 1 ms late"
            )
        if step.get("start_wait_p50_ms") is not None:
            lines.append(
                f"N={step['cameras']}: the server's TTFT p50 / p99 {step['server_ttft_p50_ms']:.0f} / "
                f"{step['server_ttft_p99_ms']:.0f} ms; of a question's, waiting on the worker for the engine "
                f"{step['start_wait_p50_ms']:.0f} / {step['start_wait_p99_ms']:.0f} ms, the engine's prefill to first "
                f"token {step['engine_ttft_p50_ms']:.0f} / {step['engine_ttft_p99_ms']:.0f} ms (each its own "
                "percentiles)"
            )
        if step.get("transport_p50_ms") is not None:
            lines.append(
                f"N={step['cameras']}: outside the engine thread, the first token from the engine thread to the "
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
            lines.append(f"N={step['cameras']}: gaps between chances to start a question: " + "; ".join(parts))
        durable = step.get("durable")
        if durable is not None:
            lines.append(
                f"N={step['cameras']}: durable history: {durable['written_mb_per_s']:.1f} MB/s of records written, "
                f"the writer threads busy {durable['writers_busy_s_per_s']:.2f} s/s (summed), the engine thread "
                f"waiting for them {durable['ingest_wait_s_per_s']:.2f} s/s"
            )
        tiers = step.get("tiers")
        if tiers:
            used = {key.removeprefix("used_gib:"): gib for key, gib in tiers.items() if key.startswith("used_gib:")}
            held = ", ".join(
                f"{tier} {gib:.1f} of {_capacity(tiers.get(f'capacity_gib:{tier}'))}"
                for tier, gib in sorted(used.items())
            )
            moved = ", ".join(
                f"{key.removesuffix('_mb_per_s')} {value:.0f}"
                for key, value in sorted(tiers.items())
                if key.endswith("_mb_per_s")
            )
            lines.append(f"N={step['cameras']}: KV held at the step's end: {held}; moved between tiers, MB/s: {moved}")
        stacks = step.get("engine_stacks")
        if stacks is not None:
            for kind, what in (("inclusive", "inside"), ("self", "at")):
                busiest = "; ".join(f"{where} {per_s:.3f}" for where, per_s in stacks[kind])
                lines.append(f"N={step['cameras']}: the engine thread was {what}, seconds per second: {busiest}")
            if "slow_s_per_s" in stacks:
                for kind, what in (("slow_inclusive", "inside"), ("slow_self", "at")):
                    busiest = "; ".join(f"{where} {per_s:.3f}" for where, per_s in stacks[kind])
                    lines.append(
                        f"N={step['cameras']}: {stacks['slow_s_per_s']:.3f} s/s with no chance to start a question "
                        f"for {stack_probe.SLOW_STRETCH_S * 1000:.0f} ms or more, the engine thread {what}: {busiest}"
                    )
            collections = (stacks.get("gc") or {}).get("by_generation")
            if collections:
                per_gen = "; ".join(
                    f"generation {gen} {g['collections']} ({g['s_per_s'] * 1000:.1f} ms/s, {g['over_long']} over "
                    f"{gc_watch.LONG_S * 1000:.0f} ms)"
                    for gen, g in collections.items()
                )
                frozen = stacks["gc"].get("frozen") or {}
                if frozen:
                    per_gen += (
                        f"; {frozen['objects']} start-up objects frozen, a full collection "
                        f"{frozen['full_collection_before_s'] * 1000:.0f} ms before, "
                        f"{frozen['full_collection_after_s'] * 1000:.0f} ms after"
                    )
                lines.append(f"N={step['cameras']}: the worker's garbage collections: {per_gen}")
            if stacks.get("slow_after"):
                kinds = "; ".join(f"{kind} {per_s:.3f}" for kind, per_s in stacks["slow_after"])
                at = "; ".join(f"{where} {per_s:.3f}" for where, per_s in stacks["slow_after_self"])
                lines.append(f"N={step['cameras']}: those stretches by the chance they began at, s/s: {kinds}")
                lines.append(f"N={step['cameras']}: those stretches by the chance they began at, the thread at: {at}")
    return "\n".join(lines)


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
