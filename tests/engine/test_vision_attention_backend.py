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
        with pytest.raises(ValueError, match=r"'cudnn' is not one of \['auto', 'flash', 'varlen'\]"):
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


def _embeds(model, frames) -> torch.Tensor:
    out = model.encode_frames(frames, model.choose_geometry(272, 640, 16))
    return torch.stack([e.float() for e in out.embeds])


def test_varlen_leaves_the_cpu_and_full_precision_on_the_batched_path(tiny_model, monkeypatch):
    """On the CPU, and in float32 on CUDA, "varlen" runs the chunks as "flash" does: same output, no varlen call."""

    def refused(*args, **kwargs):
        raise AssertionError("the variable-length call ran where it cannot")

    frames = np.random.default_rng(1).integers(0, 256, (2, 272, 640, 3), dtype=np.uint8)
    held = _embeds(tiny_model, frames)
    monkeypatch.setattr(vision_attention, "_attend_varlen", refused)
    try:
        hold_vision_attention(tiny_model.model, "varlen")
        attentions = [m for m in tiny_model.model.modules() if isinstance(m, BatchedChunkAttention)]
        assert all(
            m.varlen and m.cuda_backends == vision_attention.VISION_ATTENTION_BACKENDS["flash"] for m in attentions
        )
        torch.testing.assert_close(_embeds(tiny_model, frames), held, rtol=0, atol=0)
    finally:
        hold_vision_attention(tiny_model.model, "flash")
    assert not any(m.varlen for m in tiny_model.model.modules() if isinstance(m, BatchedChunkAttention))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length call runs on CUDA only")
def test_varlen_on_cuda_matches_the_batched_chunks_in_one_call_a_block(monkeypatch):
    from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

    model = Qwen25VLAdapter.from_preset("tiny", device="cuda", dtype=torch.bfloat16, vision_attention="flash")
    frames = np.random.default_rng(2).integers(0, 256, (3, 272, 640, 3), dtype=np.uint8)  # windows of two lengths
    batched = _embeds(model, frames)
    calls = []
    real = vision_attention._attend_varlen
    monkeypatch.setattr(vision_attention, "_attend_varlen", lambda *a: calls.append(a[-1]) or real(*a))
    hold_vision_attention(model.model, "varlen")
    varlen = _embeds(model, frames)
    windowed = model.config.vision_config.depth - len(model.config.vision_config.fullatt_block_indexes)
    assert len(calls) == windowed  # one call a windowed block; the full-attention blocks have one length
    torch.testing.assert_close(varlen, batched, rtol=2e-2, atol=2e-2)
