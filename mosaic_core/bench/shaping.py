"""Cluster shaping on the CPU: does a change to how clusters form make planted spans easier to find?

One model, one looped clip (every scene recurs once per loop), one engine per variant, the same frames and the same
questions for each. Per variant:
- planted probes (``mosaic_core.engine.probes``) on *single* spans (one visit to a scene) and on *recurring* spans
  (the same frames in two loops, planted as one probe), scored at several budgets for the engine's own scorer and
  for random and most-recent choices over the variant's own units;
- bytes moved to the device per real question (retrieval, and all moves the answer call caused).

The model has the 7B language model's attention shape (hidden 3584, 28 query heads, 4 KV heads, head dim 128) but
few layers, a narrower MLP and the tiny preset's vision tower, all with random weights, so that it runs on two
CPU cores; what random weights can and cannot show is in ``mosaic_core/engine/probes.py``.

    python -m mosaic_core.bench.shaping --out bench/results/cpu-joins
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import EngineConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.probes import ENGINE, ProbeRequest, probing
from mosaic_core.engine.results import FrameInput

QUESTIONS = (
    "When did the cyclist pass the camera?",
    "Was there a red car near the road?",
    "How often did a person in a jacket appear?",
    "What happened at the start?",
)
SWEEP = ("spread", "random", "recent")
HELD_OUT = "held-out"


def build_model(num_layers: int, intermediate_size: int):
    """The 7B attention shape with ``num_layers`` layers, an MLP of ``intermediate_size`` and the tiny vision tower
    (projecting to 3584), random weights, float32 on the CPU; input and output embeddings tied to save memory."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mosaic_core.model.presets import preset_config_kwargs
    from mosaic_core.model.qwen2_5_vl import ATTENTION_BY_PART, Qwen25VLAdapter

    kwargs = preset_config_kwargs("qwen2.5-vl-7b")
    tiny = preset_config_kwargs("tiny")
    text = kwargs["text_config"]
    text.update(num_hidden_layers=num_layers, intermediate_size=intermediate_size, tie_word_embeddings=True)
    kwargs["vision_config"] = {**tiny["vision_config"], "out_hidden_size": text["hidden_size"]}
    kwargs["tie_word_embeddings"] = True
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        Qwen2_5_VLConfig(**kwargs), dtype=torch.float32, attn_implementation=ATTENTION_BY_PART
    )
    return Qwen25VLAdapter(model, name=f"7b-attention-{num_layers}-layers")


def looped(num_frames: int, fps: float) -> list[FrameInput]:
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    frames = iter_video_frames(sample_clip_path("bikes.mp4"), fps=fps, loop=True, max_frames=num_frames)
    return [FrameInput("cam", f.timestamp_s, f.rgb) for f in frames]


def base_window(tokens_per_frame: int, window_frames: int) -> int:
    """Tokens of the local window, plus a margin for the sink."""
    return window_frames * tokens_per_frame + 64


