"""A worker built in-process starts on a thread of its own: ``wait_started`` raises what its start raised, and its
calls about streams then say, as FAILED_PRECONDITION, that it is not serving and why."""

from __future__ import annotations

import grpc
import pytest

from mosaic_core.errors import ConfigError
from services.config import load_config
from services.errors import WorkerStartError, status_for
from services.metadata.memory import InMemoryMetadataStore
from services.worker import WorkerCore


def test_a_worker_whose_start_failed_raises_it_to_its_waiter_and_refuses_calls_with_its_sentence(tmp_path):
    model = str(tmp_path / "no-model")
    worker = WorkerCore("0", load_config(None, model=model), store=InMemoryMetadataStore())
    with pytest.raises(ConfigError, match="not a directory with a Qwen2"):
        worker.wait_started(60)
    state = worker.start_state()
    loading = f"building its engine: loading the model {model}"  # the stage its engine's build last told
    assert (state.ready, state.stage) == (False, loading) and "ConfigError" in state.error
    with pytest.raises(WorkerStartError) as refused:
        worker.stream_info("cam")
    status = status_for(refused.value)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.message.startswith(f"worker 0 is not serving: its start failed while {loading}: ")
    assert worker.shutdown() is None  # nothing was served that a checkpoint would keep
