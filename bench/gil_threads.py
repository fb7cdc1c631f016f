"""Which threads of a service worker hold its GIL, and for how long: py-spy's GIL samples, by thread kind.

    python -m bench.gil_threads --cameras 40 [--pulled-share 0.5] [--decode-in-threads] --out PREFIX

Starts ``mosaic bench service``'s quick service (tiny preset, CPU), adds the cameras (pulled sources and JPEG
pushes, no questions), and while the step is measured runs ``py-spy record --gil`` on the worker process for
``--seconds``, from the end of the warm-up. py-spy samples only the thread holding the GIL, so samples over rate x
seconds is the share of time the GIL was held, and each thread kind's samples say who held it. Writes PREFIX.json
(the table, and the worker's GIL probe). On a GPU host the engine thread needs the GIL far more than on a CPU,
where its tensor work releases it; what the other threads hold is the same Python work on either.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from services import bench_service
from services.bench_service_report import without_local_paths

RATE_HZ = 200
THREAD_KIND = re.compile(r"[\d_-]+$")  # "source-pull-009" and "durable-file_2" are kinds with numbers


def thread_kinds(raw: str) -> dict[str, int]:
    """py-spy raw stacks (``thread (tid): name;frame;... count`` lines) summed by thread name less its number."""
    kinds: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        name = stack.split(";", 1)[0].split(": ", 1)[-1]
        kinds[THREAD_KIND.sub("", name) or name] += int(count)
    return dict(kinds.most_common())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gil_threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=40)
    parser.add_argument("--pulled-share", type=float, default=0.5)
    parser.add_argument("--decode-in-threads", action="store_true", help="decode_sources_in_processes false")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        parser.error("py-spy is not on PATH (it comes with Ray's default extras: pip install py-spy)")

    decoding = ["--decode-sources-in-threads"] if args.decode_in_threads else []
    bench_args = bench_service.main_args(
        ["--quick", "--pulled-share", str(args.pulled_share), "--gil-probe", *decoding]
    )
    bench_args.cameras, bench_args.questions_per_s, bench_args.warmup_s = [args.cameras], 0.0, 20.0
    bench_args.measure_s = args.seconds + 5.0
    workdir = Path(tempfile.mkdtemp(prefix="mosaic-gil-threads-"))
    raw_path = workdir / "py-spy.raw.txt"
    measure = bench_service.measure_step

    def measured_under_py_spy(service, load, cameras, run_args, cost):
        """The step's measurement, with py-spy sampling the worker from the end of its warm-up on."""

        def record() -> None:
            time.sleep(run_args.warmup_s)
            command = [py_spy, "record", "--pid", str(service.worker_pid()), "--gil", "--threads", "--nonblocking",
                       "--format", "raw", "--rate", str(RATE_HZ), "--duration", str(args.seconds),
                       "--output", str(raw_path)]  # fmt: skip
            subprocess.run(command, stdout=subprocess.DEVNULL, timeout=args.seconds + 60, check=True)

        spy = threading.Thread(target=record, name="py-spy")
        spy.start()
        try:
            return measure(service, load, cameras, run_args, cost)
        finally:
            spy.join(args.seconds + 90)

    bench_service.measure_step = measured_under_py_spy
    try:
        report = bench_service.run_ramp(workdir, bench_args)
        kinds = thread_kinds(raw_path.read_text())
    finally:
        bench_service.measure_step = measure
        shutil.rmtree(workdir, ignore_errors=True)
    possible = RATE_HZ * args.seconds
    step = report["steps"][0]
    result = {
        "args": vars(args),
        "samples_possible": possible,
        "gil_held_ms_per_s_by_thread": {kind: 1e3 * n / possible for kind, n in kinds.items()},
        "engine_thread_share": step["engine_thread_share"],
        "ingested_fps": step["ingested_fps"],
        "worker_gil_probe": step["worker_gil"],
    }
    Path(f"{args.out}.json").write_text(without_local_paths(json.dumps(result, indent=1)))
    for kind, held in result["gil_held_ms_per_s_by_thread"].items():
        print(f"{kind:>24}  {held:6.1f} ms/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
