"""A benchmark stopped with SIGTERM (``timeout``, a job runner) stops the services it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import tempfile, time
from pathlib import Path
from services.local_service import LocalService, stop_services_on_sigterm
stop_services_on_sigterm()
service = LocalService(Path(tempfile.mkdtemp()))
try:
    service.start_redis()
    print(service.redis.pid, flush=True)
    time.sleep(60)
finally:
    service.stop()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_redis_server_a_bench_started():
    bench = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    redis_pid = None
    try:
        redis_pid = int(bench.stdout.readline())  # the script prints it once redis answers (within 20 s)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(redis_pid), "redis-server outlived the bench that started it"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
        if redis_pid is not None and _alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
