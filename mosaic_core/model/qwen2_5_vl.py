"""Qwen2.5-VL adapter: the only module that knows this architecture's inputs and positions.

The engine talks to a ``VlmAdapter`` (see ``adapter.py``); a LLaVA-OneVision adapter would implement the same
methods, and nothing in the cache or the engine would change.

Positions are explicit 3-D M-RoPE ids, always. A stream is one endless video: its preamble text takes
positions ``0..P-1`` on all three axes, and a frame at ``t`` seconds after the stream's first frame takes

    temporal = P + round(t * tokens_per_second)
    height   = P + row      (row of the merged patch grid)
    width    = P + col

which is what ``get_rope_index`` gives one video whose frames are ``t`` seconds apart. Text after the frames
(a question) continues from one past the largest position used so far; that cursor is the stream's rope delta and
lives in the stream's state, never on this shared object.

The model runs under ``torch.no_grad``, not ``torch.inference_mode``: an ingest call's pauses (``ingest_pauses``)
run questions inside ``forward``, and a tensor allocated there (a page chunk the pools grow by) outlives the call
and is written to later. Under inference mode such a tensor refused every later write from outside it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mosaic_core.errors import ConfigError
from mosaic_core.memory.layout import KVSpec
from mosaic_core.model.attention_hook import MOSAIC_ATTENTION, PLAN_KWARG, AttentionPlan
from mosaic_core.model.frame_upload import UploadedFrames
from mosaic_core.model.geometry import VisionGeometry, choose_geometry, largest_frame_tokens
from mosaic_core.model.pixels import frames_to_vision_input, resize_groups, vision_input_from_pixels
from mosaic_core.model.presets import PRESETS, preset_config_kwargs
from mosaic_core.model.text_fusion import fuse_text_elementwise
from mosaic_core.model.tokenizer import chat_prefix, load_qwen_tokenizer, question_token_ids
from mosaic_core.model.vision_attention import batch_vision_chunks, hold_vision_attention
from mosaic_core.model.vision_tower import (
    TowerInputs,
    embed_patches_by_matmul,
    fuse_elementwise,
    pad_mlp_widths,
    run_tower,
)

# Mosaic attention for the language model; the vision tower keeps SDPA.
ATTENTION_BY_PART = {"": "sdpa", "text_config": MOSAIC_ATTENTION, "vision_config": "sdpa"}


@dataclass(slots=True)
class FrameFeatures:
    """Vision-tower output for a batch of frames."""

    embeds: torch.Tensor  # [num_frames, tokens_per_frame, hidden]
    summaries: torch.Tensor  # [num_frames, hidden], mean visual token, float32: what clustering compares


class Qwen25VLAdapter:
    """Wraps a ``Qwen2_5_VLForConditionalGeneration`` for streaming use."""

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        *,
        name: str,
        fuse_vision: bool | None = None,
        fuse_text: bool | None = None,
        vision_attention: str = "flash",
    ) -> None:
        """``fuse_vision``: compile the vision tower's element-wise work (``vision_tower.fuse_elementwise``);
        ``fuse_text``: the same for the language model's big passes, and one Triton kernel per piece of that work
        on its small ones, question prefills and decode steps (``text_fusion.fuse_text_elementwise``). None does
        so on CUDA only, where ``torch.compile`` makes Triton kernels (on the CPU it needs a C++ compiler and
        compiles for minutes). ``vision_attention``: the tower's attention kernel on CUDA, "flash", "auto" or "varlen"
        (``vision_attention.hold_vision_attention``)."""
        self.model = model.eval()
        self.device = next(model.parameters()).device
        batch_vision_chunks(model)
        hold_vision_attention(model, vision_attention)
        pad_mlp_widths(model.model.visual)
        embed_patches_by_matmul(model.model.visual)
        if fuse_vision if fuse_vision is not None else self.device.type == "cuda":
            fuse_elementwise(model.model.visual)
        if fuse_text if fuse_text is not None else self.device.type == "cuda":
            fuse_text_elementwise(model.model.language_model)
        self.tower_inputs = TowerInputs(model.model.visual)
        self.name = name
        self.config: Qwen2_5_VLConfig = model.config
        text = self.config.text_config
        self.dtype = next(model.parameters()).dtype
        self.kv_spec = KVSpec(
            num_layers=text.num_hidden_layers,
            num_kv_heads=text.num_key_value_heads,
            num_q_heads=text.num_attention_heads,
            head_dim=text.hidden_size // text.num_attention_heads,
            dtype=self.dtype,
        )
        vision = self.config.vision_config
        self.patch_size = vision.patch_size
        self.merge_size = vision.spatial_merge_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.tokens_per_second = float(vision.tokens_per_second)
        self.video_token_id = self.config.video_token_id
        self.tokenizer = load_qwen_tokenizer()

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        **options,
    ) -> Qwen25VLAdapter:
        """Builds a named shape preset with random weights (seeded, so runs are reproducible); ``options`` go to
        the constructor."""
        config = Qwen2_5_VLConfig(**preset_config_kwargs(name))
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                config, dtype=dtype, attn_implementation=ATTENTION_BY_PART
            )
        return cls(model, name=name, **options)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options
    ) -> Qwen25VLAdapter:
        """Loads a local Qwen2.5-VL checkpoint directory (config.json + weights); ``options`` go to the
        constructor. The layers stay transformers' own, as a preset's do: no kernels from the Hub replace them
        (``use_kernels``, on by default in transformers 5 where the ``kernels`` package is installed), so a checkpoint
        runs the same code as a preset, and loading it fetches nothing."""
        if not os.path.isdir(path):
            raise ConfigError(f"model path {str(path)!r} is not a directory with a Qwen2.5-VL checkpoint")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path,
            dtype=dtype or "auto",
            attn_implementation=ATTENTION_BY_PART,
            use_kernels=False,
        )
        return cls(model.to(device), name=str(path), **options)

    @classmethod
    def load(
        cls, name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options
    ):
        """A preset name or a checkpoint directory, whichever ``name_or_path`` is; ``options`` go to the
        constructor."""
        if name_or_path in PRESETS:
            return cls.from_preset(name_or_path, device=device, dtype=dtype or torch.float32, **options)
        return cls.from_pretrained(name_or_path, device=device, dtype=dtype, **options)

    # -- text ---------------------------------------------------------------------------------------------------
    def stream_preamble(self, system_prompt: str) -> list[int]:
        """Qwen's chat template up to the user turn's video: ``<|im_start|>system ... <|vision_start|>``."""
        return self.encode_text(chat_prefix(system_prompt) + "<|vision_start|>")

    def question_ids(self, question: str) -> list[int]:
        """Qwen's chat template after the video: the question, then the opening of the assistant turn."""
        return question_token_ids(question, self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode_tokens(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.config.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|endoftext|>")}

    # -- vision -------------------------------------------------------------------------------------------------
    def choose_geometry(self, height: int, width: int, target_tokens: int) -> VisionGeometry:
        return choose_geometry(
            height,
            width,
            target_tokens=target_tokens,
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
        )

    def largest_frame_tokens(self, target_tokens: int) -> int:
        return largest_frame_tokens(target_tokens)

    @torch.no_grad()
    def encode_frames(
        self,
        frames: np.ndarray | Sequence[np.ndarray] | UploadedFrames,
        geometry: VisionGeometry,
        *,
        before_block: Callable[[int], None] | None = None,
    ) -> FrameFeatures:
        """Runs the vision tower on ``frames``, all in one call.

        ``frames`` is ``[N, H, W, 3]`` uint8, or a sequence of ``[H, W, 3]`` frames whose sizes may differ, or
        frames already on the device (``mosaic_core.model.frame_upload``): each size is resized to ``geometry`` on
        its own, and the tower sees one batch. ``before_block(i)`` is called before the tower's block ``i`` runs.
        """
        if isinstance(frames, UploadedFrames):
            pixels = resize_groups(frames.groups, frames.num_frames, geometry)
            vision = vision_input_from_pixels(pixels, geometry, dtype=self.dtype)
        else:
            vision = frames_to_vision_input(frames, geometry, dtype=self.dtype, device=self.device)
        num_frames = vision.video_grid_thw.shape[0]
        inputs = self.tower_inputs.get(geometry, num_frames, vision.pixel_values_videos.device)
        visual = self.model.model.visual
        hooks = []
        if before_block is not None:
            hooks = [
                block.register_forward_pre_hook(lambda _module, _args, i=i: before_block(i))
                for i, block in enumerate(visual.blocks)
            ]
        try:
            merged = run_tower(visual, vision.pixel_values_videos, inputs)
        finally:
            for hook in hooks:
                hook.remove()
        embeds = merged.view(num_frames, geometry.tokens_per_frame, -1)
        return FrameFeatures(embeds=embeds, summaries=embeds.float().mean(dim=1))

    # -- positions ----------------------------------------------------------------------------------------------
    def frame_positions(self, geometry: VisionGeometry, *, base: int, offsets_s: Sequence[float]) -> np.ndarray:
        """M-RoPE ids of frames' tokens, one frame after another: ``[3, len(offsets_s) * tokens_per_frame]``, on
        the host (a batch of frames is uploaded in one copy). In NumPy, from a grid made once per frame size: an
        ingest call builds them for every stream on the engine thread, where the per-frame torch calls they took
        before showed in the service's long stretches without a chance to start a question (bench/NOTES.md,
        session 40)."""
        grid = _grid_ids(geometry.llm_grid_h, geometry.llm_grid_w)  # [2, tokens_per_frame]
        positions = np.empty((3, len(offsets_s), grid.shape[1]), dtype=np.int64)
        positions[0] = np.asarray([[base + round(s * self.tokens_per_second)] for s in offsets_s], dtype=np.int64)
        np.add(grid[:, None, :], base, out=positions[1:])
        return positions.reshape(3, -1)

    def frame_position_end(self, geometry: VisionGeometry, *, base: int, offset_s: float) -> int:
        """One past the largest position a frame uses: where text after it may start."""
        temporal = base + round(offset_s * self.tokens_per_second)
        return max(temporal, base + max(geometry.llm_grid_h, geometry.llm_grid_w) - 1) + 1

    def text_positions(self, start: int, num_tokens: int) -> torch.Tensor:
        return (torch.arange(num_tokens, device=self.device) + start).expand(3, -1)

    # -- forward ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        plan: AttentionPlan,
        frame_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One language-model pass under ``plan``; returns the final hidden states ``[B, T, hidden]``.

        ``input_ids`` hold ``<|video_pad|>`` where ``frame_embeds`` (``[num_video_tokens, hidden]``) go. The frames
        are scattered in as transformers' multimodal forward does, without its count check: that check formats and
        tests a device tensor, so the host waited there for the vision tower before it could queue the language
        model (bench/NOTES.md, session 19). The caller builds ``input_ids`` from the frames, so the counts agree.
        """
        embeds = self.embed_text(input_ids)
        if frame_embeds is not None:
            video_mask = (input_ids == self.video_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(video_mask, frame_embeds.to(embeds.dtype))
        out = self.model.model.language_model(
            input_ids=None, inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **{PLAN_KWARG: plan}
        )
        return out.last_hidden_state

    @torch.no_grad()
    def decode_forward(
        self, *, input_ids: torch.Tensor, position_ids: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """``forward`` for text tokens only, through the decoder layers directly: no video placeholders, no
        attention-mask building, and nothing that waits for the device, so a CUDA graph can capture it."""
        layers = range(self.kv_spec.num_layers)
        hidden = self.text_layers(self.embed_text(input_ids), position_ids=position_ids, plan=plan, layers=layers)
        return self.final_norm(hidden)

    @torch.no_grad()
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.language_model.embed_tokens(input_ids)

    @torch.no_grad()
    def text_layers(
        self, hidden: torch.Tensor, *, position_ids: torch.Tensor, plan: AttentionPlan, layers: range
    ) -> torch.Tensor:
        """Text hidden states ``[B, T, hidden]`` through the decoder ``layers`` only (no final norm), with no host
        synchronisation: a question's prefill runs its first layers eagerly and replays the rest from a graph."""
        text = self.model.model.language_model
        rotary = text.rotary_emb(hidden, position_ids)
        for layer in text.layers[layers.start : layers.stop]:
            hidden = layer(hidden, position_embeddings=rotary, use_cache=False, **{PLAN_KWARG: plan})
        return hidden

    @torch.no_grad()
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.language_model.norm(hidden)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


@functools.cache
def _grid_ids(grid_h: int, grid_w: int) -> np.ndarray:
    """The row and column ids ``[2, grid_h * grid_w]`` of a frame's tokens, from 0 (read-only: shared)."""
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.int64), np.arange(grid_w, dtype=np.int64), indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel()])
    grid.flags.writeable = False
    return grid
