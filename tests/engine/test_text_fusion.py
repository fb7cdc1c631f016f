"""The language model's fused norms, MLPs, attentions and decoder layers: eager here (compiling needs CUDA), so
they must equal transformers' modules bit for bit, on the big-pass branch and the small-pass one."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from mosaic_core.errors import ConfigError
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.text_fusion import (
    MIN_FUSED_TOKENS,
    FusedTextAttention,
    FusedTextDecoderLayer,
    FusedTextMLP,
    FusedTextRMSNorm,
    _add_rms_norm,
    _rotary,
    _silu_mul,
    fuse_text_elementwise,
)
from mosaic_core.model.vision_tower import _compiled, _rms_norm
from tests.engine.language_model_helpers import tiny_language_model

RECORDING_ATTENTION = "text_fusion_test_recording"
_recorded_calls: list[tuple] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that records what the attention module hands its attention interface."""
    _recorded_calls.append((module.layer_idx, query, key, value, attention_mask, kwargs))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)


def _hidden_states(language_model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        out = language_model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    return (*out.hidden_states, out.last_hidden_state)


@pytest.mark.parametrize(
    ("batch", "tokens", "min_tokens", "fused_branch"),
    [(2, 150, 8, True), (1, 300, 8, True), (1, 5, 8, False), (1, 300, MIN_FUSED_TOKENS, False)],
)
def test_fused_language_model_gives_the_same_hidden_states(batch, tokens, min_tokens, fused_branch):
    language_model = tiny_language_model()
    hidden = language_model.config.hidden_size
    embeds = torch.randn(batch, tokens, hidden, generator=torch.Generator().manual_seed(1))
    before = _hidden_states(language_model, embeds)
    num_layers = len(language_model.layers)
    assert fuse_text_elementwise(language_model, compile=False, min_tokens=min_tokens) == 5 * num_layers + 1

    # Stand in for the compiled functions with counting eager ones: shows which branch ran, and on what shape.
    big_pass_shapes = []

    def counting(function):
        def counted(first, *rest):
            big_pass_shapes.append(tuple(first.shape))
            return function(first, *rest)

        return counted

    for module in language_model.modules():
        if isinstance(module, FusedTextRMSNorm):
            module.norm = counting(_rms_norm)
        elif isinstance(module, FusedTextMLP):
            module.silu_mul = counting(_silu_mul)
        elif isinstance(module, FusedTextAttention):
            module.rotary = counting(_rotary)
        elif isinstance(module, FusedTextDecoderLayer):
            module.add_norm = counting(_add_rms_norm)
    after = _hidden_states(language_model, embeds)

    assert len(before) == len(after) == num_layers + 2
    for layer, (b, a) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(b, a), f"hidden state {layer}: max diff {(b - a).abs().max().item():.3g}"
    rows = batch * tokens
    if fused_branch:
        config = language_model.config
        intermediate, heads = config.intermediate_size, config.num_attention_heads
        # A layer's input norm, rotary (query [rows, heads, head_dim]), residual add with the norm after attention
        # (the layer's own norm is not called) and MLP (gate and up both [rows, intermediate]); then the final norm.
        layer = [(rows, hidden), (rows, heads, hidden // heads), (rows, hidden), (rows, intermediate)]
        expected = layer * num_layers + [(rows, hidden)]
        assert big_pass_shapes == expected
    else:
        assert big_pass_shapes == []


def test_fusion_counts_the_language_models_norms_mlps_attentions_and_layers_only():
    """Vision blocks use the same transformers RMSNorm class; walking the language model leaves them alone."""
    model = Qwen25VLAdapter.from_preset("tiny").model.model
    visual, language_model = model.visual, model.language_model
    vision_types = [type(m) for m in visual.modules()]
    num_layers = language_model.config.num_hidden_layers
    assert fuse_text_elementwise(language_model, compile=False) == (2 * num_layers + 1) + 3 * num_layers
    assert [type(m) for m in visual.modules()] == vision_types
    assert not any(isinstance(m, FusedTextRMSNorm | FusedTextMLP | FusedTextAttention) for m in visual.modules())
    layer = language_model.layers[0]
    assert type(layer.input_layernorm) is FusedTextRMSNorm and type(layer.post_attention_layernorm) is FusedTextRMSNorm
    assert type(language_model.norm) is FusedTextRMSNorm and type(layer.mlp) is FusedTextMLP
    assert type(layer.self_attn) is FusedTextAttention and type(layer) is FusedTextDecoderLayer
    assert fuse_text_elementwise(language_model, compile=False) == 0  # already swapped


def test_compiled_text_fusion_shares_one_compiled_function_per_kind():
    """Wiring only (compiling runs at the first big call, which needs CUDA here)."""
    language_model = Qwen25VLAdapter.from_preset("tiny").model.model.language_model
    fuse_text_elementwise(language_model)
    norms = [m for m in language_model.modules() if isinstance(m, FusedTextRMSNorm)]
    mlps = [m for m in language_model.modules() if isinstance(m, FusedTextMLP)]
    attentions = [m for m in language_model.modules() if isinstance(m, FusedTextAttention)]
    assert len({id(m.norm) for m in norms}) == 1 and norms[0].norm is not _rms_norm
    assert len({id(m.silu_mul) for m in mlps}) == 1 and mlps[0].silu_mul is not _silu_mul
    layers = language_model.layers
    assert len({id(m.rotary) for m in attentions}) == 1 and attentions[0].rotary is not _rotary
    assert len({id(m.add_norm) for m in layers}) == 1 and layers[0].add_norm is not _add_rms_norm


def _same(before, after) -> bool:
    if isinstance(before, torch.Tensor):
        return isinstance(after, torch.Tensor) and before.dtype == after.dtype and torch.equal(before, after)
    return before is after or before == after


@pytest.mark.parametrize(
    ("batch", "position_rows", "tokens", "min_tokens", "dtype", "fused_branch"),
    [
        (2, 2, 150, 8, torch.float32, True),
        (1, 1, 97, 8, torch.bfloat16, True),
        (2, 1, 60, 8, torch.float32, True),  # one row of positions for the whole batch: cos and sin broadcast
        (2, 2, 3, 8, torch.float32, False),
    ],
)
def test_fused_attention_hands_its_attention_interface_what_transformers_does(
    batch, position_rows, tokens, min_tokens, dtype, fused_branch
):
    """Multimodal positions (each of the temporal, height and width sections its own) through the whole language
    model: every layer's attention interface gets the same query, key, value (values, dtypes and strides), mask and
    keyword arguments, the Mosaic plan among them, as from transformers' attention."""
    language_model = tiny_language_model(RECORDING_ATTENTION).to(dtype)
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(batch, tokens, language_model.config.hidden_size, generator=generator).to(dtype)
    positions = torch.randint(0, 4 * tokens, (3, position_rows, tokens), generator=generator)
    plan = object()

    def run():
        _recorded_calls.clear()
        with torch.inference_mode():
            out = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False, mosaic_plan=plan)
        calls = list(_recorded_calls)
        _recorded_calls.clear()
        return out.last_hidden_state, calls

    expected, expected_calls = run()
    fuse_text_elementwise(language_model, compile=False, min_tokens=min_tokens)
    rotary_calls = []
    for module in language_model.modules():
        if isinstance(module, FusedTextAttention):
            module.rotary = lambda *args: rotary_calls.append(args[0].shape) or _rotary(*args)
    got, got_calls = run()

    assert torch.equal(got, expected) and got.dtype == expected.dtype == dtype
    assert len(rotary_calls) == (len(language_model.layers) if fused_branch else 0)
    assert len(got_calls) == len(expected_calls) == len(language_model.layers)
    for (*tensors, kwargs), (*expected_tensors, expected_kwargs) in zip(got_calls, expected_calls, strict=True):
        layer = tensors[0]
        for name, a, b in zip(("layer", "query", "key", "value", "mask"), tensors, expected_tensors, strict=True):
            assert _same(b, a), f"layer {layer}: {name} differs"
            if isinstance(a, torch.Tensor):
                assert a.stride() == b.stride(), f"layer {layer}: {name} strides {a.stride()} != {b.stride()}"
        assert kwargs.keys() == expected_kwargs.keys() and kwargs["mosaic_plan"] is plan
        assert all(_same(expected_kwargs[key], value) for key, value in kwargs.items()), f"layer {layer}: kwargs"


def test_too_small_a_threshold_is_refused():
    language_model = Qwen25VLAdapter.from_preset("tiny").model.model.language_model
    with pytest.raises(ConfigError, match="got 1"):
        fuse_text_elementwise(language_model, compile=False, min_tokens=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compile")
def test_compiled_functions_stay_within_bf16_rounding_of_transformers_modules():
    reference = tiny_language_model().to("cuda", torch.bfloat16)
    fused = tiny_language_model().to("cuda", torch.bfloat16)
    fuse_text_elementwise(fused, min_tokens=8)
    embeds = torch.randn(2, 600, fused.config.hidden_size, generator=torch.Generator().manual_seed(1))
    embeds = embeds.to("cuda", torch.bfloat16)
    expected, got = _hidden_states(reference, embeds)[-1].float(), _hidden_states(fused, embeds)[-1].float()
    # one bf16 step (2**-8 relative) per fused op, compounded over the layers: far below the values' scale
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got - expected).abs().mean() <= 0.01 * expected.abs().mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compile")
@pytest.mark.parametrize(("batch", "tokens", "head_dim"), [(1, 17, 128), (2, 97, 128), (3, 1031, 32)])
def test_compiled_rotary_stays_within_bf16_rounding_of_transformers(batch, tokens, head_dim):
    """The compiled rotary against transformers' eager ``apply_rotary_pos_emb``, on the 7B model's head counts."""
    generator = torch.Generator().manual_seed(2)

    def heads(num_heads: int) -> torch.Tensor:  # [batch, tokens, heads, head_dim], as the projections give them
        return torch.randn(batch, tokens, num_heads, head_dim, generator=generator).to("cuda", torch.bfloat16)

    query, key = heads(28), heads(4)
    angles = torch.rand(batch, tokens, head_dim // 2, generator=generator) * 100
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to("cuda", torch.bfloat16), angles.sin().to("cuda", torch.bfloat16)
    expected = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)

    rows = batch * tokens
    flat = (query.reshape(rows, 28, head_dim), key.reshape(rows, 4, head_dim))
    got = _compiled(_rotary)(*flat, cos.reshape(rows, head_dim), sin.reshape(rows, head_dim))
    for g, e, source in zip(got, expected, (query, key), strict=True):
        assert g.dtype == e.dtype == torch.bfloat16
        g = g.view(batch, tokens, -1, head_dim).transpose(1, 2)
        # eager rounds both products and the sum to bf16 (2**-8 relative each); compiled rounds once
        assert (g.float() - e.float()).abs().max() <= 2**-6 * source.abs().max()
