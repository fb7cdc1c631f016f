"""The vision tower's attention is held to FlashAttention (then the memory-efficient kernel) on CUDA, where PyTorch's
own pick cost 54-85 ms more on each new batch size's first call on the H200; the CPU is never held."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.model import vision_attention
from mosaic_core.model.vision_attention import BatchedChunkAttention, hold_vision_attention


def _flags() -> tuple[bool, bool, bool]:
    backends = torch.backends.cuda
    return backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.cudnn_sdp_enabled()


def test_the_adapter_holds_every_tower_attention_to_flash(tiny_model):
    attentions = [m for m in tiny_model.model.modules() if isinstance(m, BatchedChunkAttention)]
    assert attentions and len(attentions) == tiny_model.config.vision_config.depth
    assert all(m.cuda_backends == vision_attention.VISION_ATTENTION_BACKENDS["flash"] for m in attentions)


def test_auto_lets_pytorch_pick_and_an_unknown_choice_names_the_choices(tiny_model):
    try:
        assert hold_vision_attention(tiny_model.model, "auto") == tiny_model.config.vision_config.depth
        assert all(m.cuda_backends is None for m in tiny_model.model.modules() if isinstance(m, BatchedChunkAttention))
        with pytest.raises(ValueError, match=r"'cudnn' is not one of \['auto', 'flash'\]"):
            hold_vision_attention(tiny_model.model, "cudnn")
    finally:
        hold_vision_attention(tiny_model.model, "flash")


def test_the_tower_runs_held_on_cuda_and_unheld_elsewhere(tiny_model, monkeypatch):
    seen = []
    real = vision_attention.F.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        seen.append((query.is_cuda, _flags()))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(vision_attention.F, "scaled_dot_product_attention", recording)
    before = _flags()
    frames = np.random.default_rng(0).integers(0, 256, (3, 272, 640, 3), dtype=np.uint8)
    tiny_model.encode_frames(frames, tiny_model.choose_geometry(272, 640, 16))
    assert seen
    for on_cuda, flags in seen:
        assert flags == ((True, True, False) if on_cuda else before)
    assert _flags() == before  # the hold ends with the forward
