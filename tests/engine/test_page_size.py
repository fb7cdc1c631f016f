"""The arena's page at the default size holds any frame the model makes whole: a frame a token over the target (the
bikes clip at 16 tokens: 18) took a second page, nearly empty, so half of every tier's KV bytes held nothing."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import SMALL, feed, make_engine

from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.errors import ConfigError
from mosaic_core.model.geometry import choose_geometry, largest_frame_tokens


def test_a_cluster_at_the_default_page_size_takes_one_page_a_frame_with_nothing_wasted(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)  # the default page
    engine.open_stream("cam")
    feed(engine, "cam", bikes_frames[:16])
    frame_tokens = engine.stream("cam").geometry.tokens_per_frame
    assert frame_tokens > SMALL.target_tokens_per_frame  # the case this is about
    clusters = engine.clusters("cam")
    assert clusters
    for cluster in clusters:  # whole frames, each in a page of its own that it fills
        assert cluster.num_tokens % frame_tokens == 0
        assert cluster.num_bytes == cluster.num_tokens * tiny_model.kv_spec.bytes_per_token, cluster


@pytest.mark.parametrize("target", [1, 7, 16, 64, 100, 128, 256])
def test_the_largest_frame_is_the_largest_any_aspect_ratio_gets(target):
    """Against frames of every aspect ratio from 1:50 to 50:1 in steps of 0.2%: none is larger, and one is as large
    (the bound is the truth, not only a bound)."""
    steps = range(-1956, 1957)  # 1.002 ** 1956 is about 50
    sizes = [(1000, max(1, round(1000 * 1.002**i))) for i in steps]
    largest = max(choose_geometry(h, w, target_tokens=target).tokens_per_frame for h, w in sizes)
    assert largest_frame_tokens(target) == largest


def test_the_largest_frame_of_a_target_that_is_no_count_is_refused():
    with pytest.raises(ConfigError, match="positive integer"):
        largest_frame_tokens(0)


def test_a_durable_cluster_of_frames_shorter_than_the_page_is_read_from_its_file_once(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """The default page holds the largest frame, so most frames are shorter than it, and a record's pages (one per
    frame) are not the arena's: such a fetch read and checked the record file twice, once for its pages and again
    for its KV."""
    from mosaic_core.durable import store as durable_store

    frames = [(t, rgb[:, :363].copy()) for t, rgb in bikes_frames[:24]]  # 4:3: 16 tokens at 16, where pages hold 18
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=2.0)
    feed(first, "cam", frames)
    assert first.stream("cam").geometry.tokens_per_frame < first.tiering.tiers.page_tokens
    first.close()
    second = make_engine(tiny_model, data_dir=str(tmp_path))
    second.restore_streams()
    read_files: list[str] = []

    def counted(decode):
        def read(*args, **kwargs):
            read_files.append(kwargs["name"])
            return decode(*args, **kwargs)

        return read

    for name in ("decode_cluster", "decode_pages"):
        monkeypatch.setattr(durable_store, name, counted(getattr(durable_store, name)))
    cluster_id = second.clusters("cam")[0].cluster_id
    kv_from_file = second.tiering.tiers.read(cluster_id)
    read_files.clear()
    plan = second.tiering.residency.plan_fetch(cluster_id, Tier.DEVICE, exclude=frozenset())
    assert plan is not None
    second.tiering.execute(plan)
    assert len(read_files) == 1, read_files
    assert torch.equal(second.tiering.tiers.read(cluster_id).cpu(), kv_from_file)
    second.close()
