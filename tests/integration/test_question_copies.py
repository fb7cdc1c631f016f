"""A question attends to the arena's pages in place: it copies no KV out of the page pools beyond its gather.

Counted with ``mosaic_core.bench.launches`` (a dispatch mode over every torch op), under a device budget too small
for the history, so questions stage pages from the host pool (a move between pools, which is not counted).
"""

from __future__ import annotations

from mosaic_core.bench.launches import measure_mode


def _counts(model, frames, mode: str) -> dict:
    return measure_mode(
        model, frames, mode, dispatch=True, questions=2, decode_tokens=3, warm_frames=4, budget_tokens=96,
        device_budget_mib=0.75,
    )  # fmt: skip


def test_cluster_questions_copy_no_kv_out_of_the_pools(tiny_model, bikes_frames):
    cluster = _counts(tiny_model, bikes_frames, "cluster")
    assert cluster["host_to_device_bytes"] > 0  # some of what the questions read came from the host pool
    assert cluster["question_prefill"]["pool_copied_bytes"] == 0
    assert cluster["decode_step"]["pool_copied_bytes"] == 0
    assert cluster["question_prefill"]["copied_bytes"] > 0  # its own tensors are counted
    # The count sees a copy out of the pool: ingest reads a leaving frame's KV for its cluster's key summary.
    assert cluster["ingest_pass"]["pool_copied_bytes"] > 0
