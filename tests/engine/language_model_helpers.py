"""The tiny preset's language model alone, for the tests of its fused modules and small-pass kernels."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from mosaic_core.model.presets import preset_config_kwargs


def tiny_language_model(attention: str = "sdpa") -> torch.nn.Module:
    """The tiny preset's language model with SDPA attention (or ``attention``), so a plain forward needs no Mosaic
    attention plan; its norm weights are random, so that using the wrong norm's weight shows."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        Qwen2_5_VLConfig(**preset_config_kwargs("tiny")), attn_implementation=attention
    )
    language_model = model.eval().model.language_model
    with torch.no_grad():  # norm weights start as ones
        for module in language_model.modules():
            if isinstance(module, Qwen2_5_VLRMSNorm):
                module.weight.normal_(1.0, 0.2)
    return language_model
