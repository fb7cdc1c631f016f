"""What the service's engine thread does for each stream after an ingest call, as a camera's history grows.

One stream of the bikes clip, looped, is ingested a frame per call as the service's engine loop does (tiny preset
on the CPU: the cost measured is the host's bookkeeping, which does not depend on the model's size). After every
call the metadata index is flushed as the loop flushes it. At each checkpoint of history two pieces of per-call
work are timed both ways on the same engine, side by side:

- the metadata flush: ``changes`` (as built: the clusters whose residency changed, and the newest ones) against
  ``full`` (every cluster of the stream compared, the flush before commit c2cc9db); with nothing changed between
  repeats, neither publishes anything, so the time is the comparison alone;
- the watch check (which clusters sealed since the stream's watermark): ``newest`` (a look of the stream's
  ``WatchFrontier``, as built since session 43: the clusters numbered since its last look and those it waits on)
  against ``all`` (every cluster listed, then filtered, as before session 17). Until session 43 ``newest`` was a
  binary search for the clusters that start after the watermark.

A third column is the stream's whole metadata view (``TierSync.cluster_metas``), which the publisher's drift check
built for every stream every 5 s until commit 5da1cdf; it now reads stream ids only, and builds the view only to
republish the store.

The last two time the stream's stats, which GetStream and ListStreams read on the engine thread for every stream:
``listed`` (counted over the stream's cluster listing, as ``Engine.stream_stats`` did until session 21) against
``kept`` (as built: the residency manager's per-stream counts, kept as clusters change).

    python -m bench.upkeep_scaling --out bench/results/cpu-upkeep-scaling

Results: a table on stdout, the raw numbers in ``--out``.json and the table in ``--out``.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STREAM = "cam"
REPEATS = 50


def _time(work, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats


def _measure(engine, sync, held: int) -> dict:
    from mosaic_core.engine.watching import WatchFrontier

    mark = engine.clusters(STREAM)[-2].start_s  # a watermark that leaves one sealed cluster to check
    frontier = WatchFrontier(watermark_s=mark)
    frontier.sealed(engine, STREAM)  # its first look lists the stream's records once; the timed ones are a pass's
    return {
        "clusters": held,
        "changes_ms": 1e3 * _time(lambda: sync.flush([STREAM]), REPEATS),
        "full_ms": 1e3 * _time(lambda: sync._diff_all(STREAM), REPEATS),
        "watch_newest_ms": 1e3 * _time(lambda: frontier.sealed(engine, STREAM), REPEATS),
        "watch_all_ms": 1e3 * _time(lambda: [c for c in engine.clusters(STREAM) if c.start_s > mark], REPEATS),
        "view_ms": 1e3 * _time(lambda: sync.cluster_metas(STREAM), REPEATS),
        "stats_listed_ms": 1e3 * _time(lambda: _stats_listed(engine), REPEATS),
        "stats_kept_ms": 1e3 * _time(lambda: engine.stream_stats(STREAM), REPEATS),
    }


def _stats_listed(engine) -> tuple[dict, dict]:
    """The stream's clusters and bytes per tier counted over its listing (``stream_stats`` before session 21)."""
    by_tier, bytes_by_tier = {}, {}
    for info in engine.clusters(STREAM):
        by_tier[info.tier] = by_tier.get(info.tier, 0) + 1
        bytes_by_tier[info.tier] = bytes_by_tier.get(info.tier, 0) + info.num_bytes
    return by_tier, bytes_by_tier


def run(checkpoints: list[int], fps: float) -> list[dict]:
    from bench.tiny_history import tiny_engine_and_clip
    from mosaic_core.engine.results import FrameInput
    from services.metadata import InMemoryMetadataStore
    from services.publisher import MetadataPublisher, WorkerView
    from services.tier_sync import TierSync

    engine, clip = tiny_engine_and_clip(STREAM, fps)
    publisher = MetadataPublisher(InMemoryMetadataStore(), "0", lambda: WorkerView({}, {}))  # not started
    sync = TierSync(engine, publisher, "0")
    rows, offset_s, lap_s = [], 0.0, clip[-1][0] + 1.0 / fps
    while len(rows) < len(checkpoints):
        for t, rgb in clip:
            engine.ingest([FrameInput(STREAM, offset_s + t, rgb)])
            sync.flush([STREAM])
            held = len(engine.clusters(STREAM))
            if len(rows) < len(checkpoints) and held >= checkpoints[len(rows)]:
                rows.append(_measure(engine, sync, held))
                print(_line(rows[-1]), flush=True)
        offset_s += lap_s
    return rows


def _line(row: dict) -> str:
    return (
        f"{row['clusters']:>8}  {row['full_ms']:>14.3f}  {row['changes_ms']:>17.3f}  {row['watch_all_ms']:>13.3f}"
        f"  {row['watch_newest_ms']:>16.3f}  {row['view_ms']:>7.3f}  {row['stats_listed_ms']:>16.3f}"
        f"  {row['stats_kept_ms']:>14.3f}"
    )


HEADER = (
    f"{'clusters':>8}  {'flush, full ms':>14}  {'flush, changes ms':>17}  {'watch, all ms':>13}  "
    f"{'watch, newest ms':>16}  {'view ms':>7}  {'stats, listed ms':>16}  {'stats, kept ms':>14}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="100,200,400,800,1600", help="clusters held at which to time")
    parser.add_argument("--fps", type=float, default=4.0, help="frames a second taken from the clip")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.txt")
    args = parser.parse_args(argv)
    checkpoints = [int(n) for n in args.checkpoints.split(",")]
    print(HEADER, flush=True)
    rows = run(checkpoints, args.fps)
    if args.out:
        command = "python -m bench.upkeep_scaling " + " ".join(sys.argv[1:] if argv is None else argv)
        report = {"command": command, "repeats": REPEATS, "rows": rows}
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
        Path(f"{args.out}.txt").write_text("\n".join([command, HEADER, *map(_line, rows)]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
