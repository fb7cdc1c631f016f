"""A model load's progress: the start state moves as the load takes memory, and stays put when the load is stuck."""

import itertools
import threading
import time

from services.load_watch import LoadWatch, checkpoint_bytes, rss_bytes

GIB = 2**30
INTERVAL_S = 0.01


class GrowingMemory:
    """Memory that grows by ``step`` bytes at each read, as a moving load's does."""

    def __init__(self, start: int, step: int) -> None:
        self._reads = itertools.count()
        self.start, self.step = start, step
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self.start + next(self._reads) * self.step


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(INTERVAL_S)
    return predicate()


def test_a_moving_load_changes_the_stage_as_memory_lands_on_host_and_gpu():
    stages: list[str] = []
    watch = LoadWatch(
        "loading the model m",
        stages.append,
        checkpoint_bytes=15 * GIB,
        host_bytes=GrowingMemory(2 * GIB, GIB // 4),
        device_bytes=GrowingMemory(0, GIB // 2),
        interval_s=INTERVAL_S,
    )
    with watch:
        assert wait_for(lambda: len(stages) >= 4)
    assert stages[0] == "loading the model m"
    for stage in stages[1:]:
        assert stage.startswith("loading the model m (15.0 GiB of weight files; so far "), stage
        assert " of host memory, " in stage and stage.endswith(" on the GPU)"), stage
    assert all(stage != after for stage, after in itertools.pairwise(stages)), stages
    first_move = "loading the model m (15.0 GiB of weight files; so far 0.5 GiB of host memory, 1.0 GiB on the GPU)"
    assert stages[1] == first_move


def test_a_stuck_load_tells_only_its_stage_so_the_routers_timeout_still_ends_it():
    stages: list[str] = []
    with LoadWatch("loading the model m", stages.append, host_bytes=lambda: 3 * GIB, interval_s=INTERVAL_S):
        time.sleep(20 * INTERVAL_S)
    assert stages == ["loading the model m"]


def test_no_sentence_comes_after_the_load_has_ended():
    stages: list[str] = []
    with LoadWatch("loading", stages.append, host_bytes=GrowingMemory(0, GIB), interval_s=INTERVAL_S):
        assert wait_for(lambda: len(stages) >= 2)
    told = len(stages)
    stages.append("warming up")  # the start's next stage
    time.sleep(10 * INTERVAL_S)
    assert stages[told:] == ["warming up"]


def test_memory_given_back_during_the_load_reads_as_none_taken():
    host = iter([5 * GIB, 5 * GIB, 4 * GIB])
    with LoadWatch("loading", lambda _: None, host_bytes=host.__next__, interval_s=60.0) as watch:
        assert watch.text() == "loading (so far 0.0 GiB of host memory)"


def test_checkpoint_bytes_counts_the_weight_files_only(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"w" * 300)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"w" * 200)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert checkpoint_bytes(str(tmp_path)) == 500
    assert checkpoint_bytes("qwen2.5-vl-7b") is None


def test_rss_bytes_reads_this_process_resident_memory():
    assert rss_bytes() > 2**20  # any Python holds more than a MiB
