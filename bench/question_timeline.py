"""Where a question's first token waits at a long history: one timeline per question, host and device together.

    python -m bench.question_timeline [--minutes 60] [--questions 6] [--gap 8] --out FILE.json
    python -m bench.question_timeline --quick --out FILE.json      # CPU, tiny preset: host ranges only
    python -m bench.question_timeline --read-trace FILE.json.gz    # a trace written by --trace, summarised

One cluster-mode engine with scenario A's settings (``mosaic bench engine``, host memory pinned up front as there)
over the looped sample clip; warm-up questions capture the graphs (``bench.long_history``). Then ``--questions``
questions, each right after an ingest call of ``--gap`` frames (scenario A's order), run one at a time under torch's
profiler, which records the host's calls and every kernel and copy on the device; with ``--also-no-gap`` as many again
with no ingest call before each. The retriever's and the plan's steps are wrapped in profiler ranges here (the
engine's code is not changed). Each question's trace is read back into one timeline, in ms from the moment it was
asked:

- the host's ranges: the set-up, each layer's choice, the staging queued, the anchor layers, the chain of graphs,
  the first token, and the host's waits for the device (synchronize calls over 0.1 ms);
- the device: when the work queued before the question (the ingest call's, traced with it) ended; the question's
  own kernels on the compute stream, first and last; the host-to-device copies (count, bytes, first start, last
  end, the rate over that span and over their own busy time); and the compute stream's idle gaps over 0.2 ms after
  the question's first kernel, which is where it waited for copies or for the host.

Written: the JSON (one entry per question, and medians), a text table of the same on stdout, and with
``--trace`` the last question's whole trace (after an ingest call), for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench import long_history
from mosaic_core.bench.workload import QUESTIONS
from mosaic_core.config import EngineConfig
from mosaic_core.engine import plans, questions, retrieval
from mosaic_core.engine.engine import Engine

QUESTION_RANGE = "timeline.question"
HOST_RANGES = (
    "question.setup",
    "retriever.select",
    "retriever.stage",
    "retriever.stage_shared",
    "plan.choose",
    "prefill.anchor_layers",
    "prefill.load_buffers",
    "prefill.chain",
    "question.first_token",
)
WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")
COPY_CALLS = ("cudaMemcpyAsync",)


def _ranged(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def ranges_around_steps():
    """Profiler ranges around the retriever's and the plan's steps, for this script's traces only."""
    wrapped = [
        (retrieval.Retriever, "select", "retriever.select"),
        (retrieval.Retriever, "stage", "retriever.stage"),
        (retrieval.Retriever, "stage_shared", "retriever.stage_shared"),
        (plans.QuestionPlan, "_choose", "plan.choose"),
    ]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in wrapped]
    try:
        for owner, attr, name in wrapped:
            setattr(owner, attr, _ranged(name, getattr(owner, attr)))
        yield
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def _setup_ranged():
    """Hooks that make the set-up (everything from the ask to the forward pass, which starts in ``_decode``) a
    profiler range: ``enter_setup`` opens it, the patched ``_decode`` closes it."""
    decode = questions._decode
    state = {"range": None}

    def decode_after_setup(*args):
        if state["range"] is not None:
            state["range"].__exit__(None, None, None)
            state["range"] = None
        return (yield from decode(*args))

    def enter_setup():
        state["range"] = record_function("question.setup")
        state["range"].__enter__()

    return decode, decode_after_setup, enter_setup


