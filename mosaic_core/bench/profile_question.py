"""Where a question's time goes: torch.profiler over one question and one ingest pass, per retrieval mode.

    mosaic bench profile --minutes 20 --modes frame,cluster --out DIR   # GPU, qwen2.5-vl-7b shape
    mosaic bench profile --quick --out DIR                             # CPU, tiny preset (a smoke run)
    mosaic bench profile --bare --modes "" --out DIR                   # only a question with no history

For each mode: one engine over a looped sample clip (scenario A's settings), two warm-up questions, then each of
five questions three times: eagerly, eagerly again, and from CUDA graphs (``mosaic_core.engine.prefill_graphs``
and ``decode_graphs``; time to first token, decode ms/token, how many answers are the same tokens, and how far
apart the prefill's last hidden states are: eager against eager is the control, since the first answer moves
what it retrieved to the device), then one question (graphed where graphs are on) and one ingest pass under the
profiler. It writes
``DIR/profile-<mode>.txt`` (the ops by self device time and by self host time) and ``DIR/profile.json``, where
``device_busy`` is the device time of all kernels over the wall time of the profiled question: well under one
means the host (launches, Python, syncs) sets the pace, not the GPU.

``--bare`` profiles questions on a stream with no history (cluster mode, graphs on): the forward pass the time to
first token cannot go below. Its ``DIR/profile-bare.txt`` and the ``bare`` entry of ``profile.json`` split the
wall time by the engine's profiler ranges: the anchor layers, loading the graphs' buffers, the chain of
graphs, and the first token (logits, argmax, the copy to the host). It runs twice, with the anchor layers
replayed from graphs (``bare``) and run eagerly (``bare_eager_anchor``, ``DIR/profile-bare-eager-anchor.txt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mosaic_core.bench.settings import BenchSettings, engine_config, settings_for, sized_to_machine
from mosaic_core.bench.workload import CLIPS, QUESTIONS, looped_frames
from mosaic_core.engine.engine import Engine
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter


def _device_seconds(prof) -> float:
    """Device time of the kernels and copies themselves (the ops that launched them count it too: left out)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e6


def _same(answers, others, tokens: int | None = None) -> int:
    return sum(a.token_ids[:tokens] == b.token_ids[:tokens] for a, b in zip(answers, others, strict=False))


def _hidden_diff(answers, others) -> float | None:
    """The largest absolute difference between the prefills' last hidden states (the first token's input)."""
    diffs = [float((a.last_hidden - b.last_hidden).abs().max()) for a, b in zip(answers, others, strict=False)]
    return max(diffs, default=None)


def _tables(prof) -> str:
    averages = prof.key_averages()
    by_device = averages.table(sort_by="self_device_time_total", row_limit=25) if torch.cuda.is_available() else ""
    return by_device + "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=25)


