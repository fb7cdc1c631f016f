"""``mosaic streams`` (a table; ``add``, ``rm``, ``show``) and ``mosaic push``: thin clients of a running server.

gRPC and the client are imported when a command runs, never at module level (``--help`` stays instant).
A failed call prints one sentence and exits 1; a bad argument exits 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mosaic_core.cli import count, positive_float
from mosaic_core.terminal import UNIX_TIME_THRESHOLD_S, Progress, escape_for_terminal, iso_time

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "MOSAIC_API_KEY"  # services.config.API_KEY_ENV (not imported: it pulls in pydantic)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".yuv", ".ts", ".m4v")
_STATES = {0: "?", 1: "push", 2: "connecting", 3: "running", 4: "ended", 5: "error"}


def add_client_flags(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--target``, ``--api-key``, ``--tls-ca``; ``suppress`` leaves them unset (for sub-subcommands, whose
    defaults would otherwise overwrite what the parent command parsed)."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--target", default=default(DEFAULT_TARGET), help=f"server host:port (default {DEFAULT_TARGET})")
    p.add_argument("--api-key", default=default(os.environ.get(API_KEY_ENV)), help=f"API key (default: ${API_KEY_ENV})")
    p.add_argument("--tls-ca", default=default(None), help="PEM CA bundle; connects with TLS")


def open_client(args):
    from services.client import MosaicClient

    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return MosaicClient(args.target, api_key=args.api_key, root_certificates=ca)


def client_command(func):
    """Turns a failed call into one sentence (exit 1) instead of a traceback."""

    @functools.wraps(func)
    def run(args) -> int:
        import grpc

        try:
            return func(args)
        except grpc.RpcError as err:
            print(f"error: {rpc_sentence(err, args.target)}", file=sys.stderr)
            return 1
        except OSError as err:
            where = f"{err.filename!r}" if err.filename else "a file"
            print(f"error: cannot read {where} ({err.strerror or err}).", file=sys.stderr)
            return 2
        except ValueError as err:  # a value the API's fields cannot carry (protobuf refuses it before sending)
            print(f"error: that cannot be sent to the server: {err}.", file=sys.stderr)
            return 2

    return run


# How gRPC words a call that reached no server (its own details, not a server's sentence).
TRANSPORT_FAILURES = re.compile(
    r"failed to connect|connection refused|connection reset|dns resolution failed|socket closed|handshake"
    r"|connections to all backends failing|broken pipe|end of tcp stream|unavailable to connect",
    re.IGNORECASE,
)


def rpc_sentence(err, target: str) -> str:
    code = err.code().name if err.code() else "UNKNOWN"
    details = (err.details() or "").strip().rstrip(".")
    if code == "UNAVAILABLE" and (not details or TRANSPORT_FAILURES.search(details)):
        return f"No Mosaic server answers at {target}; start one with `mosaic serve` or pass --target HOST:PORT."
    if code == "UNAVAILABLE":  # the server's own sentence: it is starting, or a worker is down
        return f"The server at {target} cannot serve this now: {details}."
    if code == "DEADLINE_EXCEEDED":
        return f"The server at {target} did not answer in time ({details or 'deadline exceeded'})."
    return f"{code}: {details}."


def add_streams_command(subparsers) -> None:
    streams = subparsers.add_parser("streams", help="list the streams of a running server (or: streams add|rm|show)")
    add_client_flags(streams)
    streams.set_defaults(func=run_streams_table)
    sub = streams.add_subparsers(dest="streams_command", metavar="ACTION")

    add = sub.add_parser("add", help="register a camera: pulled from --source, or pushed by a client (--push)")
    add.add_argument("stream_id", metavar="ID")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", metavar="URL", help="rtsp://, http(s):// URL or a video file the server can read")
    where.add_argument("--push", action="store_true", help="frames arrive by PushFrames (see `mosaic push`)")
    add.add_argument("--fps", type=positive_float, default=1.0, help="frames kept per second (default 1)")
    add.add_argument("--retention-s", type=float, default=0.0, help="forget history older than this (0: keep all)")
    add.add_argument("--loop", action="store_true", help="replay a file source from the start when it ends")
    add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    add_client_flags(add, suppress=True)
    add.set_defaults(func=run_streams_add)

    rm = sub.add_parser("rm", help="delete a stream and its history")
    rm.add_argument("stream_id", metavar="ID")
    add_client_flags(rm, suppress=True)
    rm.set_defaults(func=run_streams_rm)

    show = sub.add_parser("show", help="everything the server knows about one stream")
    show.add_argument("stream_id", metavar="ID")
    add_client_flags(show, suppress=True)
    show.set_defaults(func=run_streams_show)


def add_push_command(subparsers) -> None:
    p = subparsers.add_parser("push", help="send a local video file or a folder of JPEG/PNG images to a pushed stream")
    p.add_argument("stream_id", metavar="ID")
    p.add_argument("path", metavar="VIDEO|DIR", help="a video file, or a folder of .jpg/.png images (name order)")
    p.add_argument("--fps", type=positive_float, default=None, help="frames per second (default: the stream's)")
    p.add_argument("--max-frames", type=count, default=None, help="stop after this many frames")
    p.add_argument("--realtime", action="store_true", help="pace frames at --fps instead of as fast as possible")
    p.add_argument(
        "--start-s",
        type=float,
        default=None,
        help="timestamp of the first frame (default: now, as Unix time, or just after the stream's last frame)",
    )
    p.add_argument("--create", action="store_true", help="create the stream (--push) if it does not exist")
    add_client_flags(p)
    p.set_defaults(func=run_push)


# -- streams ----------------------------------------------------------------------------------------------------


@client_command
def run_streams_table(args) -> int:
    with open_client(args) as client:
        streams = client.list_streams()
    if not streams:
        print("(no streams; add one with `mosaic streams add ID --push` or `--source URL`)")
        return 0
    header = ("stream", "worker", "state", "fps", "ingested", "dropped", "clusters", "lag", "last error")
    print("{:<16} {:>6} {:<10} {:>4} {:>8} {:>7} {:>8} {:>7}  {}".format(*header))
    for s in streams:
        print(streams_table_row(s))
    return 0


def streams_table_row(s) -> str:
    """One stream's line of the ``mosaic streams`` table."""
    st = s.stats
    error = escape_for_terminal(s.source_error)[:40] or "-"
    return (
        f"{s.stream_id:<16} {s.worker_id or '-':>6} {_STATES.get(s.source_state, '?'):<10} {s.fps:>4g} "
        f"{st.frames_ingested:>8} {st.frames_dropped:>7} {st.num_clusters:>8} {f'{st.lag_s:.1f}s':>7}  {error}"
    )