def timeline(trace: dict) -> dict:
    """One question's timeline from a chrome trace of it (``profile.export_chrome_trace``), in ms from the start
    of ``QUESTION_RANGE`` (module doc)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    question = next(e for e in events if e.get("name") == QUESTION_RANGE and e.get("cat") != "gpu_user_annotation")
    t0 = question["ts"]
    end = question["ts"] + question["dur"]

    def rel(ts: float) -> float:
        return round((ts - t0) / 1e3, 3)

    host = [
        {"name": e["name"], "start_ms": rel(e["ts"]), "ms": round(e["dur"] / 1e3, 3)}
        for e in events
        if e.get("cat") in ("user_annotation", "cpu_op") and e["name"] in HOST_RANGES and t0 <= e["ts"] <= end
    ]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launched_at = {e["args"]["correlation"]: e["ts"] for e in runtime if "correlation" in e.get("args", {})}
    waits = [
        {"name": e["name"], "start_ms": rel(e["ts"]), "ms": round(e["dur"] / 1e3, 3)}
        for e in runtime
        if e["name"] in WAITS and t0 <= e["ts"] <= end and e["dur"] >= 100
    ]
    copy_calls = [e for e in runtime if e["name"] in COPY_CALLS and t0 <= e["ts"] <= end]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    before = [e for e in device if launched_at.get(e.get("args", {}).get("correlation"), end + 1) < t0]
    own = [e for e in device if t0 <= launched_at.get(e.get("args", {}).get("correlation"), -1) <= end]
    kernels = [e for e in own if e["cat"] == "kernel"]
    to_device = [e for e in own if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]]
    row = {
        "host_ranges": host,
        "host_waits": waits,
        "copy_calls": len(copy_calls),
        "copy_calls_host_ms": round(sum(e["dur"] for e in copy_calls) / 1e3, 3),
        "queued_before_ends_ms": rel(max((e["ts"] + e["dur"] for e in before), default=t0)),
    }
    if kernels:
        compute_stream = kernels[-1].get("tid")
        on_compute = sorted((e for e in kernels if e.get("tid") == compute_stream), key=lambda e: e["ts"])
        gaps, last_end = [], on_compute[0]["ts"] + on_compute[0]["dur"]
        for e in on_compute[1:]:
            if e["ts"] - last_end >= 200:
                gaps.append({"from_ms": rel(last_end), "ms": round((e["ts"] - last_end) / 1e3, 3)})
            last_end = max(last_end, e["ts"] + e["dur"])
        row |= {
            "first_kernel_ms": rel(on_compute[0]["ts"]),
            "last_kernel_end_ms": rel(last_end),
            "compute_busy_ms": round(sum(e["dur"] for e in on_compute) / 1e3, 3),
            "compute_gaps": gaps,
            "compute_gaps_ms": round(sum(g["ms"] for g in gaps), 3),
        }
    if to_device:
        first = min(e["ts"] for e in to_device)
        last = max(e["ts"] + e["dur"] for e in to_device)
        num_bytes = sum(int(e.get("args", {}).get("bytes", 0)) for e in to_device)
        busy = sum(e["dur"] for e in to_device)
        row |= {
            "copies": len(to_device),
            "copy_bytes": num_bytes,
            "copies_first_ms": rel(first),
            "copies_last_end_ms": rel(last),
            "copy_span_gbs": round(num_bytes / ((last - first) * 1e3), 2) if last > first else None,
            "copy_busy_gbs": round(num_bytes / (busy * 1e3), 2) if busy else None,
            "copy_streams": sorted({str(e.get("tid")) for e in to_device}),
        }
    return row


def trace_summary(trace: dict) -> str:
    """A written summary of one question's trace (``--trace``): the host's ranges and its runtime calls over 0.5
    ms, then the device's copies and kernels merged into runs per stream (consecutive events of one kind less than
    0.3 ms apart), in ms from the moment it was asked; last, the copies of 256 KiB or more by direction and size, with
    the median time of one."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    question = next(e for e in events if e.get("name") == QUESTION_RANGE and e.get("cat") != "gpu_user_annotation")
    t0 = question["ts"]
    lines = [f"question: {question['dur'] / 1e3:.2f} ms on the host"]
    for e in sorted(events, key=lambda e: e["ts"]):
        slow_call = e.get("cat") in ("cuda_runtime", "cuda_driver") and e["dur"] > 500
        if e.get("cat") == "user_annotation" or slow_call:
            lines.append(f"host {e['name']:<32} at {(e['ts'] - t0) / 1e3:9.2f}  for {e['dur'] / 1e3:8.2f} ms")
    on_device = (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    device = sorted(on_device, key=lambda e: e["ts"])
    runs: list[list] = []  # [stream, kind, start, end, count, bytes]
    for e in device:
        kind = e["name"].split(" (")[0] if e["cat"] != "kernel" else "kernels"
        stream, end, size = e.get("tid"), e["ts"] + e["dur"], int(e.get("args", {}).get("bytes", 0) or 0)
        last = next((r for r in reversed(runs) if r[0] == stream), None)
        if last is not None and last[1] == kind and e["ts"] - last[3] < 300:
            last[3], last[4], last[5] = max(last[3], end), last[4] + 1, last[5] + size
        else:
            runs.append([stream, kind, e["ts"], end, 1, size])
    for stream, kind, start, end, count, size in runs:
        lines.append(
            f"device stream {stream!s:>3} {kind:<12} {(start - t0) / 1e3:9.2f} to {(end - t0) / 1e3:9.2f} ms"
            f"  {count:5d} events  {size / 1e6:8.1f} MB"
        )
    by_size: dict[tuple[str, int], list[float]] = {}
    for e in device:
        if e.get("cat") == "gpu_memcpy" and int(e.get("args", {}).get("bytes", 0) or 0) >= 1 << 18:
            by_size.setdefault((e["name"].split(" (")[0], int(e["args"]["bytes"])), []).append(e["dur"])
    for (kind, size), durations in sorted(by_size.items()):
        median = statistics.median(durations)
        lines.append(
            f"copies of {size / 1e6:.2f} MB, {kind}: {len(durations)}, median {median:.1f} us, "
            f"{size / median / 1e3:.1f} GB/s each"
        )
    return "\n".join(lines)


def _profiled(engine: Engine, question: str, frames: list, decode, decode_after, enter_setup):
    """One question after an ingest call of ``frames``, under the profiler; returns its timeline."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    to_host = engine.tiering.tiers.stats.bytes_by_direction
    with profile(activities=activities) as prof:
        if frames:  # traced too, so that the device work it leaves queued is seen ending inside the question
            with record_function("timeline.ingest"):
                engine.ingest(frames)
        to_host_before = to_host["device_to_host"]
        questions._decode = decode_after
        try:
            with record_function(QUESTION_RANGE):
                enter_setup()
                answer = engine.answer("cam", question, max_new_tokens=1)
        finally:
            questions._decode = decode
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    row = timeline(trace)
    row["trace"] = trace
    row["ttft_ms"] = round(answer.timings.time_to_first_token_s * 1e3, 3)
    row["setup_ms"] = round(answer.timings.setup_s * 1e3, 3)
    row["bytes_fetched"] = answer.retrieval.bytes_fetched
    row["spilled_to_host_bytes"] = to_host["device_to_host"] - to_host_before  # copies the question's room made
    return row


def _summary(rows: list[dict]) -> dict:
    keys = [
        "ttft_ms", "setup_ms", "queued_before_ends_ms", "first_kernel_ms", "copies_first_ms", "copies_last_end_ms",
        "last_kernel_end_ms", "compute_busy_ms", "compute_gaps_ms", "copy_span_gbs", "copy_busy_gbs",
        "copy_calls", "copy_calls_host_ms", "copies", "copy_bytes", "spilled_to_host_bytes", "bytes_fetched",
    ]  # fmt: skip
    medians = {k: statistics.median(r[k] for r in rows) for k in keys if all(r.get(k) is not None for r in rows)}
    ranges: dict[str, list[float]] = {}
    for r in rows:
        for name in HOST_RANGES:
            spans = [h for h in r["host_ranges"] if h["name"] == name]
            if spans:
                ranges.setdefault(name, []).append(
                    (spans[0]["start_ms"], spans[-1]["start_ms"] + spans[-1]["ms"], len(spans))
                )
    medians["host_ranges"] = {
        name: {
            "first_start_ms": statistics.median(s[0] for s in spans),
            "last_end_ms": statistics.median(s[1] for s in spans),
            "calls": spans[0][2],
        }
        for name, spans in ranges.items()
    }
    return medians


def _print(rows: list[dict], medians: dict) -> None:
    print(
        "question   TTFT  set-up  ingest-ends  1st-kernel  copies-from  copies-to  last-kernel  gaps  span-GB/s"
        "  spilled-MB  fetched-MB"
    )
    for i, r in enumerate(rows):
        print(
            f"{i:>8} {r['ttft_ms']:>6.2f} {r['setup_ms']:>7.2f} {r['queued_before_ends_ms']:>12.2f}"
            f" {r.get('first_kernel_ms', float('nan')):>11.2f} {r.get('copies_first_ms', float('nan')):>12.2f}"
            f" {r.get('copies_last_end_ms', float('nan')):>10.2f} {r.get('last_kernel_end_ms', float('nan')):>12.2f}"
            f" {r.get('compute_gaps_ms', float('nan')):>5.2f} {r.get('copy_span_gbs') or float('nan'):>10.2f}"
            f" {r['spilled_to_host_bytes'] / 1e6:>11.2f} {r['bytes_fetched'] / 1e6:>11.2f}"
        )
    print("host ranges, medians (ms from asked): first start, last end, calls")
    for name, span in medians["host_ranges"].items():
        print(f"  {name:<24} {span['first_start_ms']:>8.2f} {span['last_end_ms']:>8.2f} {span['calls']:>4}")
    print(json.dumps({k: v for k, v in medians.items() if k != "host_ranges"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.question_timeline", description=__doc__.split("\n\n")[0])
    long_history.add_arguments(parser, questions=6, questions_help="profiled questions")
    parser.add_argument(
        "--device-budget-gib", type=float, default=8.0,
        help="the device tier (scenario A's: 8; --quick has its own unless this is given)",
    )  # fmt: skip
    parser.add_argument(
        "--host-copy-below-device-free", type=float, default=EngineConfig.host_copy_below_device_free,
        help="EngineConfig.host_copy_below_device_free (0: clusters get no host copy ahead of a spill)",
    )  # fmt: skip
    parser.add_argument(
        "--also-no-gap", action="store_true", help="then as many questions again with no ingest call before each"
    )
    parser.add_argument(
        "--trace", type=Path, default=None, help="write the last question's chrome trace here (gzipped JSON)"
    )
    parser.add_argument(
        "--read-trace", type=Path, default=None, help="only print the summary of a trace written by --trace"
    )
    parser.add_argument("--out", type=Path, required=False)
    args = parser.parse_args(argv)
    if args.read_trace is not None:
        with gzip.open(args.read_trace, "rt") as f:
            print(trace_summary(json.load(f)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    history = long_history.warmed_up(
        args,
        frames_after=args.questions * args.gap,
        device_budget_gib=args.device_budget_gib,
        pin_history=True,
        host_copy_below_device_free=args.host_copy_below_device_free,
    )
    engine, frames, bulk, clusters = history.engine, history.frames, history.bulk, history.clusters
    log = long_history.log
    hooks = _setup_ranged()
    report = {"minutes": history.minutes, "gap": args.gap, "clusters": clusters, "runs": {}}
    with ranges_around_steps():
        for asked in ("after ingest", "no ingest") if args.also_no_gap else ("after ingest",):
            rows = []
            for i in range(args.questions):
                first = bulk + i * args.gap
                gap = frames[first : first + args.gap] if asked == "after ingest" else []
                row = _profiled(engine, QUESTIONS[i % len(QUESTIONS)], gap, *hooks)
                trace = row.pop("trace")
                if args.trace is not None and asked == "after ingest" and i == args.questions - 1:
                    with gzip.open(args.trace, "wt") as f:
                        json.dump(trace, f)
                rows.append(row)
                log(f"{asked}, question {i}: TTFT {row['ttft_ms']:.2f} ms")
            medians = _summary(rows)
            print(f"{bulk} frames of history, {clusters} clusters; asked {asked} (ingest calls of {args.gap} frames)")
            _print(rows, medians)
            report["runs"][asked] = {"medians": medians, "questions": rows}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
