"""A worker's engine, built from the service settings: device, dtype, budgets, and the question graphs warmed up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mosaic_core.config import budget_workspace_bytes
from mosaic_core.errors import ConfigError
from services.config import ServiceConfig
from services.load_watch import LoadWatch, checkpoint_bytes

log = logging.getLogger(__name__)


def worker_subdir(worker_id: str | int) -> str:
    """The folder of the data directory (and of the disk-tier directory) that worker ``worker_id`` keeps."""
    return f"worker-{worker_id}"


def build_engine(worker_id: str, config: ServiceConfig, on_stage: Callable[[str], None] | None = None):
    """Worker ``worker_id``'s engine: its model loaded, and on CUDA its graphs and kernels warmed up.
    ``on_stage`` hears each stage as it begins (``building its engine: loading the model tiny``, then each
    warm-up step), and the load's memory taken so far as it moves (``LoadWatch``), for the worker's start state."""
    import torch

    from mosaic_core.engine.engine import Engine

    if config.worker_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"this worker was given a GPU (worker_gpus={config.worker_gpus:g}), but its torch {torch.__version__} "
            f"sees none (CUDA build: {'yes, ' + torch.version.cuda if torch.version.cuda else 'no'}): install torch's "
            "CUDA build, or run with --worker-gpus 0 for CPU workers"
        )
    device = "cuda" if config.worker_gpus > 0 else "cpu"
    # Presets default to float32, which on a GPU doubles the weights' memory and leaves the tensor cores idle.
    dtype = torch.bfloat16 if device == "cuda" else None
    engine_config = config.engine_config(worker_subdir=worker_subdir(worker_id))
    tell = on_stage or _unheard
    with LoadWatch(
        f"building its engine: loading the model {config.model}",
        tell,
        checkpoint_bytes=checkpoint_bytes(config.model),
        device_bytes=torch.cuda.memory_allocated if device == "cuda" else None,
    ):
        engine = Engine.from_model(
            config.model,
            engine_config,
            device=device,
            dtype=dtype,
            device_budget_share=config.device_budget_share,
            vision_attention=config.vision_attention,
        )
    if engine.config.device_budget_bytes != engine_config.device_budget_bytes:
        log.info(
            "device budget %.1f GiB: %.0f%% of the GPU memory free once the model was loaded, less %.1f GiB",
            engine.config.device_budget_bytes / 2**30,
            100 * config.device_budget_share,
            budget_workspace_bytes(tower_stream=engine.config.tower_stream) / 2**30,
        )
    if device == "cuda":  # capture the question graphs now, not while the first users wait (CPU runs no graphs)
        started = time.monotonic()
        warm = engine.warm_up(
            max_new_tokens=config.default_max_new_tokens,
            on_step=lambda step: tell(f"building its engine: warming up, {step}"),
        )
        log.info(
            "worker %s: warmed up in %.1f s (%s Triton kernel variants compiled) with %d questions %s, answers "
            "decoded together in batches of up to %d, and %s",
            worker_id,
            time.monotonic() - started,
            engine.stats().kernel_compiles,
            warm.questions,
            "over a scratch history" if warm.with_history else "with no history to retrieve",
            max(warm.decode_batches, default=1),
            "an ingest pass" if warm.ingested else "no ingest pass (the device budget cannot hold its scratch windows)",
        )
    return engine


def _unheard(stage: str) -> None:
    """``build_engine``'s stages where no one asked to hear them."""
