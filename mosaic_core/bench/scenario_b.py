"""Scenario B of ``mosaic bench engine``: many cameras ingested with cross-stream batching under a device budget
far below their total KV, then questions at random cameras between ingest passes (``scenario_b``), and a
torch.profiler table of its ingest (``profile_ingest``)."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import torch

from mosaic_core.bench.b_pauses import PauseVariant, QuestionAtPause, call_pauses
from mosaic_core.bench.settings import BenchSettings, engine_config, pinned_bytes
from mosaic_core.bench.stats import percentile
from mosaic_core.bench.workload import CLIPS, QUESTIONS, looped_frames
from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import EngineConfig, RetrievalMode
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput, IngestResult
from mosaic_core.terminal import Progress


def profile_ingest(engine: Engine, batches: list[list[FrameInput]], path: Path, cameras: list[str]) -> None:
    """torch.profiler over a few ingest calls (where an ingest pass spends host and device time), then over the
    same calls each followed by a question to one of ``cameras``, as scenario B's second half runs them, with
    ``bench.ingest`` and ``bench.question`` ranges."""
    from torch.profiler import ProfilerActivity, profile, record_function

    # after everything the cameras sent so far
    shifted = [[dataclasses.replace(f, timestamp_s=10_000.0 + k) for f in batch] for k, batch in enumerate(batches)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in shifted:
            engine.ingest(batch)
        torch.cuda.synchronize()
    later = [[dataclasses.replace(f, timestamp_s=f.timestamp_s + len(batches)) for f in batch] for batch in shifted]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as asked:
        for batch, camera in zip(later, cameras, strict=False):
            with record_function("bench.ingest"):
                engine.ingest(batch)
            with record_function("bench.question"):
                engine.answer(camera, QUESTIONS[0], max_new_tokens=2)
        torch.cuda.synchronize()

    def tables(run) -> list[str]:
        averages = run.key_averages()
        return [averages.table(sort_by=key, row_limit=30) for key in ("self_cpu_time_total", "self_cuda_time_total")]

    text = ["# ingest passes", *tables(prof)]
    text += [f"# the same passes, each followed by a question ({len(later)} of each)", *tables(asked)]
    path.write_text("\n\n".join(text))


def scenario_b(
    model,
    s: BenchSettings,
    log,
    profile_to: Path | None = None,
    modes: tuple[RetrievalMode, ...] = (RetrievalMode.TOKEN, RetrievalMode.CLUSTER),
    data_dir: str | None = None,
    durable_writers: int = EngineConfig.durable_writers,
    durable_pending_bytes: int = EngineConfig.durable_pending_bytes,
    keyframes_per_cluster: int = EngineConfig.keyframes_per_cluster,
    pause_variants: tuple[PauseVariant, ...] = (PauseVariant(),),
    name_cameras: bool = False,
    tower_streams: tuple[bool, ...] = (False,),
    clips: tuple[str, ...] = CLIPS,
) -> dict:
    """Many cameras, batched ingest under a small device budget, then questions while ingest continues. With
    ``data_dir`` the cameras' history is written durably under it (a folder per mode), as a service worker does. Each
    mode runs once per pause variant and ``EngineConfig.tower_stream`` setting, on an engine of its own: with pauses,
    the ingest calls pause as the service's do, and questions start at a pause (``mosaic_core.bench.b_pauses``).
    With several variants a row is named by mode and variant, a row with the tower on its own stream ends in
    "tower-stream", and with ``name_cameras`` a row is named by its number of cameras too.

    Each row keeps a digest of what its ingest-only passes stored (clusters opened, and each cluster's
    ``SummaryIndex.checksums``); a tower-stream row whose plain twin ran before it records whether the two agree,
    since both ingest the same frames. The cameras loop the sample ``clips`` in turn."""
    per_camera = [
        looped_frames(s.camera_seconds, stream_id=f"cam{c:03d}", clip=clips[c % len(clips)], start_s=0.0)
        for c in range(s.cameras)
    ]
    results, digests = {}, {}
    for mode, variant, tower_stream in itertools.product(modes, pause_variants, tower_streams):
        row = mode.value if len(pause_variants) == 1 else f"{mode.value} {variant.name}"
        row = f"{row} tower-stream" if tower_stream else row
        row = f"{row} {s.cameras} cameras" if name_cameras else row
        config = _cameras_config(model, s, mode, keyframes_per_cluster=keyframes_per_cluster, tower_stream=tower_stream)
        if data_dir is not None:
            config = dataclasses.replace(
                config,
                data_dir=str(Path(data_dir) / row.replace(" ", "-")),
                durable_writers=durable_writers,
                durable_pending_bytes=durable_pending_bytes,
            )
        row_profile = profile_to if mode is RetrievalMode.CLUSTER and variant == pause_variants[0] else None
        twin = digests.get((mode, variant)) if tower_stream else None
        results[row], digest = _run_row(
            model, config, s, row, variant, per_camera, clips=clips, twin=twin, profile_to=row_profile
        )
        if not tower_stream:
            digests.setdefault((mode, variant), digest)
        log(f"B/{row}: {json.dumps(results[row])}")
        gc.collect()  # the row's engine is gone: the next one takes the device budget afresh
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _run_row(
    model,
    config: EngineConfig,
    s: BenchSettings,
    row: str,
    variant: PauseVariant,
    per_camera: list[list[FrameInput]],
    *,
    clips: tuple[str, ...],
    twin: dict | None,
    profile_to: Path | None,
) -> tuple[dict, dict]:
    """One row of scenario B on an engine of its own, closed before it returns. Returns the row's figures and the
    digest of what its ingest-only passes stored; ``twin`` is the digest of the same row without the tower on its
    own stream, if one ran."""
    engine = Engine(model, config)
    retries_before = _alloc_retries()
    for c in range(s.cameras):
        engine.open_stream(f"cam{c:03d}")
    engine.ingest([frames[0] for frames in per_camera])  # warm-up: the first pass compiles and allocates
    t0, t0_unix = time.perf_counter(), time.time()
    progress = Progress(f"B/{row}: passes", s.camera_seconds - 1)  # a line every 5 s, with an ETA
    calls = _ingest_only(engine, s, per_camera, variant, progress)
    ingest = _ingest_figures(s, calls, time.perf_counter() - t0, [t0_unix, time.time()])
    cluster_ids = [c.cluster_id for n in range(s.cameras) for c in engine.clusters(f"cam{n:03d}")]
    digest = _stored_digest(engine, calls, cluster_ids)

    ttfts, ttfts_device = _ingest_with_questions(engine, s, per_camera, variant, progress)
    if profile_to is not None:
        batches = [[frames[k] for frames in per_camera] for k in range(3)]
        profile_ingest(engine, batches, profile_to, [f"cam{c:03d}" for c in range(3)])
    stats = engine.stats()
    durable = None if engine.history is None else engine.history.store.snapshot_stats()
    total_kv = sum(sum(engine.stream_stats(f"cam{c:03d}").bytes_by_tier.values()) for c in range(s.cameras))
    closing = time.perf_counter()
    engine.close()  # with a data directory: waits until every sealed cluster queued so far is on disk
    close_s = time.perf_counter() - closing
    measured_s = time.perf_counter() - t0
    result = {
        "cameras": s.cameras,
        "clips": list(clips),
        "total_kv_bytes": total_kv,
        "device_budget_bytes": config.device_budget_bytes,
        **ingest,
        **_ttft_figures(ttfts, ttfts_device),
        "hit_ratio": stats.device_hit_ratio,  # measured in every mode
        "device_bytes_used": stats.used_bytes_by_tier["device"],
        "host_bytes_used": stats.used_bytes_by_tier["host"],
        "durable": config.data_dir is not None,
        "keyframes_per_cluster": config.keyframes_per_cluster,
        "pauses": variant.name,  # off: questions asked after the ingest call
        "tower_stream": engine.parts.tower_stream is not None,  # what ran: on the CPU there is none
        "stored_digest": {"clusters_opened": digest["clusters_opened"], "clusters": len(cluster_ids)},
        # with the tower on its own stream: whether the same frames stored the same clusters and keys as without
        "stored_as_tower_off": None if twin is None else _digests_agree(digest, twin),
        "close_s": close_s,
        **_allocator_figures(retries_before),
        # captures block the engine thread: a question that captures waits for them
        "graph_captures": _graph_captures(engine),
    }
    if durable is not None:  # before closing: what held ingest back, and how busy the file writers were
        result["durable_writes"] = _durable_writes(config, durable, engine.history.snapshot_s, measured_s)
    return result, digest


def _allocator_figures(retries_before: int | None) -> dict:
    """The caching allocator's: memory it holds, and retries after failed allocations (each frees its cache,
    waiting for the whole device) since ``retries_before`` was read; None off CUDA."""
    return {
        "cuda_reserved_bytes": torch.cuda.memory_reserved() if torch.cuda.is_available() else None,
        "cuda_alloc_retries": None if retries_before is None else _alloc_retries() - retries_before,
    }


def _durable_writes(config: EngineConfig, durable, snapshot_s: float, measured_s: float) -> dict:
    """What held ingest back and how busy the record writers were, from the store's stats taken before closing;
    ``snapshot_s`` is the engine thread's time making the writers' snapshots."""
    return {
        "writers": config.durable_writers,
        "pending_bytes_bound": config.durable_pending_bytes,
        "submit_wait_s": durable.submit_wait_s,
        "staging_wait_s": durable.staging_wait_s,
        "snapshot_s": snapshot_s,
        "file_write_s": durable.file_write_s,
        "bytes_written": durable.bytes_written,
        "clusters_written": durable.clusters_written,
        "seal_to_durable_s_max": durable.seal_to_durable_s_max,
        "seconds_measured": measured_s,
    }


def _ingest_figures(s: BenchSettings, calls: list[IngestResult], ingest_s: float, unix_span: list[float]) -> dict:
    """The ingest-only passes' pace, and where the host's time in a pass went."""
    passes = s.camera_seconds // 2 - 1
    return {
        "ingest_frames_per_s": s.cameras * passes / ingest_s,
        "ingest_pass_ms": ingest_s / passes * 1e3,
        "real_time": ingest_s / passes <= 1.0,  # a pass of one frame per camera within a second of video
        "ingest_only_unix_s": unix_span,  # wall-clock span of the passes above (bench.sampled_engine)
        "vision_ms_per_pass": statistics.median(c.encode_s for c in calls) * 1e3,
        # the host's time in a pass (medians), by what it was doing: queuing the vision tower and the language
        # model, waiting for the device, placing frames into clusters (mosaic_core.engine.results.IngestResult)
        "host_ms_per_pass": {
            part: statistics.median(getattr(c, f"{part}_s") for c in calls) * 1e3
            for part in ("encode", "issue", "wait", "place")
        },
    }


def _ttft_figures(ttfts: list[float], ttfts_device: list[float | None]) -> dict:
    return {
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
        # on the GPU's clock, from reaching the question to its first token (host stalls inside it included)
        "ttft_device_p50_ms": None if None in ttfts_device else percentile(ttfts_device, 0.5) * 1e3,
        "ttfts_ms": [round(t * 1e3, 1) for t in ttfts],  # in order: which questions were slow
    }


def _cameras_config(
    model, s: BenchSettings, mode: RetrievalMode, *, keyframes_per_cluster: int, tower_stream: bool
) -> EngineConfig:
    """The engine of scenario B's cameras: a frame per camera in a pass, and a small window per camera, which keeps
    32 windows well inside a device budget far below the cameras' KV."""
    config = dataclasses.replace(
        engine_config(s, mode),
        keyframes_per_cluster=keyframes_per_cluster,
        tower_stream=tower_stream,
        max_frames_per_pass=1,
        local_window_tokens=s.camera_window_tokens,
        device_budget_bytes=s.camera_device_budget_bytes,
        # 32 open clusters of 8 frames fit next to 32 windows in the budget, so cameras grow their clusters
        # on the device and spill them once sealed
        formation=FormationConfig(max_tokens=min(s.cluster_tokens, 8 * s.tokens_per_frame)),
    )
    history_bytes = s.cameras * s.camera_seconds * s.tokens_per_frame * model.kv_spec.bytes_per_token
    return dataclasses.replace(config, pinned_host_bytes=pinned_bytes(history_bytes, s))


