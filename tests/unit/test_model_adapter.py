"""The Qwen2.5-VL adapter: presets, checkpoint loading, M-RoPE positions, and the attention hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import feed, make_engine

from mosaic_core.errors import ConfigError
from mosaic_core.model.presets import PRESETS, preset_config_kwargs
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter


def test_presets_have_the_published_7b_shape():
    kwargs = preset_config_kwargs("qwen2.5-vl-7b")
    text, vision = kwargs["text_config"], kwargs["vision_config"]
    assert (text["num_hidden_layers"], text["hidden_size"], text["num_key_value_heads"]) == (28, 3584, 4)
    assert text["hidden_size"] // text["num_attention_heads"] == 128
    assert sum(text["rope_parameters"]["mrope_section"]) == 64
    assert (vision["depth"], vision["hidden_size"], vision["out_hidden_size"]) == (32, 1280, 3584)
    assert set(PRESETS) == {"tiny", "qwen2.5-vl-7b"}
    with pytest.raises(ConfigError, match="tiny"):
        preset_config_kwargs("huge")


def test_from_pretrained_reloads_a_saved_checkpoint(tiny_model, bikes_frames, tmp_path):
    tiny_model.model.save_pretrained(tmp_path / "ckpt")
    reloaded = Qwen25VLAdapter.load(str(tmp_path / "ckpt"), device=tiny_model.device)
    assert reloaded.model.config.text_config._attn_implementation == "mosaic"
    assert reloaded.model.config.vision_config._attn_implementation == "sdpa"
    hidden = []
    for model in (tiny_model, reloaded):
        engine = make_engine(model, mode="cluster")
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:8])
        hidden.append(engine.answer("cam", "what moved?", max_new_tokens=1).last_hidden)
    assert torch.allclose(hidden[0], hidden[1], atol=1e-5)


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        Qwen25VLAdapter.load(str(tmp_path / "absent"))


def test_frame_positions_match_get_rope_index_for_a_video(tiny_model):
    """Our per-frame M-RoPE ids equal transformers' for one video of frames 0.5 s apart."""
    geometry = tiny_model.choose_geometry(96, 128, 16)
    num_frames, interval_s, prefix = 3, 0.5, 5
    tokens = geometry.tokens_per_frame
    video_ids = [tiny_model.video_token_id] * (tokens * num_frames)
    on_model = {"device": tiny_model.device}
    input_ids = torch.tensor([[1] * prefix + video_ids], **on_model)
    mm_types = torch.tensor([[0] * prefix + [2] * len(video_ids)], **on_model)
    grid = torch.tensor([[num_frames, geometry.grid_h, geometry.grid_w]], **on_model)
    seconds_per_grid = torch.tensor([interval_s], **on_model)
    expected, _ = tiny_model.model.model.get_rope_index(
        input_ids, mm_types, video_grid_thw=grid, second_per_grid_ts=seconds_per_grid
    )
    ours = [tiny_model.frame_positions(geometry, base=prefix, offset_s=i * interval_s) for i in range(num_frames)]
    assert torch.equal(expected[:, 0, prefix:], torch.cat(ours, dim=1))
    assert torch.equal(expected[:, 0, :prefix], tiny_model.text_positions(0, prefix))


def test_encode_frames_batches_the_vision_tower(tiny_model):
    frames = np.random.default_rng(1).integers(0, 255, (3, 96, 128, 3), dtype=np.uint8)
    geometry = tiny_model.choose_geometry(96, 128, 16)
    features = tiny_model.encode_frames(frames, geometry)
    assert features.embeds.shape == (3, geometry.tokens_per_frame, tiny_model.config.text_config.hidden_size)
    single = tiny_model.encode_frames(frames[1:2], geometry)
    assert torch.allclose(features.embeds[1], single.embeds[0], atol=1e-5)


def test_attention_without_a_plan_is_refused(tiny_model):
    with pytest.raises(RuntimeError, match="attention plan"):
        tiny_model.model.model.language_model(inputs_embeds=torch.zeros(1, 2, 128, device=tiny_model.device))


@pytest.mark.parametrize(("height", "width"), [(224, 448), (96, 128)])
def test_batched_vision_chunks_equal_transformers_attention(tiny_model, height, width):
    """224x448 cuts into equal windows (one call); 96x128 (resized to 280x364) into windows of four lengths."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from mosaic_core.model.vision_attention import BatchedChunkAttention

    frames = np.random.default_rng(2).integers(0, 255, (3, height, width, 3), dtype=np.uint8)
    geometry = tiny_model.choose_geometry(height, width, 128)
    attentions = [m for m in tiny_model.model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]
    assert attentions and all(type(m) is BatchedChunkAttention for m in attentions)
    batched = tiny_model.encode_frames(frames, geometry).embeds
    try:
        for module in attentions:
            module.__class__ = Qwen2_5_VLVisionAttention
        reference = tiny_model.encode_frames(frames, geometry).embeds
    finally:
        for module in attentions:
            module.__class__ = BatchedChunkAttention
    assert torch.allclose(batched, reference, atol=1e-5, rtol=1e-5), (batched - reference).abs().max()


def test_the_qwen_adapter_is_a_vlm_adapter_and_owns_its_chat_template(tiny_model):
    from mosaic_core.model.adapter import VlmAdapter

    assert isinstance(tiny_model, VlmAdapter)
    preamble = tiny_model.decode_tokens(tiny_model.stream_preamble("watch the gate"))
    assert "watch the gate" in preamble
    question = tiny_model.question_ids("when did the van leave?")
    assert tiny_model.decode_tokens(question).strip().startswith("when did the van leave?")
