"""The GPU settings of the benches that share scenario A and B's settings: --quick runs in CI, the GPU path only
on a GPU host, so a flag missing from one bench's settings broke it there unseen (``mosaic bench profile`` lacked
``camera_seconds``)."""

from __future__ import annotations

import pytest

from mosaic_core.bench import decode_batch, profile_question
from mosaic_core.bench.scenario_a import SWEEP, VARIANTS, variant_config
from mosaic_core.bench.settings import CAMERA_SECONDS, engine_config, settings_for
from mosaic_core.config import SCORER_NAMES


@pytest.mark.parametrize("bench", [profile_question, decode_batch])
def test_the_benches_build_their_settings_through_the_shared_helper(bench, monkeypatch):
    seen = []

    def record(**kwargs):
        seen.append(kwargs)
        raise SystemExit(0)  # stop before a model is loaded

    monkeypatch.setattr(bench, "settings_for", record)
    with pytest.raises(SystemExit):
        bench.main(["--out", "unused"])
    assert seen and seen[0]["quick"] is False
    gpu = settings_for(**seen[0])  # the flags it passes are enough for the GPU settings
    assert (gpu.device, gpu.camera_seconds) == ("cuda", CAMERA_SECONDS)


@pytest.mark.parametrize(
    "argv",
    [["--recall-questions", "25"], ["--b-keyframes", "-1"], ["--b-keyframes", "17"], ["--cameras", "64,0"],
     ["--cameras", "64,many"], ["--variants", "cluster,no-such-variant"], ["--b-modes", "full"],
     ["--b-clips", "bikes.mp4,../secret.mp4"], ["--b-clips", ","]],
)  # fmt: skip
def test_bench_engine_refuses_bad_counts_and_names_before_loading_a_model(argv, capsys):
    from mosaic_core.bench.engine import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("label", sorted(VARIANTS))
def test_every_scenario_a_variant_is_a_valid_config_with_its_settings(label):
    """A variant is only built on the GPU host; a name or value the config refuses would fail there, late."""
    gpu = settings_for(quick=False, model="qwen2.5-vl-7b", minutes=60, questions=20, budget_tokens=16384,
                       device_budget_gib=8.0)  # fmt: skip
    config = variant_config(label, lambda mode: engine_config(gpu, mode), 2**30)
    base = engine_config(gpu, VARIANTS[label]["mode"])
    for name, value in VARIANTS[label].items():
        if isinstance(value, dict):  # fields of a nested config; the bench's others kept
            nested, before = getattr(config, name), getattr(base, name)
            assert {k: getattr(nested, k) for k in value} == value
            assert all(getattr(nested, f) == getattr(before, f) for f in nested.__dataclass_fields__ if f not in value)
            continue
        assert str(getattr(config, name).value if name == "mode" else getattr(config, name)) == str(value)
    assert config.pinned_host_bytes == (0 if config.mode.value == "full" else 2**30)


def test_every_swept_scorer_is_one_the_config_accepts():
    assert set(SWEEP) <= set(SCORER_NAMES)


def test_the_clips_a_bench_loops_are_sample_clips_in_the_order_named():
    from mosaic_core.bench.engine import main_args
    from mosaic_core.bench.workload import CLIPS

    assert main_args([]).b_clips == CLIPS
    assert main_args(["--b-clips", "bikes.mp4"]).b_clips == ("bikes.mp4",)
    assert main_args(["--b-clips", " bigbuckbunny.mp4 ,bikes.mp4"]).b_clips == ("bigbuckbunny.mp4", "bikes.mp4")
    assert decode_batch.main_args(["--clips", "bikes.mp4", "--out", "unused"]).clips == ("bikes.mp4",)


@pytest.mark.parametrize(
    "argv",
    [["--concurrency", "1,x"], ["--concurrency", "0"], ["--concurrency", "17"],
     ["--cameras", "4", "--concurrency", "8"], ["--quick", "--concurrency", "8"],
     ["--clips", "bikes.mp4,../secret.mp4"]],
)  # fmt: skip
def test_bench_decode_refuses_bad_counts_and_clips_before_loading_a_model(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        decode_batch.main_args([*argv, "--out", "unused"])
    assert stop.value.code == 2
    assert argv[-2] in capsys.readouterr().err
