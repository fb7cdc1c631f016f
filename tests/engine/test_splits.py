"""Splits by uneven attention: a cluster whose frames questions attend to unevenly is cut where the two parts'
attention densities differ most. The cut rule is checked on its own; the engine end to end on bikes.mp4 with a
planted probe on part of one cluster: the cluster splits there (only when configured), the halves hold exactly the
cluster's KV and summaries, the probe's frames are found whole afterwards, and a new engine on the same data
directory restores the halves."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from mosaic_core.bookkeeping import FormationConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.probes import ENGINE, ProbeRequest, probing
from mosaic_core.engine.splits import best_cut
from mosaic_core.errors import ConfigError
from tests.engine.engine_helpers import SMALL, feed

SPLITTING = dataclasses.replace(
    SMALL,
    retrieval_budget_tokens=192,
    device_budget_bytes=32 * 2**20,
    formation=FormationConfig(max_tokens=144, split_min_questions=1, split_min_density_ratio=2.0),
)


def _crc(kv: torch.Tensor) -> int:
    return zlib.crc32(kv.contiguous().cpu().view(torch.uint8).numpy().data)


def test_the_cut_maximises_the_density_ratio() -> None:
    assert best_cut(np.array([0.05, 0.05, 0.45, 0.45]), [18, 18, 18, 18]) == (2, pytest.approx(9.0))
    assert best_cut(np.array([0.7, 0.1, 0.1, 0.1]), [18, 18, 18, 18])[0] == 1
    assert best_cut(np.array([0.25, 0.25, 0.25, 0.25]), [18, 18, 18, 18])[1] == pytest.approx(1.0)
    # Density is mass per token: a big frame holding half the mass is not denser than three small ones.
    assert best_cut(np.array([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]), [54, 18, 18, 18])[1] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [{"split_min_questions": 0}, {"split_min_density_ratio": 1.0}])
def test_bad_split_settings_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="split_min"):
        FormationConfig(**bad)


def _stored_cluster(engine: Engine, min_frames: int):
    state = engine.stream("cam")
    in_window = state.local_cluster_ids()
    return next(r for r in state.former.records() if r.num_frames >= min_frames and r.cluster_id not in in_window)


def test_a_probe_on_part_of_a_cluster_splits_it_there_and_the_halves_restore(tiny_model, bikes_frames, tmp_path):
    engine = Engine(tiny_model, dataclasses.replace(SPLITTING, data_dir=str(tmp_path)))
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames)
    target = _stored_cluster(engine, min_frames=4)
    kv = engine.tiering.tiers.read(target.cluster_id).clone()
    before = engine.tiering.tiers.pages(target.cluster_id)
    pages = before.device or before.host
    planted = (target.frame_indices[-2], target.frame_indices[-1])
    with probing(ProbeRequest(span=planted)):
        engine.answer("cam", "Planted probe.", max_new_tokens=1)
    records = engine.stream("cam").former.records()
    assert target.cluster_id not in {r.cluster_id for r in records}, "the planted cluster was not split"
    halves = [r for r in records if set(r.frame_indices) <= set(target.frame_indices)]
    assert [f for r in halves for f in r.frame_indices] == target.frame_indices
    assert any(set(planted) <= set(r.frame_indices) and r.num_frames < target.num_frames for r in halves)
    parts = [engine.tiering.tiers.read(r.cluster_id) for r in halves]
    assert torch.equal(torch.cat(parts, dim=3), kv), "the halves must hold exactly the cluster's KV, in order"
    after = [engine.tiering.tiers.pages(r.cluster_id) for r in halves]
    assert [p for record in after for p in (record.device or record.host)] == pages, "the halves take its pages"
    summaries = engine.tiering.summaries
    for record, part in zip(halves, parts, strict=True):
        assert summaries.count(record.cluster_id) == record.num_tokens == part.shape[3]
        key_sum = summaries.stats_copy(record.cluster_id)[0][0].cpu()
        torch.testing.assert_close(key_sum, part[:, 0].float().sum(dim=2).cpu())

    request = ProbeRequest(span=planted, sweep_scorers=("random",))
    with probing(request):
        engine.answer("cam", "Planted probe.", max_new_tokens=1)
    assert request.span_found[ENGINE] == 1.0, request.span_found

    # The second question may cut a half again, or merge the halves it retrieved together: what restores is what
    # holds the cluster's frames now.
    pieces = [r for r in engine.stream("cam").former.records() if set(r.frame_indices) <= set(target.frame_indices)]
    assert [f for r in pieces for f in r.frame_indices] == target.frame_indices
    crcs = {r.cluster_id: _crc(engine.tiering.tiers.read(r.cluster_id)) for r in pieces}
    assert engine.history.store.flush(30)
    engine.close()
    again = Engine(tiny_model, dataclasses.replace(SPLITTING, data_dir=str(tmp_path)))
    again.restore_streams()
    restored = {r.cluster_id: r for r in again.stream("cam").former.records()}
    assert target.cluster_id not in restored
    for record in pieces:
        assert restored[record.cluster_id].frame_indices == record.frame_indices
        assert _crc(again.tiering.tiers.read(record.cluster_id)) == crcs[record.cluster_id]
    again.close()


def test_without_the_setting_nothing_splits(tiny_model, bikes_frames):
    engine = Engine(tiny_model, dataclasses.replace(SPLITTING, formation=FormationConfig(max_tokens=144)))
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames)
    before = [r.cluster_id for r in engine.stream("cam").former.records()]
    target = _stored_cluster(engine, min_frames=4)
    with probing(ProbeRequest(span=(target.frame_indices[-2], target.frame_indices[-1]))):
        engine.answer("cam", "Planted probe.", max_new_tokens=1)
    assert [r.cluster_id for r in engine.stream("cam").former.records()] == before
