"""The service's processes as ``mosaic bench service`` measures them: CPU seconds of a process with every process
under it (from /proc: psutil is not among the service's dependencies), and the GPU memory they hold (nvidia-smi)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DECODE_CHILD = "services.decode_child"  # the module a pulled source's decoding process runs (services.source_decoding)


@dataclass(slots=True, frozen=True)
class TreeCpu:
    """CPU seconds (user + system) of a process tree at one moment."""

    total_s: float  # every process of the tree, with the children each has already waited for
    decode_s: float  # of those, the processes decoding pulled sources (DECODE_CHILD)
    pids: tuple[int, ...]  # the tree's processes, the root first


def _stat(pid: int) -> tuple[int, float] | None:
    """A process's parent and its CPU seconds with those of the children it has waited for (utime, stime, cutime,
    cstime), or None where it is gone or unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = sum(int(f) for f in fields[11:15])
    return int(fields[1]), ticks / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def tree_cpu(pid: int | None) -> TreeCpu | None:
    """CPU seconds of ``pid`` and every process under it, from /proc; None where ``pid`` cannot be read.

    A child's seconds move into its parent's waited-for children's seconds as it is reaped, so the total stays
    whole when a child exits; what a decoding process spent before it exited then counts in ``total_s`` only."""
    if pid is None or (root := _stat(pid)) is None:
        return None
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {pid: root[1]}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            stats[int(entry.name)] = stat[1]
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    total = sum(stats.get(p, 0.0) for p in tree)
    decode = sum(stats.get(p, 0.0) for p in tree[1:] if DECODE_CHILD in _cmdline(p))
    return TreeCpu(total, decode, tuple(tree))


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of one process alone, from /proc (None where it cannot be read)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def compute_apps_mib(csv_text: str, pids: set[int]) -> float | None:
    """GPU memory (MiB) that the processes ``pids`` hold, from ``nvidia-smi --query-compute-apps=pid,used_memory
    --format=csv,noheader,nounits``; None where none of them holds any (as seen from another pid namespace)."""
    held = [
        float(used)
        for line in csv_text.splitlines()
        if "," in line
        for pid, used in [line.split(",", 1)]
        if pid.strip().isdigit() and int(pid) in pids and used.strip().replace(".", "", 1).isdigit()
    ]
    return sum(held) if held else None


def worker_gpu_memory_mib(pids: tuple[int, ...]) -> tuple[float | None, str | None]:
    """The GPU memory the worker's processes hold, and where the figure comes from: ``worker processes`` (per-process
    accounting), else ``the only GPU`` (memory.used of the single GPU, when only one is visible), else (None, None)
    rather than a sum over GPUs the worker does not use."""
    if shutil.which("nvidia-smi") is None:
        return None, None
    try:
        apps = _smi("--query-compute-apps=pid,used_memory")
        if (mib := compute_apps_mib(apps, set(pids))) is not None:
            return mib, "worker processes"
        gpus = _smi("--query-gpu=memory.used").split()
        if len(gpus) == 1:
            return float(gpus[0]), "the only GPU"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return None, None


def gpu_memory_used_mib() -> float | None:
    """memory.used summed over every visible GPU (for the start-up line only: a step reports the worker's)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return sum(float(line) for line in _smi("--query-gpu=memory.used").split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _smi(query: str) -> str:
    return subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
