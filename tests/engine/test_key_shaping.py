"""Key statistics in formation: with ``FormationConfig.key_weight`` a frame's mean key at the choosing layer shares
the decision with its picture. Vision only (0) is the default and forms the same clusters as before; keys only (1)
forms clusters from keys, which differ on a real clip."""

from __future__ import annotations

import dataclasses

import pytest

from mosaic_core.bookkeeping import FormationConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.errors import ConfigError
from tests.engine.engine_helpers import SMALL, feed


def _clusters(tiny_model, frames, formation: FormationConfig) -> list[list[int]]:
    engine = Engine(tiny_model, dataclasses.replace(SMALL, formation=formation))
    engine.open_stream("cam")
    feed(engine, "cam", frames)
    return [r.frame_indices for r in engine.stream("cam").former.records()]


def test_keys_change_where_clusters_start_and_vision_only_is_the_default(tiny_model, bikes_frames):
    vision = _clusters(tiny_model, bikes_frames, FormationConfig(max_tokens=48))
    assert _clusters(tiny_model, bikes_frames, FormationConfig(max_tokens=48, key_weight=0.0)) == vision
    # At 0.9 the two differ in most of the clip's second half; at 0.99 only at a frame or two, which a GPU's
    # rounding can erase (on an H100 they came out equal there).
    looser = FormationConfig(max_tokens=48, min_similarity=0.9)
    keys = _clusters(tiny_model, bikes_frames, dataclasses.replace(looser, key_weight=1.0))
    assert keys != _clusters(tiny_model, bikes_frames, looser)
    assert sorted(f for c in keys for f in c) == list(range(len(bikes_frames)))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5"])
def test_key_weight_outside_zero_to_one_is_refused(bad) -> None:
    with pytest.raises(ConfigError, match="key_weight"):
        FormationConfig(key_weight=bad)
