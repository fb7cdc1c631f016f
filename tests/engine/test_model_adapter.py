"""The Qwen2.5-VL adapter: presets, checkpoint loading, M-RoPE positions, and the attention hook."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mosaic_core.errors import ConfigError
from mosaic_core.model.attention_hook import PLAN_KWARG
from mosaic_core.model.presets import PRESETS, preset_config_kwargs
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from tests.engine.engine_helpers import feed, make_engine


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
    assert not reloaded.model.use_kernels  # no Hub kernels swapped in (nor the `kernels` package needed, as on the GPU)
    original = dict(itertools.chain(tiny_model.model.named_parameters(), tiny_model.model.named_buffers()))
    loaded = dict(itertools.chain(reloaded.model.named_parameters(), reloaded.model.named_buffers()))
    assert loaded.keys() == original.keys()
    differ = {
        name: (loaded[name] - original[name]).abs().max().item()
        for name in original
        if not torch.equal(loaded[name], original[name])
    }
    assert not differ, f"tensors that differ after the reload, by their largest difference: {differ}"
    hidden = []
    for model in (tiny_model, reloaded):
        engine = make_engine(model, mode="cluster")
        engine.open_stream("cam")
        feed(engine, "cam", bikes_frames[:8])
        hidden.append(engine.answer("cam", "what moved?", max_new_tokens=1).last_hidden)
    torch.testing.assert_close(hidden[1], hidden[0], atol=1e-5, rtol=1e-5)  # its message says by how much


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
    ours = tiny_model.frame_positions(geometry, base=prefix, offsets_s=[i * interval_s for i in range(num_frames)])
    assert torch.equal(expected[:, 0, prefix:], torch.from_numpy(ours).to(expected.device))
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


def test_frames_of_different_sizes_share_one_tower_call(tiny_model):
    """Each source size is resized on its own; the embeddings equal one call per size, in the order given."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 255, (2, 60, 80, 3), dtype=np.uint8)
    large = rng.integers(0, 255, (2, 90, 70, 3), dtype=np.uint8)
    geometry = tiny_model.choose_geometry(60, 80, 16)
    mixed = tiny_model.encode_frames([small[0], large[0], small[1], large[1]], geometry).embeds
    by_size = [tiny_model.encode_frames(batch, geometry).embeds for batch in (small, large)]
    expected = torch.stack([by_size[0][0], by_size[1][0], by_size[0][1], by_size[1][1]])
    assert torch.allclose(mixed, expected, atol=1e-5), (mixed - expected).abs().max()


def test_precomputed_tower_inputs_equal_transformers_video_features(tiny_model):
    from mosaic_core.model.pixels import frames_to_vision_input

    frames = np.random.default_rng(4).integers(0, 255, (3, 96, 128, 3), dtype=np.uint8)
    geometry = tiny_model.choose_geometry(96, 128, 16)
    ours = tiny_model.encode_frames(frames, geometry).embeds
    vision = frames_to_vision_input(frames, geometry, device=tiny_model.device)
    with torch.inference_mode():
        theirs = tiny_model.model.model.get_video_features(vision.pixel_values_videos, vision.video_grid_thw)
    assert torch.equal(ours, torch.stack(list(theirs.pooler_output)))
    cached = len(tiny_model.tower_inputs)
    tiny_model.encode_frames(frames, geometry)
    assert len(tiny_model.tower_inputs) == cached