@client_command
def run_streams_add(args) -> int:
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --label takes KEY=VALUE, got {item!r}.", file=sys.stderr)
            return 2
        labels[key] = value
    source = _server_source(args.source) if args.source else None
    with open_client(args) as client:
        stream = client.create_stream(
            args.stream_id,
            fps=args.fps,
            source_url=source,
            loop_source=args.loop,
            retention_s=args.retention_s,
            labels=labels,
        )
    how = f"pulls {source}" if source else f"waits for frames: `mosaic push {args.stream_id} VIDEO|DIR`"
    print(f"created stream {stream.stream_id} on worker {stream.worker_id or '-'} at {stream.fps:g} fps; it {how}")
    return 0


def _server_source(source: str) -> str:
    """A local file as an absolute path (the server resolves paths itself), a sample clip name as its path."""
    if "://" in source:
        return source
    if os.path.exists(source):
        return str(Path(source).resolve())
    from mosaic_core.checks import resolve_video

    return resolve_video(source)  # NotFoundError: one sentence, exit 2


@client_command
def run_streams_rm(args) -> int:
    with open_client(args) as client:
        num_clusters = client.delete_stream(args.stream_id)
    print(f"deleted stream {args.stream_id} and its {num_clusters} cluster(s)")
    return 0


@client_command
def run_streams_show(args) -> int:
    with open_client(args) as client:
        s = client.get_stream(args.stream_id)
    st = s.stats
    rows = [
        ("stream", s.stream_id),
        ("source", s.source_url if s.HasField("source_url") else "push"),
        (
            "state",
            _STATES.get(s.source_state, "?") + (f" ({escape_for_terminal(s.source_error)})" if s.source_error else ""),
        ),
        ("worker", s.worker_id or "-"),
        ("fps", f"{s.fps:g}" + (", looping" if s.loop_source else "")),
        ("retention", f"{s.retention_s:g} s" if s.retention_s else "keep all"),
        ("created", iso_time(s.created_s) if s.created_s else "-"),
        (
            "frames",
            f"{st.frames_received} received, {st.frames_ingested} ingested, {st.frames_dropped} dropped, "
            f"{st.ingest_queue_frames} queued",
        ),
        ("first / last frame", f"{_stamp(st, 'first_timestamp_s')} / {_stamp(st, 'last_timestamp_s')}"),
        ("lag", f"{st.lag_s:.1f} s"),
        ("clusters", str(st.num_clusters)),
    ]
    rows += [(f"  {_tier_name(t.tier)}", f"{t.num_clusters} clusters, {t.num_bytes:,} bytes") for t in st.tiers]
    rows += [(f"label {escape_for_terminal(k)}", escape_for_terminal(v)) for k, v in sorted(s.labels.items())]
    for name, value in rows:
        print(f"{name:<20} {value}")
    return 0


