"""One engine setting off and on, side by side in one process: bare question, TTFT, decode of one and of many answers.

    python -m bench.side_by_side --switch SWITCH [--cameras 8] [--also-answers 4,16] [--minutes 2] [--rounds 2] \
        --out FILE.json
    python -m bench.side_by_side --switch SWITCH --quick --out FILE.json      # CPU, tiny preset

Switches (off, then on):

- ``small-pass-kernels``: the language model's small passes with transformers' element-wise ops, then with the
  Triton kernels (``text_fusion.use_small_pass_kernels``); on the CPU both run the same eager code;
- ``split-plan``: the attention kernel's keys split for at least two programs an SM, then for as many programs as
  the SMs hold at once (``kernels.attention_plan.use_split_plan``); on the CPU the kernel does not run.

One model; for each round, off then on, a fresh cluster-mode engine with
scenario A's settings (``mosaic bench engine``), so that its CUDA graphs are captured with that setting. Each engine
ingests ``--minutes`` of the looped sample clips on ``--cameras`` cameras and keeps one stream with no history.
After warm-up answers (compiles, captures), it measures:

- the bare question: time to first token on the stream with no history (p50 over the questions, three times);
- TTFT with history: one question per camera, one token each (p50);
- decode: one answer of ``--decode-tokens`` tokens alone, then ``--cameras`` answers at once on different cameras,
  then each count in ``--also-answers`` (at most ``--cameras``)
  (batched steps, ``mosaic bench decode``'s reading), ms per step and tokens/s.

With ``--profile-dir`` the last round also runs the decode of each count in ``--profile-answers`` once more under
torch's profiler and writes its kernel table there, one file per setting and count.

Each setting's answers are compared with the first round's off answers: equal first tokens and equal answers.
With random weights close logits flip on rounding differences, so "off" against "off" of another round is the
control for what equality to expect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mosaic_core.bench.decode_batch import run_concurrent
from mosaic_core.bench.settings import engine_config, settings_for, sized_to_machine
from mosaic_core.bench.workload import CLIPS, QUESTIONS, looped_frames
from mosaic_core.engine.engine import Engine
from mosaic_core.kernels.attention_plan import use_split_plan
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.text_fusion import use_small_pass_kernels


def _small_pass_kernels(model, on: bool) -> str:
    swapped = use_small_pass_kernels(model.model.model.language_model, on)
    return f"small-pass kernels {'on' if on else 'off'} ({swapped} modules)"


def _split_plan(model, on: bool) -> str:
    plan = "resident" if on else "twice_the_sms"
    use_split_plan(plan)
    return f"split plan {plan}"


SWITCHES = {"small-pass-kernels": _small_pass_kernels, "split-plan": _split_plan}


def _profile(engine, names: list[str], decode_tokens: int, out: Path) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    run = run_concurrent(engine, names, decode_tokens, while_decoding=profiler)
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60)
    header = (
        f"# {len(names)} answers at once, {decode_tokens} tokens: their decode steps after the prefills, "
        f"{run['ms_per_step']:.2f} ms a step (profiled)\n"
    )
    out.write_text(header + table + "\n")


def _measure(
    model,
    s,
    names: list[str],
    per_camera: list,
    decode_tokens: int,
    also: list[int],
    log,
    profile_to=None,
    profile_counts=(),
) -> dict:
    engine = Engine(model, engine_config(s, "cluster"))
    for name in [*names, "bare"]:
        engine.open_stream(name)
    for second in range(len(per_camera[0])):
        engine.ingest([frames[second] for frames in per_camera])
    for question in QUESTIONS:  # warm-up: compiles kernels, captures every length's graphs
        engine.answer("bare", question, max_new_tokens=1)
        engine.answer(names[0], question, max_new_tokens=1)
    for n in sorted({1, len(names), *also, *profile_counts}):  # captures each batch size's decode graphs
        run_concurrent(engine, names[:n], 4)
    bare = [engine.answer("bare", q, max_new_tokens=1).timings.time_to_first_token_s for q in QUESTIONS * 3]
    asked = [engine.answer(name, QUESTIONS[i % len(QUESTIONS)], max_new_tokens=1) for i, name in enumerate(names)]
    one = run_concurrent(engine, names[:1], decode_tokens)
    many = run_concurrent(engine, names, decode_tokens)
    others = {n: run_concurrent(engine, names[:n], decode_tokens) for n in also}
    if profile_to is not None:
        for n in profile_counts:
            _profile(engine, names[:n], decode_tokens, Path(f"{profile_to}-decode{n}.txt"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    row = {
        "bare_ttft_p50_ms": statistics.median(bare) * 1e3,
        "history_ttft_p50_ms": statistics.median(a.timings.time_to_first_token_s for a in asked) * 1e3,
        "decode_one_ms_per_step": one["ms_per_step"],
        "decode_one_tokens_per_s": one["tokens_per_s"],
        f"decode_{len(names)}_ms_per_step": many["ms_per_step"],
        f"decode_{len(names)}_tokens_per_s": many["tokens_per_s"],
        **{f"decode_{n}_ms_per_step": run["ms_per_step"] for n, run in others.items()},
        **{f"decode_{n}_tokens_per_s": run["tokens_per_s"] for n, run in others.items()},
        "prefill_graphs_captured": engine.parts.prefill_graphs.graph_pool.num_captured,
        "decode_graphs_captured": engine.parts.decode_graphs.graph_pool.num_captured,
    }
    log(json.dumps(row))
    tokens = {"first": [a.token_ids[:1] for a in asked], "one": one["tokens"], "many": many["tokens"]}
    del engine
    return {"row": row, "tokens": tokens}


def _equal(tokens: dict, control: dict) -> dict:
    first = sum(a == b for a, b in zip(tokens["first"], control["first"], strict=True))
    answers = tokens["one"] + tokens["many"]
    same = sum(a == b for a, b in zip(answers, control["one"] + control["many"], strict=True))
    return {"first_tokens_equal": f"{first} of {len(tokens['first'])}", "answers_equal": f"{same} of {len(answers)}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 cameras, 20 s each; runs on CPU")
    parser.add_argument("--model", default="qwen2.5-vl-7b")
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--also-answers", default="", help="more counts of answers at once, comma-separated")
    parser.add_argument("--profile-dir", type=Path, help="the last round's decode kernel tables go here")
    parser.add_argument("--profile-answers", default="1,8", help="counts of answers at once to profile")
    parser.add_argument("--minutes", type=float, default=2.0, help="history per camera")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of off then on")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    cameras = 2 if args.quick else args.cameras
    seconds = 20 if args.quick else int(args.minutes * 60)
    s = settings_for(
        quick=args.quick, model=args.model, minutes=seconds / 60, questions=len(QUESTIONS),
        budget_tokens=16384, device_budget_gib=40.0, cameras=cameras,
    )  # fmt: skip
    model = Qwen25VLAdapter.load(s.model, device=s.device, dtype=s.dtype)
    s = sized_to_machine(s, model, None, log)
    names = [f"cam{c:02d}" for c in range(cameras)]
    also = [min(int(n), cameras) for n in args.also_answers.split(",") if n]
    profile_counts = [min(int(n), cameras) for n in args.profile_answers.split(",") if n]
    per_camera = [looped_frames(seconds, stream_id=n, clip=CLIPS[c % len(CLIPS)]) for c, n in enumerate(names)]
    switch = SWITCHES[args.switch]
    if not torch.cuda.is_available():
        log(f"no CUDA device: {args.switch} changes nothing on the CPU, so both settings run the same code")
    runs = []
    for round_index in range(args.rounds):
        for on in (False, True):
            log(f"round {round_index + 1}, {switch(model, on)}")
            profile_to = None
            if args.profile_dir is not None and round_index == args.rounds - 1:
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                profile_to = args.profile_dir / f"{args.switch}-{'on' if on else 'off'}"
            measured = _measure(model, s, names, per_camera, args.decode_tokens, also, log, profile_to, profile_counts)
            runs.append({"round": round_index + 1, "on": on, **measured})
    control = runs[0]["tokens"]
    for run in runs:
        run["row"].update(_equal(run["tokens"], control))
    keys = list(runs[0]["row"])
    lines = [" | ".join(["round", args.switch, *keys]), " | ".join(["---"] * (len(keys) + 2))]
    for run in runs:
        values = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in run["row"].values()]
        lines.append(" | ".join([str(run["round"]), "on" if run["on"] else "off", *values]))
    print("\n".join(lines))
    args.out.write_text(
        json.dumps(
            {
                "model": s.model,
                "switch": args.switch,
                "cameras": cameras,
                "seconds_per_camera": seconds,
                "decode_tokens": args.decode_tokens,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "runs": runs,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
