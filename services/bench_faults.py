"""``mosaic bench faults``: real faults against a real local service, and what each one cost.

Starts ``redis-server`` and ``mosaic serve`` (tiny preset, one CPU worker, a data directory) as child processes
on loopback, pushes two cameras at real-time pace, and then, one after another:

1. SIGKILL of the worker process, mid-ingest (Ray restarts it);
2. SIGSTOP of Redis for 20 s, with a DeleteStream during the freeze;
3. SIGKILL of Redis and a restart with an empty database;
4. SIGTERM of the whole server and a new one on the same data directory and Redis.

Before each fault it reads the sealed clusters from the worker's manifests; after it, it checks that every one
is still there with an equal span, token count and KV checksum, that a question over the pre-fault time range
cites only pre-fault clusters, and how long questions took to answer again. Processes are killed by PID, and
every wait is bounded. Prints a table; exits 1 if any sealed cluster was lost or a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.local_service import LocalService, stop_services_on_sigterm, wait_until

STREAMS = ("cam-a", "cam-b")
DELETED = "cam-gone"
FPS = 2.0
QUESTION = "what happened?"


@dataclass(slots=True)
class FaultResult:
    key: str
    fault: str
    before: int = 0
    after: int = 0
    lost: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    client_errors: Counter = field(default_factory=Counter)
    checks: list[str] = field(default_factory=list)  # failed checks, as sentences

    @property
    def ok(self) -> bool:
        return not self.lost and not self.checks and self.recovery_s is not None


class Pusher:
    """Pushes every camera at real-time pace from a background thread, counting client errors by code."""

    def __init__(self, service: LocalService, frames: list[np.ndarray], streams=STREAMS) -> None:
        self.service, self.frames, self.streams = service, frames, streams
        self.clock_s = 0.0
        self.errors: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pusher", daemon=True)

    def start(self) -> Pusher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        import grpc

        index = 0
        while not self._stop.wait(1.0 / FPS):
            self.clock_s += 1.0 / FPS
            rgb = self.frames[index % len(self.frames)]
            index += 1
            try:
                with self.service.client() as client:
                    client.push_frames([(sid, self.clock_s, rgb) for sid in self.streams], timeout_s=10)
            except grpc.RpcError as err:
                self.errors[err.code().name] += 1


def ask_until_answered(service: LocalService, errors: Counter, *, time_range=None, timeout_s: float = 120.0):
    """Asks cam-a until an answer comes; returns it (or None), counting the errors on the way."""
    import grpc

    def attempt():
        try:
            with service.client() as client:
                return client.ask(QUESTION, ["cam-a"], max_new_tokens=2, time_range=time_range, timeout_s=15)
        except grpc.RpcError as err:
            errors[err.code().name] += 1
            return None

    return wait_until(attempt, timeout_s, 0.5)


def check_kept(result: FaultResult, before: dict[str, dict], after: dict[str, dict]) -> None:
    for stream_id, clusters in before.items():
        for cluster_id, fields in clusters.items():
            if after.get(stream_id, {}).get(cluster_id) != fields:
                result.lost.append(cluster_id)
    result.before = sum(map(len, before.values()))
    result.after = sum(len(set(clusters) & set(after.get(sid, {}))) for sid, clusters in before.items())


def check_pre_fault_question(service: LocalService, result: FaultResult, before: dict[str, tuple]) -> None:
    if not before:
        result.checks.append("no cluster was sealed before the fault")
        return
    span = (min(v[0] for v in before.values()), max(v[1] for v in before.values()))
    answer = ask_until_answered(service, result.client_errors, time_range=span, timeout_s=30)
    cited = set() if answer is None else {e.cluster_id for e in answer.evidence}
    if not cited:
        result.checks.append(f"a question over the pre-fault range {span} cited nothing")
    elif not cited <= set(before):
        result.checks.append(f"a question over the pre-fault range cited other clusters: {sorted(cited - set(before))}")


def snapshot(service: LocalService, minimum: int, timeout_s: float = 90.0) -> dict[str, dict]:
    """Waits until every camera has ``minimum`` sealed clusters on disk, then reads them all."""
    wait_until(lambda: all(len(service.sealed(s)) >= minimum for s in STREAMS), timeout_s)
    return {s: service.sealed(s) for s in STREAMS}


def fault_worker_kill(service: LocalService, minimum: int) -> FaultResult:
    result = FaultResult("worker_kill", "worker SIGKILL mid-ingest")
    before = snapshot(service, minimum)
    pid = service.worker_pid()
    if pid is None:
        result.checks.append("the worker's pid is not in /metrics")
        return result
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: (p := service.worker_pid()) is not None and p != pid, 120)
    back_at = time.monotonic()
    if ask_until_answered(service, result.client_errors, timeout_s=120) is not None:
        result.recovery_s = time.monotonic() - killed_at
        if time.monotonic() - back_at > 30:
            result.checks.append(f"questions answered {time.monotonic() - back_at:.0f}s after the worker was back")
    check_kept(result, before, {s: service.sealed(s) for s in STREAMS})
    check_pre_fault_question(service, result, before["cam-a"])
    return result


def fault_redis_freeze(service: LocalService, minimum: int, freeze_s: float) -> FaultResult:
    import grpc

    result = FaultResult("redis_freeze", f"Redis SIGSTOP {freeze_s:.0f}s + DeleteStream")
    before = snapshot(service, minimum)
    with service.client() as client:
        ingested_before = client.get_stream("cam-b").stats.frames_ingested
    service.redis.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        try:
            with service.client() as client:
                client.delete_stream(DELETED)
        except grpc.RpcError as err:
            result.client_errors[err.code().name] += 1
            result.checks.append(f"DeleteStream during the outage failed: {err.code().name}")
        answered = ask_until_answered(service, result.client_errors, timeout_s=freeze_s / 2)
        if answered is not None:
            result.recovery_s = time.monotonic() - stopped_at
        time.sleep(max(0.0, freeze_s - (time.monotonic() - stopped_at)))
        with service.client() as client:
            ingested_during = client.get_stream("cam-b").stats.frames_ingested - ingested_before
        if ingested_during < freeze_s * FPS / 4:
            result.checks.append(f"ingest stalled while Redis was frozen ({ingested_during} frames in {freeze_s}s)")
    finally:
        service.redis.send_signal(signal.SIGCONT)
    if wait_until(lambda: service.redis_cluster_ids(DELETED) == set(), 30) is None:
        result.checks.append(f"{DELETED} was still in Redis 30s after the freeze")
    check_kept(result, before, {s: service.sealed(s) for s in STREAMS})
    check_pre_fault_question(service, result, before["cam-a"])
    return result


def fault_redis_wipe(service: LocalService, minimum: int) -> FaultResult:
    result = FaultResult("redis_wipe", "Redis SIGKILL, restarted empty")
    before = snapshot(service, minimum)
    service.redis.kill()
    service.redis.wait(10)
    killed_at = time.monotonic()
    service.start_redis()
    if ask_until_answered(service, result.client_errors, timeout_s=30) is not None:
        result.recovery_s = time.monotonic() - killed_at
    rebuilt = wait_until(
        lambda: all((ids := service.redis_cluster_ids(s)) is not None and set(before[s]) <= ids for s in STREAMS),
        30,
    )
    if rebuilt is None:
        result.checks.append("Redis was not repopulated with every sealed cluster within 30s")
    check_kept(result, before, {s: service.sealed(s) for s in STREAMS})
    check_pre_fault_question(service, result, before["cam-a"])
    return result


def fault_server_restart(service: LocalService, pusher: Pusher, minimum: int) -> FaultResult:
    result = FaultResult("server_restart", "server SIGTERM, restarted")
    before = snapshot(service, minimum)
    pusher.stop()  # nothing pushes while no server runs; the clock goes on with the new pusher
    service.stop_server(signal.SIGTERM)
    stopped_at = time.monotonic()
    service.start_server()
    if ask_until_answered(service, result.client_errors, timeout_s=60) is not None:
        result.recovery_s = time.monotonic() - stopped_at
    with service.client() as client:
        listed = {s.stream_id for s in client.list_streams()}
    if listed != set(STREAMS):
        result.checks.append(f"after the restart ListStreams gave {sorted(listed)}, expected {sorted(STREAMS)}")
    check_kept(result, before, {s: service.sealed(s) for s in STREAMS})
    check_pre_fault_question(service, result, before["cam-a"])
    return result


def run_faults(workdir: Path, *, quick: bool, freeze_s: float = 20.0) -> list[FaultResult]:
    from mosaic_core.model.video import iter_video_frames, sample_clip_path

    frames = [f.rgb for f in iter_video_frames(sample_clip_path("bikes.mp4"), fps=FPS, max_frames=24)]
    minimum = 2 if quick else 6
    service = LocalService(workdir)
    results = []
    try:
        _status("starting redis-server and mosaic serve (tiny preset, one CPU worker)")
        service.start_redis()
        service.start_server()
        with service.client() as client:
            for stream_id in (*STREAMS, DELETED):
                client.create_stream(stream_id, fps=FPS)
        pusher = Pusher(service, frames, (*STREAMS, DELETED)).start()
        for name, run in (
            ("worker SIGKILL", lambda: fault_worker_kill(service, minimum)),
            ("Redis SIGSTOP", lambda: fault_redis_freeze(service, minimum, freeze_s)),
            ("Redis restart", lambda: fault_redis_wipe(service, minimum)),
        ):
            _status(f"fault: {name}")
            pusher.streams = tuple(s for s in pusher.streams if s != DELETED or name == "worker SIGKILL")
            results.append(run())
            results[-1].client_errors.update(pusher.errors)
            pusher.errors.clear()
        _status("fault: server SIGTERM and restart")
        clock_s = pusher.clock_s
        results.append(fault_server_restart(service, pusher, minimum))
        pusher = Pusher(service, frames)
        pusher.clock_s = clock_s + 60.0
        pusher.start()
        if ask_until_answered(service, results[-1].client_errors, timeout_s=30) is None:
            results[-1].checks.append("no answer after the restart")
        pusher.stop()
    finally:
        service.stop()
    return results


def format_table(results: list[FaultResult]) -> str:
    header = ("fault", "sealed before", "after", "lost", "answers again after", "client errors", "checks")
    rows = [
        (
            r.fault,
            str(r.before),
            str(r.after),
            str(len(r.lost)),
            "never" if r.recovery_s is None else f"{r.recovery_s:.1f} s",
            ", ".join(f"{code} {n}" for code, n in sorted(r.client_errors.items())) or "none",
            "ok" if not r.checks else "; ".join(r.checks),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _status(message: str) -> None:
    print(f"[faults] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosaic bench faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sealed clusters before each fault (CPU, CI)")
    parser.add_argument("--freeze-s", type=float, default=20.0, help="how long Redis stays stopped (default 20)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, data) afterwards")
    args = parser.parse_args(argv)
    stop_services_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-faults-"))
    try:
        results = run_faults(workdir, quick=args.quick, freeze_s=args.freeze_s)
    finally:
        if args.keep:
            _status(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(results))
    if args.json:
        payload = [
            {**{k: getattr(r, k) for k in ("key", "fault", "before", "after", "lost", "recovery_s", "checks")},
             "client_errors": dict(r.client_errors)}
            for r in results
        ]  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=2))
        _status(f"results written to {args.json}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
