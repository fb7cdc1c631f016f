"""A GPU worker runs its model in bfloat16: a preset's float32 default would double the weights on the device
and leave the tensor cores idle. With ``device_budget_share`` it sizes its device budget from the GPU memory the
model left free. As it builds its engine it tells its start each stage: the model's load, then each warm-up step."""

from __future__ import annotations

import itertools

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_worker_builds_its_engine_in_bfloat16(tmp_path):
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    engine = build_engine("0", ServiceConfig(model="tiny", worker_gpus=1.0, data_dir=str(tmp_path)))
    assert engine.model.device.type == "cuda"
    assert engine.model.kv_spec.dtype == torch.bfloat16
    assert {p.dtype for p in engine.model.model.parameters()} == {torch.bfloat16}


def test_a_cpu_worker_keeps_the_preset_default(tmp_path):
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    engine = build_engine("0", ServiceConfig(model="tiny", worker_gpus=0.0, data_dir=str(tmp_path)))
    assert engine.model.kv_spec.dtype == torch.float32


def test_a_worker_building_its_engine_tells_its_start_it_loads_the_model(tmp_path):
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    stages: list[str] = []
    build_engine("0", ServiceConfig(model="tiny", worker_gpus=0.0, data_dir=str(tmp_path)), on_stage=stages.append)
    assert stages == ["building its engine: loading the model tiny"]  # a CPU worker warms nothing up


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_worker_tells_its_start_each_warm_up_step(tmp_path):
    """Each warm-up step is a new stage, so the router's wait sees the start move while the graphs are captured."""
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    stages: list[str] = []
    config = ServiceConfig(model="tiny", worker_gpus=1.0, data_dir=str(tmp_path))
    build_engine("0", config, on_stage=stages.append)
    assert stages[0] == "building its engine: loading the model tiny"
    loading = list(itertools.takewhile(lambda stage: stage.startswith(stages[0]), stages))  # and the memory it took
    warming = stages[len(loading) :]
    assert warming and all(stage.startswith("building its engine: warming up, ") for stage in warming), stages
    assert "building its engine: warming up, question 1 of 4 (prefill graphs)" in warming, stages
    assert all(stage != after for stage, after in itertools.pairwise(stages)), stages  # each one a change of state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_worker_sizes_its_device_budget_from_the_memory_the_model_left_free(tmp_path):
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    floor = 64 * 2**20
    config = ServiceConfig(
        model="tiny", worker_gpus=1.0, data_dir=str(tmp_path), device_budget_bytes=floor, device_budget_share=0.5
    )
    free, _ = torch.cuda.mem_get_info()
    engine = build_engine("0", config)
    assert floor < engine.config.device_budget_bytes <= 0.5 * free
    assert engine.stats().capacity_bytes_by_tier["device"] == engine.config.device_budget_bytes


def test_a_cpu_worker_keeps_the_configured_device_budget_whatever_the_share(tmp_path):
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    config = ServiceConfig(
        model="tiny", worker_gpus=0.0, data_dir=str(tmp_path), device_budget_bytes=64 * 2**20, device_budget_share=0.5
    )
    assert build_engine("0", config).config.device_budget_bytes == 64 * 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch that sees no GPU")
def test_a_worker_given_a_gpu_its_torch_cannot_see_refuses_to_start_on_the_cpu(tmp_path):
    """A CPU build of torch on a GPU host: the worker used to build its engine on the CPU without a word."""
    from mosaic_core.errors import ConfigError
    from services.config import ServiceConfig
    from services.worker_engine import build_engine

    with pytest.raises(ConfigError, match=r"worker_gpus=1.*sees none.*--worker-gpus 0"):
        build_engine("0", ServiceConfig(model="tiny", worker_gpus=1.0, data_dir=str(tmp_path)))