def _stamp(stats, field: str) -> str:
    if not stats.HasField(field):
        return "-"
    value = getattr(stats, field)
    return iso_time(value) if value > UNIX_TIME_THRESHOLD_S else f"{value:.2f}s"


def _tier_name(tier: int) -> str:
    return {1: "device", 2: "host", 3: "disk"}.get(tier, "?")


# -- push -------------------------------------------------------------------------------------------------------


@client_command
def run_push(args) -> int:
    import grpc

    path = Path(args.path)
    if not path.exists() and (args.path.endswith(os.sep) or path.suffix.lower() not in ("", *_VIDEO_SUFFIXES)):
        sentence = f"{args.path!r} does not exist; give a video file, a sample clip name or an image folder."
        print(f"error: {sentence}", file=sys.stderr)
        return 2
    if not path.exists():
        from mosaic_core.checks import resolve_video

        path = Path(resolve_video(args.path))  # a sample clip name; otherwise NotFoundError, one sentence
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else None
    if images == []:
        print(f"error: Folder {args.path!r} has no .jpg, .jpeg or .png images.", file=sys.stderr)
        return 2
    with open_client(args) as client:
        stream = _stream_to_push_to(client, args)
        if stream is None:
            return 1
        if stream.HasField("source_url"):
            sentence = f"Stream {args.stream_id!r} pulls {stream.source_url}; push only to a stream added with --push."
            print(f"error: {sentence}", file=sys.stderr)
            return 2
        fps = args.fps or stream.fps or 1.0
        if stream.fps and fps > stream.fps:
            print(f"note: {args.stream_id} keeps {stream.fps:g} frames/s, so it samples what is pushed at {fps:g}")
        frames, total = _frames_to_push(args, path, images, stream, fps)
        progress = Progress(f"pushing to {args.stream_id}", total)
        read = _Reading(_paced(frames, fps, args.realtime, progress))
        try:
            response = client.push_frames(read)
        except grpc.RpcError:
            if read.error is not None:  # gRPC ends the call as UNKNOWN without saying why: say it
                raise read.error from None
            raise
    progress.total = max(progress.total, 1)
    print(push_summary(args.stream_id, response, stream_fps=stream.fps))
    for error in list(response.errors)[:5]:
        print(f"  frame {error.index}: {escape_for_terminal(error.reason)}")
    return 0 if response.frames_rejected == 0 else 1


