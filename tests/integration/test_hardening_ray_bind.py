"""A ``--host 127.0.0.1`` service starts a Ray cluster whose every process listens on loopback only, with no
dashboard and with Ray's token authentication on. Real Ray in a child process; sockets read with ``ss``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, subprocess, sys, time
import ray
from services.config import load_config
from services.ray_setup import init_ray

init_ray(load_config(None, host=sys.argv[1]), num_cpus=1, configure_logging=False)

@ray.remote(num_cpus=0.5)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
ray.get(probe.pid.remote(), timeout=120)
time.sleep(2)  # the dashboard agent and runtime-env agent open their ports a little after start-up
from ray._raylet import AuthenticationMode, get_authentication_mode

ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
children = {}
for line in ps.splitlines():
    pid, ppid = map(int, line.split())
    children.setdefault(ppid, []).append(pid)
mine, todo = set(), [os.getpid()]
while todo:
    pid = todo.pop()
    mine.add(pid)
    todo += children.get(pid, [])
sockets = []
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
    fields = line.split()
    pids = {int(x.split("=")[1].rstrip(")")) for x in fields[-1].replace(")", ",").split(",") if x.startswith("pid=")}
    if pids & mine:
        sockets.append([fields[3], fields[-1].split('"')[1]])
print(json.dumps({"sockets": sockets, "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN}))
ray.shutdown()
"""


def _ray_sockets(host: str) -> dict:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    env = {"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, host], capture_output=True, text=True, timeout=240, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_loopback_service_keeps_every_ray_port_on_loopback_with_token_auth():
    result = _ray_sockets("127.0.0.1")
    names = {name for _, name in result["sockets"]}
    assert {"gcs_server", "raylet"} <= names, result
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    outside = [(a, n) for a, n in result["sockets"] if a.rsplit(":", 1)[0].strip("[]") not in loopback]
    assert not outside, f"Ray ports open beyond loopback: {outside}"
    assert not any(addr.endswith(":8265") for addr, _ in result["sockets"]), "the dashboard must be off"
    assert result["token_auth"], "Ray's token authentication must stay on"
