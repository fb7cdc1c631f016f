"""The patch embedding as one matrix product (``vision_tower.MatmulPatchEmbed``) against transformers' Conv3d.

The two sum the same 1,176 products per output in different orders, so they agree to float rounding, not bit for
bit: float32 within 2e-5 (outputs are around 1-3; the CPU differs by up to 5e-6), with cuDNN's TF32 switched off
for the conv on CUDA, where it is on by default; bfloat16 within rtol 1.6e-2 (two bfloat16 ulps) and atol 1e-3,
since each path rounds its float32 sum to bfloat16 on its own (the CPU differs by one ulp at most).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter
from mosaic_core.model.vision_tower import MatmulPatchEmbed, embed_patches_by_matmul

TOLERANCES = {torch.float32: {"rtol": 0.0, "atol": 2e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3}}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _embeds(embed_dim: int, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Transformers' conv embed and a matmul copy with the same (random) weights."""
    torch.manual_seed(0)
    conv = Qwen2_5_VisionPatchEmbed(embed_dim=embed_dim).to(device=device, dtype=dtype)
    matmul = copy.deepcopy(conv)
    matmul.__class__ = MatmulPatchEmbed
    return conv, matmul


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("embed_dim", [64, 1280], ids=["tiny", "7b"])
def test_matmul_embed_equals_the_conv(embed_dim, dtype, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    conv, matmul = _embeds(embed_dim, dtype, device)
    # float32 pixels into a low-precision embed, as the tower gets them: both cast to the weight's dtype.
    pixels = torch.randn(997, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1)).to(device)

    with torch.no_grad():
        expected, out = conv(pixels), matmul(pixels)

    assert out.shape == expected.shape == (997, embed_dim) and out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_a_wrongly_flattened_weight_would_fail():
    """The comparison can fail: the same weight flattened in another order (patch rows and columns swapped)."""
    conv, matmul = _embeds(64, torch.float32, "cpu")
    pixels = torch.randn(50, 1176, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        matmul.proj.weight.copy_(conv.proj.weight.transpose(-1, -2))
        assert (matmul(pixels) - conv(pixels)).abs().max() > 0.1


def test_the_adapter_embeds_by_matmul_and_computes_what_the_conv_computes():
    model = Qwen25VLAdapter.from_preset("tiny")
    visual = model.model.model.visual
    assert type(visual.patch_embed) is MatmulPatchEmbed  # the adapter swapped it
    assert embed_patches_by_matmul(visual) == 0  # already swapped
    frames = np.random.default_rng(7).integers(0, 255, (3, 96, 128, 3), dtype=np.uint8)
    geometry = model.choose_geometry(96, 128, 16)
    after = model.encode_frames(frames, geometry).embeds

    visual.patch_embed.__class__ = Qwen2_5_VisionPatchEmbed  # transformers' Conv3d forward, same weights
    before = model.encode_frames(frames, geometry).embeds

    assert not torch.equal(before, torch.zeros_like(before))
    torch.testing.assert_close(after, before, rtol=0.0, atol=1e-5)