def profile_mode(model, s: BenchSettings, mode: str, frames, decode_tokens: int, out: Path, log) -> dict:
    """One engine of ``mode``: eager and graphed decode of the same questions side by side, then the profiles.

    No merges: a merge after one answer would change what the same question retrieves the second time."""
    from torch.profiler import ProfilerActivity, profile

    engine = _ingested_engine(model, s, mode, frames, log)
    graphs, prefill_graphs = engine.parts.decode_graphs, engine.parts.prefill_graphs
    graphed_too = graphs.enabled  # before the warm-up, which turns graphs off where a capture fails
    for q in QUESTIONS:  # warm-up: compiles kernels and captures the graphs of every question length
        engine.answer("cam", q, max_new_tokens=decode_tokens)
    eager, eager_again, graphed = _asked_three_ways(engine, decode_tokens, graphed_too)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as question_prof:
        t0 = time.perf_counter()
        answer = engine.answer("cam", "Profiled: when did the cyclist pass?", max_new_tokens=decode_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        question_wall = time.perf_counter() - t0
    with profile(activities=activities) as ingest_prof:
        t0 = time.perf_counter()
        engine.ingest(frames[-16:])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ingest_wall = time.perf_counter() - t0
    (out / f"profile-{mode}.txt").write_text(
        f"# one question ({decode_tokens} tokens), {mode} mode, {len(frames)} frames of history\n"
        + _tables(question_prof)
        + f"\n\n# one ingest pass of 16 frames, {mode} mode\n"
        + _tables(ingest_prof)
    )
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    question_device = _device_seconds(question_prof)
    return {
        "mode": mode,
        **_answer_figures(eager, eager_again, graphed),
        "graphs_captured": graphs.graph_pool.num_captured,
        "graph_failure": graphs.graph_pool.failure,
        "prefill_graphs_captured": prefill_graphs.graph_pool.num_captured,
        "prefill_graph_failure": prefill_graphs.graph_pool.failure,
        "profiled_question_graphed": graphs.enabled,
        "profiled_question_wall_ms": question_wall * 1e3,
        "profiled_question_ttft_ms": answer.timings.time_to_first_token_s * 1e3,
        "profiled_question_device_ms": question_device * 1e3,
        "device_busy": question_device / question_wall if question_wall else 0.0,
        "profiled_ingest_wall_ms": ingest_wall * 1e3,
        "profiled_ingest_device_ms": _device_seconds(ingest_prof) * 1e3,
    }


def _ingested_engine(model, s: BenchSettings, mode: str, frames, log) -> Engine:
    """An engine of ``mode`` without merges, with all but the last 16 ``frames`` ingested on a stream "cam"."""
    engine = Engine(model, dataclasses.replace(engine_config(s, mode), merge_min_questions=1 << 30))
    engine.open_stream("cam")
    started = time.perf_counter()
    for i in range(0, len(frames) - 16, 64):
        engine.ingest(frames[i : min(i + 64, len(frames) - 16)])
    log(f"{mode}: ingested {len(frames) - 16} frames in {time.perf_counter() - started:.1f} s")
    return engine


def _asked_three_ways(engine: Engine, decode_tokens: int, graphed_too: bool) -> tuple[list, list, list]:
    """Each question eagerly twice, then graphed unless not ``graphed_too``: the first answer promotes what it
    retrieved to the device, so the second reads the same KV in another order; eager against eager is the control
    for graphed against eager. Each ends with the graphs turned on as far as they were."""
    graphs, prefill_graphs = engine.parts.decode_graphs, engine.parts.prefill_graphs
    prefill_too = prefill_graphs.enabled
    eager, eager_again, graphed = [], [], []
    for q in QUESTIONS:
        graphs.enabled = prefill_graphs.enabled = False
        eager.append(engine.answer("cam", q, max_new_tokens=decode_tokens))
        eager_again.append(engine.answer("cam", q, max_new_tokens=decode_tokens))
        graphs.enabled, prefill_graphs.enabled = graphed_too, prefill_too
        if graphed_too:
            graphed.append(engine.answer("cam", q, max_new_tokens=decode_tokens))
    return eager, eager_again, graphed


def _answer_figures(eager: list, eager_again: list, graphed: list) -> dict:
    timed = [a.timings for a in eager]
    return {
        "ttft_p50_ms": statistics.median(t.time_to_first_token_s for t in timed) * 1e3,
        # asked after the first answer promoted what it retrieved, as the graphed one is: the like-for-like TTFT
        "eager_again_ttft_p50_ms": statistics.median(a.timings.time_to_first_token_s for a in eager_again) * 1e3,
        "decode_ms_per_token": statistics.median(t.decode_s_per_token for t in timed) * 1e3,
        "graphed_decode_ms_per_token": (
            statistics.median(a.timings.decode_s_per_token for a in graphed) * 1e3 if graphed else None
        ),
        "graphed_ttft_p50_ms": (
            statistics.median(a.timings.time_to_first_token_s for a in graphed) * 1e3 if graphed else None
        ),
        "eager_answers_equal_when_asked_again": _same(eager_again, eager),
        "graphed_answers_equal_eager_asked_again": _same(graphed, eager_again),
        "first_tokens_equal": _same(graphed, eager_again, tokens=1),
        "answers_compared": len(graphed),
        "prefill_hidden_max_diff_eager_again": _hidden_diff(eager_again, eager),
        "prefill_hidden_max_diff_graphed": _hidden_diff(graphed, eager_again),
    }


BARE_RANGES = ("prefill.anchor_layers", "prefill.load_buffers", "prefill.chain", "question.first_token")


def profile_bare(
    model, s: BenchSettings, out: Path, log, repeats: int = 3, *, anchor_graphs: bool = True
) -> tuple[dict, list]:
    """Questions on a stream with no history: their time to first token, and where its wall time goes; with
    ``anchor_graphs`` False the layers up to the anchor run eagerly (``EngineConfig.anchor_graphs``). Returns the
    row and each question's first answer (its first token and last hidden state, for ``compare_answers``)."""
    from torch.profiler import ProfilerActivity, profile

    config = dataclasses.replace(engine_config(s, "cluster"), anchor_graphs=anchor_graphs)
    engine = Engine(model, config)
    engine.open_stream("bare")
    first = [engine.answer("bare", q, max_new_tokens=1) for q in QUESTIONS]  # captures every length's graphs
    ttfts = [engine.answer("bare", q, max_new_tokens=1).timings.time_to_first_token_s for q in QUESTIONS * repeats]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for q in QUESTIONS:
            engine.answer("bare", q, max_new_tokens=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / len(QUESTIONS)
    averages = {}
    for entry in prof.key_averages():  # a range has a host entry and a device entry under one name: keep the host's
        if entry.cpu_time_total >= getattr(averages.get(entry.key), "cpu_time_total", -1):
            averages[entry.key] = entry
    ranges_ms = {name: averages[name].cpu_time_total / 1e3 / len(QUESTIONS) for name in BARE_RANGES if name in averages}
    launches = sum(a.count for key, a in averages.items() if key in ("cudaLaunchKernel", "cuLaunchKernel"))
    graph_launches = sum(a.count for key, a in averages.items() if key == "cudaGraphLaunch")
    (out / ("profile-bare.txt" if anchor_graphs else "profile-bare-eager-anchor.txt")).write_text(
        f"# {len(QUESTIONS)} questions with no history, cluster mode, one token each\n" + _tables(prof)
    )
    row = {
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_min_ms": min(ttfts) * 1e3,
        "profiled_wall_ms_per_question": wall * 1e3,
        "profiled_device_ms_per_question": _device_seconds(prof) / len(QUESTIONS) * 1e3,
        "ranges_ms_per_question": ranges_ms,
        "kernel_launches_per_question": launches / len(QUESTIONS),
        "graph_launches_per_question": graph_launches / len(QUESTIONS),
        "prefill_graphs_captured": engine.parts.prefill_graphs.graph_pool.num_captured,
    }
    log(f"bare{'' if anchor_graphs else ' (eager anchor)'}: {json.dumps(row)}")
    del engine
    return row, first


def compare_answers(answers: list, reference: list) -> dict:
    """How far two runs of the same questions' prefills are apart: first tokens equal, and the largest absolute
    difference of the last hidden state."""
    equal = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in zip(answers, reference, strict=True))
    diff = max(float((a.last_hidden - b.last_hidden).abs().max()) for a, b in zip(answers, reference, strict=True))
    return {"first_tokens_equal": equal, "questions": len(answers), "last_hidden_max_abs_diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, one minute; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--modes", default="frame,cluster", help='comma-separated; "" for none')
    parser.add_argument("--bare", action="store_true", help="also profile questions on a stream with no history")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--budget-tokens", type=int, default=16384)
    parser.add_argument("--device-budget-gib", type=float, default=8.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    s = settings_for(
        quick=args.quick, model=args.model, minutes=args.minutes, questions=len(QUESTIONS),
        budget_tokens=args.budget_tokens, device_budget_gib=args.device_budget_gib, cameras=1,
    )  # fmt: skip
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype)
    s = sized_to_machine(s, model, None, log)
    frames = looped_frames(int(s.minutes * 60), stream_id="cam", clip=CLIPS[0])
    args.out.mkdir(parents=True, exist_ok=True)
    modes = [mode for mode in args.modes.split(",") if mode]
    rows = [profile_mode(model, s, mode, frames, args.decode_tokens, args.out, log) for mode in modes]
    report = {"minutes": s.minutes, "budget_tokens": s.budget_tokens, "rows": rows}
    if args.bare:
        report["bare"], graphed = profile_bare(model, s, args.out, log)
        report["bare_eager_anchor"], eager = profile_bare(model, s, args.out, log, anchor_graphs=False)
        report["bare_anchor_graphs_vs_eager"] = compare_answers(graphed, eager)
        log(f"bare, anchor graphs against eager anchor layers: {json.dumps(report['bare_anchor_graphs_vs_eager'])}")
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
