"""The arena's page at the default size holds any frame the model makes whole: a frame a token over the target (the
bikes clip at 16 tokens: 18) took a second page, nearly empty, so half of every tier's KV bytes held nothing."""

from __future__ import annotations

import dataclasses

import pytest
from engine_helpers import SMALL, feed

from mosaic_core.engine.engine import Engine
from mosaic_core.errors import ConfigError
from mosaic_core.model.pixels import choose_geometry, largest_frame_tokens


def test_a_cluster_at_the_default_page_size_takes_one_page_a_frame_with_nothing_wasted(tiny_model, bikes_frames):
    engine = Engine(tiny_model, dataclasses.replace(SMALL, page_tokens=None))
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