def probe_sets(loop_frames: int, stored_frames: int, span_frames: int, num: int) -> dict[str, list]:
    """Single spans in the first loop, the same spans with their visit one loop later (both stored), and held-out
    single spans halfway between the others (asked only in the last round, see ``run_variant``)."""
    starts = [(loop_frames - span_frames) * (2 * i + 1) // (2 * num) for i in range(num)]
    single = [((a, a + span_frames - 1), ()) for a in starts]
    recurring = [
        ((a, a + span_frames - 1), ((a + loop_frames, a + loop_frames + span_frames - 1),))
        for a in starts
        if a + loop_frames + span_frames <= stored_frames
    ]
    step = (loop_frames - span_frames) // (2 * num)
    held_out = [((a + step, a + step + span_frames - 1), ()) for a in starts]
    return {"single": single, "recurring": recurring, HELD_OUT: held_out}


def run_variant(
    model, frames, config: EngineConfig, probes: dict, budgets: tuple[int, ...], log, *, rounds: int = 1
) -> dict:
    """One engine: ingest, the real questions, then ``rounds`` rounds of the planted probes (the same spans again,
    so that what one round's questions changed, such as splits, shows in the next), the held-out spans in the last
    round only. With one round the held-out spans are not asked."""
    engine = Engine(model, config)
    engine.open_stream("cam")
    started = time.perf_counter()
    for i in range(0, len(frames), 8):
        engine.ingest(frames[i : i + 8])
    ingest_s = time.perf_counter() - started
    stats = engine.tiering.tiers.stats
    asked = []
    for question in QUESTIONS:
        before = sum(stats.bytes_by_direction.values())
        answer = engine.answer("cam", question, max_new_tokens=1)
        asked.append((answer.retrieval.bytes_fetched, sum(stats.bytes_by_direction.values()) - before))
    found: dict[str, dict[str, list[float]]] = {}
    masses: dict[str, list[float]] = {}
    for round_index in range(rounds):
        for kind, spans in probes.items():
            if kind == HELD_OUT and (rounds == 1 or round_index < rounds - 1):
                continue
            label = kind if rounds == 1 or kind == HELD_OUT else f"{kind} r{round_index + 1}"
            for span, recurs_at in spans:
                request = ProbeRequest(span=span, recurs_at=recurs_at, sweep_scorers=SWEEP, sweep_budgets=budgets)
                with probing(request):
                    engine.answer("cam", "Planted probe.", max_new_tokens=1)
                cells = found.setdefault(label, {})
                cells.setdefault(f"{ENGINE}@{config.retrieval_budget_tokens}", []).append(request.span_found[ENGINE])
                for (scorer, budget), value in request.span_found_at.items():
                    cells.setdefault(f"{scorer}@{budget}", []).append(value)
                masses.setdefault(label, []).append(request.span_mass)
    records = engine.stream("cam").former.records()
    row = {
        "units": len(records),
        "multi_span_units": sum(len(r.spans()) > 1 for r in records),
        "mean_unit_tokens": statistics.mean(r.num_tokens for r in records),
        "ingest_s": ingest_s,
        "bytes_per_question": statistics.mean(b for b, _ in asked),
        "bytes_all_per_question": statistics.mean(b for _, b in asked),
        "probe_found": {kind: {k: statistics.mean(v) for k, v in cells.items()} for kind, cells in found.items()},
        "probe_span_mass": {kind: statistics.mean(v) for kind, v in masses.items()},
    }
    del engine
    return row


def format_report(result: dict) -> str:
    lines = [result["header"], ""]
    budgets = result["budgets"]
    head = f"{'variant':>22} | {'probes':>9} | {'scorer':>8} | " + " | ".join(f"{b:>6}" for b in budgets)
    lines += [head, "-" * len(head)]
    for label, row in result["variants"].items():
        for kind, cells in row["probe_found"].items():
            for scorer in ("spread", "random", "recent"):
                values = [cells.get(f"{scorer}@{b}") for b in budgets]
                text = " | ".join("     -" if v is None else f"{v:>6.3f}" for v in values)
                lines.append(f"{label:>22} | {kind:>9} | {scorer:>8} | {text}")
    lines += ["", f"{'variant':>22} | units | multi-span | tokens/unit | KiB/q retr | KiB/q all | span mass s/r"]
    for label, row in result["variants"].items():
        mass = {kind.split(" r")[0]: value for kind, value in reversed(row["probe_span_mass"].items())}  # round 1
        lines.append(
            f"{label:>22} | {row['units']:>5} | {row['multi_span_units']:>10} | {row['mean_unit_tokens']:>11.1f} | "
            f"{row['bytes_per_question'] / 1024:>10.0f} | {row['bytes_all_per_question'] / 1024:>9.0f} | "
            f"{mass.get('single', 0):.2f}/{mass.get('recurring', 0):.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.model == "7b-attention":
        model = build_model(args.layers, args.intermediate)
    else:
        from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

        model = Qwen25VLAdapter.from_preset(args.model)
    frames = looped(args.frames, args.fps)
    tokens = model.choose_geometry(*frames[0].rgb.shape[:2], args.tokens_per_frame).tokens_per_frame
    window_frames = 4
    history = args.frames * tokens
    budgets = tuple(round(f * history) for f in (0.05, 0.10, 0.20, 0.40))
    base = EngineConfig(
        target_tokens_per_frame=args.tokens_per_frame,
        page_tokens=tokens,
        local_window_tokens=window_frames * tokens,
        retrieval_budget_tokens=budgets[1],
        # a quarter of the history, beside what one question and the window need, so that retrieval moves bytes
        device_budget_bytes=(history // 4 + 2 * (budgets[1] + base_window(tokens, window_frames)))
        * model.kv_spec.bytes_per_token,
        formation=FormationConfig(max_tokens=min(budgets[1], args.cluster_frames * tokens)),
    )
    loop_frames = round(10.0 * args.fps)  # bikes.mp4 lasts 10 s
    probes = probe_sets(loop_frames, args.frames - window_frames - 1, args.span_frames, args.probes)
    result = {
        "command": "python -m mosaic_core.bench.shaping " + " ".join(argv if argv is not None else sys.argv[1:]),
        "header": (
            f"{args.frames} frames of bikes.mp4 looped at {args.fps} fps ({loop_frames} per loop), {tokens} tokens "
            f"each, {history} history tokens; model {model.name} (random weights); cluster "
            f"cap {base.formation.max_tokens} tokens; engine budget {base.retrieval_budget_tokens}; planted span "
            f"found at budgets {budgets} (5/10/20/40% of history)"
        ),
        "budgets": budgets,
        "variants": {},
    }
    for label, config in _variants(base, args).items():
        t0 = time.perf_counter()
        result["variants"][label] = run_variant(model, frames, config, probes, budgets, log, rounds=args.rounds)
        log(f"{label}: {time.perf_counter() - t0:.0f} s {json.dumps(result['variants'][label])}")
    with open(f"{args.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    report = format_report(result)
    with open(f"{args.out}.txt", "w") as f:
        f.write(f"$ {result['command']}\n{report}\n")
    print(report)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results path without suffix: writes .json and .txt")
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--model", default="7b-attention", help="7b-attention (see --layers) or a preset name: tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--tokens-per-frame", type=int, default=16)
    p.add_argument("--cluster-frames", type=int, default=8, help="cluster size cap, in frames")
    p.add_argument("--join", default="0.99", help="comma-separated join_min_similarity values to compare with off")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--span-frames", type=int, default=2)
    p.add_argument(
        "--split",
        default="",
        help="comma-separated split settings MIN_QUESTIONS:DENSITY_RATIO to compare with off, e.g. 1:2,2:4",
    )
    p.add_argument(
        "--merges",
        default="",
        help="comma-separated co-retrieval merge settings MIN_QUESTIONS:JOINT_FRACTION (or off) to compare with the "
        "engine's default (3:0.8)",
    )
    p.add_argument(
        "--key-weight", default="", help="comma-separated FormationConfig.key_weight values to compare with 0"
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds of the same probes (splits need 2 or more)")
    return p


def _variants(base: EngineConfig, args: argparse.Namespace) -> dict[str, EngineConfig]:
    """The engines compared, by label: ``base`` (joins off, or the baseline without --join), then one per setting
    of --join, --merges, --key-weight and --split, in that order."""
    variants = {"joins off": base} if args.join else {"baseline": base}
    for value in [float(v) for v in args.join.split(",") if v]:
        formation = dataclasses.replace(base.formation, join_min_similarity=value)
        variants[f"joins >= {value}"] = dataclasses.replace(base, formation=formation)
    for setting in [v for v in args.merges.split(",") if v]:
        if setting == "off":
            variants["merges off"] = dataclasses.replace(base, merge_min_questions=10**9)
        else:
            min_questions, fraction = setting.split(":")
            variants[f"merges {min_questions}q {fraction}"] = dataclasses.replace(
                base, merge_min_questions=int(min_questions), merge_min_joint_fraction=float(fraction)
            )
    for value in [float(v) for v in args.key_weight.split(",") if v]:
        formation = dataclasses.replace(base.formation, key_weight=value)
        variants[f"key weight {value}"] = dataclasses.replace(base, formation=formation)
    for setting in [v for v in args.split.split(",") if v]:
        min_questions, ratio = setting.split(":")
        formation = dataclasses.replace(
            base.formation, split_min_questions=int(min_questions), split_min_density_ratio=float(ratio)
        )
        variants[f"splits {min_questions}q x{ratio}"] = dataclasses.replace(base, formation=formation)
    return variants


if __name__ == "__main__":
    sys.exit(main())
