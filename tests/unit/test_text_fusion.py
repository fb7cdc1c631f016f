"""The language model's fused norms and MLPs: eager here (compiling needs CUDA), so they must equal transformers'
modules bit for bit, on the big-pass branch and the small-pass one."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mosaic_core.errors import ConfigError
from mosaic_core.model.presets import preset_config_kwargs
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.text_fusion import (
    MIN_FUSED_TOKENS,
    FusedTextMLP,
    FusedTextRMSNorm,
    _silu_mul,
    fuse_text_elementwise,
)
from mosaic_core.model.vision_tower import _rms_norm


def _sdpa_language_model() -> torch.nn.Module:
    """The tiny preset's language model with SDPA attention, so a plain forward needs no Mosaic attention plan."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        Qwen2_5_VLConfig(**preset_config_kwargs("tiny")), attn_implementation="sdpa"
    )
    return model.eval().model.language_model


def _hidden_states(language_model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        out = language_model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    return (*out.hidden_states, out.last_hidden_state)


@pytest.mark.parametrize(
    ("batch", "tokens", "min_tokens", "fused_branch"),
    [(2, 150, 8, True), (1, 300, 8, True), (1, 5, 8, False), (1, 300, MIN_FUSED_TOKENS, False)],
)
def test_fused_language_model_gives_the_same_hidden_states(batch, tokens, min_tokens, fused_branch):
    language_model = _sdpa_language_model()
    hidden = language_model.config.hidden_size
    embeds = torch.randn(batch, tokens, hidden, generator=torch.Generator().manual_seed(1))
    before = _hidden_states(language_model, embeds)
    num_layers = len(language_model.layers)
    assert fuse_text_elementwise(language_model, compile=False, min_tokens=min_tokens) == 3 * num_layers + 1

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
    after = _hidden_states(language_model, embeds)

    assert len(before) == len(after) == num_layers + 2
    for layer, (b, a) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(b, a), f"hidden state {layer}: max diff {(b - a).abs().max().item():.3g}"
    rows = batch * tokens
    if fused_branch:
        intermediate = language_model.config.intermediate_size
        # Two norms and an MLP (gate and up both [rows, intermediate]) a layer, and the final norm.
        expected = [(rows, hidden), (rows, hidden), (rows, intermediate)] * num_layers + [(rows, hidden)]
        assert big_pass_shapes == expected
    else:
        assert big_pass_shapes == []


def test_fusion_counts_the_language_models_norms_and_mlps_only():
    """Vision blocks use the same transformers RMSNorm class; walking the language model leaves them alone."""
    model = Qwen25VLAdapter.from_preset("tiny").model.model
    visual, language_model = model.visual, model.language_model
    vision_types = [type(m) for m in visual.modules()]
    num_layers = language_model.config.num_hidden_layers
    assert fuse_text_elementwise(language_model, compile=False) == (2 * num_layers + 1) + num_layers
    assert [type(m) for m in visual.modules()] == vision_types
    assert not any(isinstance(m, FusedTextRMSNorm | FusedTextMLP) for m in visual.modules())
    layer = language_model.layers[0]
    assert type(layer.input_layernorm) is FusedTextRMSNorm and type(layer.post_attention_layernorm) is FusedTextRMSNorm
    assert type(language_model.norm) is FusedTextRMSNorm and type(layer.mlp) is FusedTextMLP
    assert fuse_text_elementwise(language_model, compile=False) == 0  # already swapped


def test_compiled_text_fusion_shares_one_compiled_function_per_kind():
    """Wiring only (compiling runs at the first big call, which needs CUDA here)."""
    language_model = Qwen25VLAdapter.from_preset("tiny").model.model.language_model
    fuse_text_elementwise(language_model)
    norms = [m for m in language_model.modules() if isinstance(m, FusedTextRMSNorm)]
    mlps = [m for m in language_model.modules() if isinstance(m, FusedTextMLP)]
    assert len({id(m.norm) for m in norms}) == 1 and norms[0].norm is not _rms_norm
    assert len({id(m.silu_mul) for m in mlps}) == 1 and mlps[0].silu_mul is not _silu_mul


def test_too_small_a_threshold_is_refused():
    language_model = Qwen25VLAdapter.from_preset("tiny").model.model.language_model
    with pytest.raises(ConfigError, match="got 1"):
        fuse_text_elementwise(language_model, compile=False, min_tokens=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compile")
def test_compiled_functions_stay_within_bf16_rounding_of_transformers_modules():
    reference = _sdpa_language_model().to("cuda", torch.bfloat16)
    fused = _sdpa_language_model().to("cuda", torch.bfloat16)
    fuse_text_elementwise(fused, min_tokens=8)
    embeds = torch.randn(2, 600, fused.config.hidden_size, generator=torch.Generator().manual_seed(1))
    embeds = embeds.to("cuda", torch.bfloat16)
    expected, got = _hidden_states(reference, embeds)[-1].float(), _hidden_states(fused, embeds)[-1].float()
    # one bf16 step (2**-8 relative) per fused op, compounded over the layers: far below the values' scale
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got - expected).abs().mean() <= 0.01 * expected.abs().mean()