def _ingest_only(
    engine: Engine, s: BenchSettings, per_camera: list[list[FrameInput]], variant: PauseVariant, progress: Progress
) -> list[IngestResult]:
    """The first half of the cameras' seconds after the warm-up pass: passes of one frame per camera, no questions,
    waited for on the device. Returns each pass's ``IngestResult``."""
    calls = []
    for second in range(1, s.camera_seconds // 2):
        calls.append(engine.ingest([frames[second] for frames in per_camera], pauses=call_pauses(variant)))
        progress.update(second, "ingest only")
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()
    return calls


def _stored_digest(engine: Engine, calls: list[IngestResult], cluster_ids: list[str]) -> dict:
    """What the ingest-only passes stored: clusters opened, and each cluster's key sums (``_digests_agree``)."""
    checksums = engine.parts.tiering.summaries.checksums(cluster_ids)
    return {
        "clusters_opened": sum(c.num_clusters_opened for c in calls),
        "key_sum_checksums": dict(zip(cluster_ids, checksums, strict=True)),
    }


def _graph_captures(engine: Engine) -> dict:
    pools = (engine.parts.prefill_graphs.graph_pool, engine.parts.decode_graphs.graph_pool)
    return {
        pool.what: {"captured": pool.num_captured, "capture_s": pool.capture_s, "failure": pool.failure}
        for pool in pools
    }


def _ingest_with_questions(
    engine: Engine, s: BenchSettings, per_camera: list[list[FrameInput]], variant: PauseVariant, progress: Progress
) -> tuple[list[float], list[float | None]]:
    """The second half of the cameras' seconds: each pass of one frame per camera with a question to a random
    camera, asked at the pass's pause (or after it, without pauses). Returns each question's time to first token,
    on the host's clock and on the device's."""
    rng = random.Random(0)
    ttfts, ttfts_device = [], []
    for second in range(s.camera_seconds // 2, s.camera_seconds):
        camera = f"cam{rng.randrange(s.cameras):03d}"
        asked = QuestionAtPause(engine, camera, rng.choice(QUESTIONS), max_new_tokens=2)
        engine.ingest([frames[second] for frames in per_camera], pauses=call_pauses(variant, asked))
        answer = asked.finish()
        ttfts.append(answer.timings.time_to_first_token_s)
        ttfts_device.append(answer.timings.first_token_device_s)
        progress.update(second, "ingest and questions")
    return ttfts, ttfts_device


def _alloc_retries() -> int | None:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else None


def _digests_agree(digest: dict, twin: dict, rel_tol: float = 1e-4) -> bool:
    """The same clusters opened, under the same ids, and each cluster's key sums equal up to the float rounding of
    the summaries' indexed adds."""
    ours, theirs = digest["key_sum_checksums"], twin["key_sum_checksums"]
    return (
        digest["clusters_opened"] == twin["clusters_opened"]
        and ours.keys() == theirs.keys()
        and all(abs(ours[c] - theirs[c]) <= rel_tol * max(abs(theirs[c]), 1e-12) for c in theirs)
    )
