"""The start-up check refuses a data directory that holds camera history no configured worker would serve."""

from __future__ import annotations

from services.config import load_config
from services.preflight import preflight_problems


def _history(data_dir, worker: str, stream: str = "cam") -> None:
    (data_dir / worker / stream).mkdir(parents=True)
    (data_dir / worker / stream / "manifest.jsonl").write_text("{}\n")


def _problems(data_dir, workers: int) -> list[str]:
    config = load_config(None, data_dir=str(data_dir), workers=workers, grpc_port=0, metrics_port=0, console=False)
    return [p for p in preflight_problems(config) if "camera history" in p]


def test_history_of_a_worker_past_the_count_is_refused_with_the_fix(tmp_path):
    _history(tmp_path, "worker-0")
    _history(tmp_path, "worker-2")
    (problem,) = _problems(tmp_path, workers=2)
    assert "worker-2" in problem and "--workers 3" in problem and "worker-0" not in problem


def test_folders_without_streams_and_workers_in_the_count_pass(tmp_path):
    _history(tmp_path, "worker-0")
    _history(tmp_path, "worker-1")
    (tmp_path / "worker-3" / ".spill").mkdir(parents=True)  # nothing of a stream
    assert _problems(tmp_path, workers=2) == []