def test_padded_vision_mlp_computes_the_same_features():
    """A 100-wide MLP is widened to 128 with zero units; the tower's output does not change."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mosaic_core.model.pixels import frames_to_vision_input
    from mosaic_core.model.qwen2_5_vl import ATTENTION_BY_PART
    from mosaic_core.model.vision_tower import pad_mlp_widths

    kwargs = preset_config_kwargs("tiny")
    kwargs["vision_config"] = {**kwargs["vision_config"], "intermediate_size": 100}
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        Qwen2_5_VLConfig(**kwargs), attn_implementation=ATTENTION_BY_PART
    ).eval()
    visual = model.model.visual
    frames = np.random.default_rng(5).integers(0, 255, (2, 96, 128, 3), dtype=np.uint8)
    vision = frames_to_vision_input(frames, Qwen25VLAdapter(model, name="narrow").choose_geometry(96, 128, 16))
    # The adapter widened the MLPs already; compare against the same weights cut back to 100 units.
    assert all(block.mlp.gate_proj.out_features == 128 for block in visual.blocks)
    with torch.no_grad():
        widened = visual(vision.pixel_values_videos, grid_thw=vision.video_grid_thw).pooler_output
        for block in visual.blocks:
            mlp = block.mlp
            assert not mlp.gate_proj.weight[100:].any() and not mlp.down_proj.weight[:, 100:].any()
            mlp.gate_proj.weight.data[100:] = 1.0  # the extra units now add something unless cut away
            mlp.up_proj.bias.data[100:] = 1.0
            mlp.down_proj.weight.data[:, 100:] = 1.0
        perturbed = visual(vision.pixel_values_videos, grid_thw=vision.video_grid_thw).pooler_output
        for block in visual.blocks:
            mlp = block.mlp
            for name, rows in (("gate_proj", 100), ("up_proj", 100)):
                linear = getattr(mlp, name)
                cut = torch.nn.Linear(linear.in_features, rows)
                cut.weight.data, cut.bias.data = linear.weight.data[:rows].clone(), linear.bias.data[:rows].clone()
                setattr(mlp, name, cut)
            down = torch.nn.Linear(100, mlp.down_proj.out_features)
            down.weight.data, down.bias.data = mlp.down_proj.weight.data[:, :100].clone(), mlp.down_proj.bias.data
            mlp.down_proj = down
        narrow = visual(vision.pixel_values_videos, grid_thw=vision.video_grid_thw).pooler_output
    assert not torch.allclose(perturbed, narrow, atol=1e-3)
    assert torch.allclose(widened, narrow, atol=1e-5), (widened - narrow).abs().max()
    assert pad_mlp_widths(visual) == len(visual.blocks)


def test_fused_vision_modules_compute_what_transformers_modules_compute():
    """The fused RMSNorm and MLP run their functions eagerly here (compiling needs CUDA); same features."""
    from mosaic_core.model.vision_tower import FusedRMSNorm, FusedSiluMLP, fuse_elementwise

    model = Qwen25VLAdapter.from_preset("tiny")
    frames = np.random.default_rng(6).integers(0, 255, (2, 96, 128, 3), dtype=np.uint8)
    geometry = model.choose_geometry(96, 128, 16)
    before = model.encode_frames(frames, geometry).embeds
    visual = model.model.model.visual
    depth = len(visual.blocks)
    assert fuse_elementwise(visual, compile=False) == 3 * depth + 1  # two norms and an MLP a block, the merger's norm
    assert type(visual.blocks[0].norm1) is FusedRMSNorm and type(visual.blocks[0].mlp) is FusedSiluMLP
    after = model.encode_frames(frames, geometry).embeds
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()


def test_compiled_fusion_gives_every_module_one_shared_compiled_function():
    """Wiring only (compiling runs at the first call, which needs CUDA here): each fused module gets the compiled
    function, shared across modules, and an unfused tower keeps the eager ones."""
    from mosaic_core.model.vision_attention import BatchedChunkAttention, _rotate
    from mosaic_core.model.vision_tower import fuse_elementwise

    fused, plain = Qwen25VLAdapter.from_preset("tiny"), Qwen25VLAdapter.from_preset("tiny")
    visual = fused.model.model.visual
    fuse_elementwise(visual)
    norms = [m for m in visual.modules() if hasattr(m, "variance_epsilon")]
    attentions = [m for m in visual.modules() if isinstance(m, BatchedChunkAttention)]
    assert len({id(m.norm) for m in norms}) == 1 and norms[0].norm is not type(norms[0]).norm
    assert len({id(m.rotate) for m in attentions}) == 1 and attentions[0].rotate is not _rotate
    assert all(m.rotate is _rotate for m in plain.model.model.visual.modules() if isinstance(m, BatchedChunkAttention))


class _CausalPlan:
    """Plain causal attention over the pass's own tokens, as an ``AttentionPlan``."""

    def attend(self, layer_idx, query, key, value, scale):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
        return out.transpose(1, 2)


def test_forward_scatters_frames_as_transformers_multimodal_forward_does(tiny_model):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden = tiny_model.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(10, 100, (2, 12), generator=generator)
    input_ids[0, 2:7] = input_ids[1, 4:11] = tiny_model.video_token_id
    input_ids = input_ids.to(tiny_model.device)
    frame_embeds = torch.randn(12, hidden, generator=generator).to(tiny_model.device)
    position_ids = torch.arange(12, device=tiny_model.device).expand(3, 2, -1)
    plan = _CausalPlan()

    ours = tiny_model.forward(input_ids=input_ids, position_ids=position_ids, plan=plan, frame_embeds=frame_embeds)
    theirs = tiny_model.model.model(
        input_ids=input_ids,
        position_ids=position_ids,
        mm_token_type_ids=(input_ids == tiny_model.video_token_id).long() * 2,
        mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=(frame_embeds,))},
        use_cache=False,
        **{PLAN_KWARG: plan},
    ).last_hidden_state
    assert torch.equal(ours, theirs)
    without_frames = tiny_model.forward(input_ids=input_ids, position_ids=position_ids, plan=plan)
    assert not torch.allclose(ours, without_frames)
