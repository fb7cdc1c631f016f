"""What the engine needs from a vision-language model: the ``VlmAdapter`` protocol.

The engine never names an architecture. An adapter turns text and frames into token ids, vision embeddings and
explicit position ids, runs the language model with an ``AttentionPlan`` that decides which KV each layer sees,
and supplies its own chat template pieces. ``Qwen25VLAdapter`` is the first implementation; a LLaVA-OneVision
adapter would implement the same members and nothing in the engine or the cache would change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from mosaic_core.memory.layout import KVSpec
from mosaic_core.model.geometry import VisionGeometry


@runtime_checkable
class VlmAdapter(Protocol):
    """A loaded VLM, as the engine uses it.

    Attributes:
        kv_spec: the language model's KV geometry.
        device: where the model runs.
        video_token_id: the placeholder id of a visual token in ``forward``'s ``input_ids``.
        eos_token_ids: ids that end an answer.
    """

    kv_spec: KVSpec
    device: torch.device
    video_token_id: int

    @property
    def eos_token_ids(self) -> set[int]: ...

    # -- text and the chat template ------------------------------------------------------------------------
    def stream_preamble(self, system_prompt: str) -> list[int]:
        """Token ids a stream starts with: the chat text up to where its frames begin (the attention sink)."""
        ...

    def question_ids(self, question: str) -> list[int]:
        """Token ids of a question asked after the frames, up to where the answer begins."""
        ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode_tokens(self, token_ids: list[int]) -> str: ...

    # -- frames and positions ------------------------------------------------------------------------------
    def choose_geometry(self, height: int, width: int, target_tokens: int) -> VisionGeometry: ...

    def largest_frame_tokens(self, target_tokens: int) -> int:
        """The most tokens ``choose_geometry`` gives a frame of any size at ``target_tokens``."""
        ...

    def encode_frames(self, frames, geometry: VisionGeometry, *, before_block=None):
        """The vision tower over ``frames``: a ``[N, H, W, 3]`` uint8 array, a sequence of ``[H, W, 3]`` frames of
        any sizes, or ``mosaic_core.model.frame_upload.UploadedFrames``; returns their embeddings and summaries.
        ``before_block(i)``, when given, is called before the tower's block ``i`` runs (its kernels queued)."""
        ...

    def frame_positions(self, geometry: VisionGeometry, *, base: int, offsets_s: Sequence[float]) -> np.ndarray:
        """Position ids ``[3, len(offsets_s) * tokens_per_frame]`` (int64, on the host) of the tokens of a stream's
        frames, one after another, each ``offsets_s[i]`` seconds after the stream's first frame."""
        ...

    def frame_position_end(self, geometry: VisionGeometry, *, base: int, offset_s: float) -> int: ...

    def text_positions(self, start: int, num_tokens: int) -> torch.Tensor: ...

    # -- the language model --------------------------------------------------------------------------------
    def forward(self, *, input_ids: torch.Tensor, position_ids: torch.Tensor, plan, frame_embeds=None): ...

    def decode_forward(self, *, input_ids: torch.Tensor, position_ids: torch.Tensor, plan) -> torch.Tensor:
        """``forward`` for text tokens, with no host synchronisation (CUDA graphs capture it)."""
        ...

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[B, T, hidden]`` of text token ids ``[B, T]``."""
        ...

    def text_layers(self, hidden: torch.Tensor, *, position_ids: torch.Tensor, plan, layers: range) -> torch.Tensor:
        """``hidden`` through the decoder ``layers`` only, without the final norm and with no host
        synchronisation: ``decode_forward`` is ``final_norm(text_layers(embed_text(ids), all layers))``."""
        ...

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
