"""On a GPU: durable history through the CUDA paths (async device->host snapshots, the pinned host pool).

Ingests frames into an engine on cuda with a small device budget (clusters spill to pinned host memory),
checkpoints, re-adopts the data directory in a new engine, and compares every sealed cluster's KV bytes. Prints
one line per check and exits 1 on a mismatch. Frames are bikes.mp4's, looped at 1 fps.

    source scripts/gpu_setup.sh && python scripts/gpu_durability_check.py
"""

from __future__ import annotations

import sys
import tempfile
import time
import zlib

import torch

from mosaic_core.bench.workload import looped_frames
from mosaic_core.bookkeeping.formation_config import FormationConfig
from mosaic_core.config import MIB, EngineConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput


def crc(kv: torch.Tensor) -> int:
    return zlib.crc32(kv.detach().cpu().contiguous().view(torch.uint8).numpy().data)


def main() -> int:
    frames = [f.rgb for f in looped_frames(60, stream_id="cam", clip="bikes.mp4")]  # a minute at 1 fps
    config = EngineConfig(
        target_tokens_per_frame=64, local_window_tokens=256, retrieval_budget_tokens=512,
        device_budget_bytes=3 * MIB, host_budget_bytes=256 * MIB, pinned_host_bytes=64 * MIB,
        formation=FormationConfig(max_tokens=256), data_dir=tempfile.mkdtemp(prefix="mosaic-gpu-durable-"),
    )  # fmt: skip
    engine = Engine.from_model("tiny", config, device="cuda")
    engine.open_stream("cam", fps=1.0)
    start = time.perf_counter()
    for i in range(0, len(frames), 8):
        engine.ingest([FrameInput("cam", float(t), frames[t]) for t in range(i, min(i + 8, len(frames)))])
    answer = engine.answer("cam", "what moved?", max_new_tokens=4)
    engine.checkpoint()
    tiers = {c.cluster_id: c.tier for c in engine.clusters("cam")}
    before = {cid: crc(engine.tiering.tiers.read(cid)) for cid in tiers}
    print(f"ingested {len(frames)} frames on cuda in {time.perf_counter() - start:.1f}s; clusters by tier "
          f"{ {t: list(tiers.values()).count(t) for t in set(tiers.values())} }; answer cited "
          f"{len(answer.evidence)} spans")  # fmt: skip
    stats = engine.history.store.snapshot_stats()
    print(f"durable: {stats.clusters_written} written, mean seal->fsync "
          f"{1e3 * stats.seal_to_durable_s_sum / max(1, stats.clusters_written):.1f} ms, "
          f"max {1e3 * stats.seal_to_durable_s_max:.1f} ms, errors {stats.write_errors}")  # fmt: skip
    engine.close()
    again = Engine.from_model("tiny", config, device="cuda")
    restored = again.restore_streams()
    after = {cid: crc(again.tiering.tiers.read(cid)) for cid in (c.cluster_id for c in again.clusters("cam"))}
    same = before == after
    print(f"restored {restored[0].num_clusters} clusters; KV identical to before: {same}")
    answer = again.answer("cam", "what moved first?", max_new_tokens=4, time_range=(0.0, 10.0))
    print(f"after the restart a question over 0-10 s cited {[e.cluster_id for e in answer.evidence]}")
    again.close()
    return 0 if same and before else 1


if __name__ == "__main__":
    sys.exit(main())