def _stream_to_push_to(client, args):
    """The stream ``mosaic push`` sends to, created first where it does not exist and ``--create`` is given; None once
    its absence is printed."""
    import grpc

    try:
        return client.get_stream(args.stream_id)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND or not args.create:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                print(
                    f"error: Stream {args.stream_id!r} does not exist; create it with "
                    f"`mosaic streams add {args.stream_id} --push` or pass --create.",
                    file=sys.stderr,
                )
                return None
            raise
        stream = client.create_stream(args.stream_id, fps=args.fps or 1.0)
        print(f"created stream {args.stream_id} (push) on worker {stream.worker_id or '-'}")
        return stream


def _frames_to_push(args, path: Path, images: list[Path] | None, stream, fps: float) -> tuple[Iterator, int]:
    """The frames to push (at most ``--max-frames``), timestamped from ``--start-s`` or now but after the stream's
    last frame, and how many there are (a video's estimated from its length)."""
    # A pushed camera's clock is wall-clock time, and it must keep increasing: continue after its last frame.
    start_s = time.time() if args.start_s is None else args.start_s
    if stream.stats.HasField("last_timestamp_s"):
        start_s = max(start_s, stream.stats.last_timestamp_s + 1.0 / fps)
    frames = _image_frames(images, args.stream_id, fps, start_s) if images else None
    if frames is None:
        frames = _video_frames(str(path), args.stream_id, fps, start_s, args.max_frames)
    total = len(images) if images else _estimate_frames(str(path), fps)
    if args.max_frames:
        frames = _take(frames, args.max_frames)
        total = min(total, args.max_frames)
    return frames, total


def push_summary(stream_id: str, response, *, stream_fps: float) -> str:
    """The line ``mosaic push`` ends with; frames sampled out to the stream's fps are named only when there were
    some."""
    line = (
        f"pushed to {stream_id}: {response.frames_accepted} accepted, {response.frames_dropped} dropped, "
        f"{response.frames_rejected} rejected"
    )
    num = response.frames_sampled_out
    return line if num == 0 else f"{line}, {num} sampled out to {stream_fps:g} frames/s"


class _Reading:
    """Frames as gRPC reads them, keeping the error that ended the reading (gRPC cancels the call and drops it)."""

    def __init__(self, frames: Iterator) -> None:
        self.frames = frames
        self.error: Exception | None = None

    def __iter__(self) -> Iterator:
        try:
            yield from self.frames
        except Exception as err:
            self.error = err
            raise


def _image_frames(images: list[Path], stream_id: str, fps: float, start_s: float) -> Iterator:
    from services.gen.mosaic.v1 import mosaic_pb2 as pb

    for i, image in enumerate(images):
        # the server decodes JPEG/PNG itself (and says which frame it could not read)
        yield pb.Frame(stream_id=stream_id, timestamp_s=start_s + i / fps, encoded=image.read_bytes())


def _video_frames(source: str, stream_id: str, fps: float, start_s: float, max_frames: int | None) -> Iterator:
    from mosaic_core.model.video import iter_video_frames

    for frame in iter_video_frames(source, fps=fps, max_frames=max_frames, start_offset_s=start_s):
        yield (stream_id, frame.timestamp_s, frame.rgb)


def _estimate_frames(source: str, fps: float) -> int:
    from mosaic_core.model.video import probe_video

    duration = probe_video(source).duration_s
    return max(1, round(duration * fps)) if duration else 1


def _take(frames: Iterator, limit: int) -> Iterator:
    for i, frame in enumerate(frames):
        if i >= limit:
            return
        yield frame


def _paced(frames: Iterator, fps: float, realtime: bool, progress: Progress) -> Iterator:
    started = time.monotonic()
    for done, frame in enumerate(frames, start=1):
        if realtime:
            time.sleep(max(0.0, started + (done - 1) / fps - time.monotonic()))
        yield frame
        progress.total = max(progress.total, done)
        progress.update(done)
