"""Vision-tower attention over equal-sized chunks in one batched call.

Without flash-attention, transformers' Qwen2.5-VL vision attention runs SDPA once per ``cu_seqlens`` chunk: once
per window in the windowed layers (8 windows per 224x448 frame, so 256 calls per layer for a batch of 32 frames)
and once per frame in the full-attention layers. Chunks are independent attention problems, so all chunks of
one length can share one SDPA over ``[num_chunks, heads, length, head_dim]`` and compute exactly the same thing.
Frames whose size is a whole number of windows have one length only (one call, no gather); other sizes have a
few (edge windows), each gathered by index, attended in one call and scattered back. Query and key get their
rotary embedding together, stacked: the same float32 arithmetic as transformers', in half the kernels.

Which attention kernel: on CUDA, ``hold_vision_attention(model, "flash")`` (the adapter's default) holds the chunks'
SDPA to FlashAttention, then the memory-efficient kernel where Flash does not take the input. Left to PyTorch's
pick on an H200 (torch 2.11), the first call of each new batch size took 54-85 ms more than a repeat, like
cuDNN's attention held on its own (122-124 ms), and Flash's none, at the same speed per call (bench/NOTES.md,
session 24). An ingest call's batch size changes with the frames waiting, so those first calls recur in the
service.

``hold_vision_attention(model, "varlen")`` holds the single-length calls to Flash as "flash" does, and on CUDA, in
half precision, sends chunks of several lengths (the edge windows of a frame that is not a whole number of windows,
as the service's 196x504 frames are not) to one variable-length FlashAttention call over ``cu_seqlens``
(``torch.nn.attention.varlen``) instead of a gather, an SDPA and a scatter per length: a few launches a block in place
of about 24 for four lengths. On the H200, 128 such frames went through the tower in 240 ms against 253, and in
the service at 150 cameras the engine thread's stretches without a chance to start a question fell by four fifths
(bench/NOTES.md, session 26).

Which rotary runs where: on CUDA tensors, when the Triton kernels can run (``kernels_ready()``; with a CUDA device
that means triton is installed), the Triton kernel ``kernels.vision_rotary`` reads query and key in place from
the qkv projection's output in one launch. Everywhere else (CPU tensors, or CUDA without triton) the attention's
``rotate`` runs: ``_rotate`` eagerly, or the ``torch.compile``d ``_rotate`` that ``vision_tower.fuse_elementwise``
sets.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    rotate_half,
)

from mosaic_core.kernels import kernels_ready
from mosaic_core.memory.transfer import upload

# The tower passes the same two cu_seqlens tensors (windows, frames) to every block of one forward pass, and
# ``vision_tower.TowerInputs`` hands out the same tensors again for every batch of one frame grid and size (on one
# stream), so their chunk plans are built once per grid and batch size, not once per block or per call. ``TowerInputs``
# registers each plan from the host's copy of the bounds as it makes the tensors (``remember_plan``): built from the
# device tensor, a plan would read the bounds back, a wait for everything queued before it, the previous ingest
# call's language model included. The plans of every input ``TowerInputs`` keeps (two each) are kept, the least
# recently used dropped.
_recent_plans: list[tuple[torch.Tensor, list[tuple[int, torch.Tensor | None]]]] = []
MAX_PLANS = 32


def _rotate(query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb_vision`` on ``[2, seq, heads, head_dim]`` query and key at once."""
    rotated = query_key.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((rotated * cos) + (rotate_half(rotated) * sin)).to(query_key.dtype)


class BatchedChunkAttention(Qwen2_5_VLVisionAttention):
    """``Qwen2_5_VLVisionAttention`` whose equal-length chunks share one SDPA call."""

    # Where the Triton kernel does not run; ``vision_tower.fuse_elementwise`` sets the compiled one on the instance.
    rotate = staticmethod(_rotate)
    # SDPA backends the chunks are held to on CUDA, in order of preference (None: PyTorch picks); set per instance
    # by ``hold_vision_attention``.
    cuda_backends: list[SDPBackend] | None = None
    # Chunks of several lengths in one variable-length Flash call on CUDA (half precision); set per instance by
    # ``hold_vision_attention``.
    varlen: bool = False

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        if self.config._attn_implementation != "sdpa" or position_embeddings is None:
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3)
        query, key = self._rotated(qkv[:2], *position_embeddings).unbind(0)  # each [seq, heads, head_dim]
        value = qkv[2]
        groups = _chunk_plan(cu_seqlens)
        if self.varlen and len(groups) > 1 and _varlen_takes(query, self.scaling):
            out = _attend_varlen(query, key, value, cu_seqlens, max(length for length, _ in groups))
            return self.proj(out.reshape(seq_length, -1))
        held = sdpa_kernel(self.cuda_backends) if self.cuda_backends and query.is_cuda else contextlib.nullcontext()
        with held:
            if len(groups) == 1 and groups[0][1] is None:
                out = self._attend_chunks(query, key, value, groups[0][0])
            else:
                out = torch.empty_like(query)
                for length, index in groups:
                    out[index] = self._attend_chunks(query[index], key[index], value[index], length)
        return self.proj(out.reshape(seq_length, -1))

    def _rotated(self, query_key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Query and key (``[2, seq, heads, head_dim]``, a view of the qkv output) with their rotary embedding."""
        if query_key.is_cuda and kernels_ready():
            # Imported here: the kernel module imports triton, which a CPU-only install may lack.
            from mosaic_core.kernels.vision_rotary import vision_rotary

            return vision_rotary(query_key, cos, sin)
        return self.rotate(query_key, cos, sin)

    def _attend_chunks(self, query, key, value, length: int) -> torch.Tensor:
        """Attention within consecutive chunks of ``length`` tokens; ``[tokens, heads, head_dim]`` in and out."""

        def by_chunk(t: torch.Tensor) -> torch.Tensor:  # [chunks, heads, length, head_dim]
            return t.reshape(-1, length, self.num_heads, t.shape[-1]).transpose(1, 2)

        out = F.scaled_dot_product_attention(by_chunk(query), by_chunk(key), by_chunk(value), scale=self.scaling)
        return out.transpose(1, 2).reshape(query.shape)


_FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
VISION_ATTENTION_BACKENDS = {"flash": _FLASH_FIRST, "auto": None, "varlen": _FLASH_FIRST}


def _varlen_takes(query: torch.Tensor, scaling: float) -> bool:
    """Whether the variable-length Flash call runs ``query``: CUDA, half precision, the default softmax scale."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and abs(scaling - query.shape[-1] ** -0.5) < 1e-9
    )


def _attend_varlen(query, key, value, cu_seqlens: torch.Tensor, max_length: int) -> torch.Tensor:
    """Attention within each ``cu_seqlens`` chunk of ``[tokens, heads, head_dim]`` query, key and value, in one
    variable-length FlashAttention call."""
    from torch.nn.attention.varlen import varlen_attn

    bounds = cu_seqlens.to(torch.int32)
    return varlen_attn(query, key, value.contiguous(), bounds, bounds, max_length, max_length)


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def hold_vision_attention(model: torch.nn.Module, choice: str) -> int:
    """Holds every batched vision attention of ``model`` to ``VISION_ATTENTION_BACKENDS[choice]`` on CUDA ("auto":
    PyTorch picks per call; "varlen": as "flash", with chunks of several lengths in one variable-length call);
    returns how many. The CPU is never held."""
    if choice not in VISION_ATTENTION_BACKENDS:
        raise ValueError(f"vision attention {choice!r} is not one of {sorted(VISION_ATTENTION_BACKENDS)}")
    if choice == "varlen" and not varlen_available():
        raise ValueError(
            f"vision attention 'varlen' needs torch.nn.attention.varlen, which torch {torch.__version__} lacks: "
            "choose 'flash'"
        )
    held = 0
    for module in model.modules():
        if isinstance(module, BatchedChunkAttention):
            module.cuda_backends = VISION_ATTENTION_BACKENDS[choice]
            module.varlen = choice == "varlen"
            held += 1
    return held


def batch_vision_chunks(model: torch.nn.Module) -> int:
    """Switches every vision attention of ``model`` to the batched forward; returns how many."""
    switched = 0
    for module in model.modules():
        if type(module) is Qwen2_5_VLVisionAttention:
            module.__class__ = BatchedChunkAttention
            switched += 1
    return switched


def _chunk_plan(cu_seqlens: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """``(length, token index)`` per distinct chunk length; the index is None when every chunk has one length."""
    for i, (tensor, plan) in enumerate(_recent_plans):
        if tensor is cu_seqlens:
            _recent_plans.insert(0, _recent_plans.pop(i))
            return plan
    return remember_plan(cu_seqlens, cu_seqlens.tolist())  # reads the bounds back: the tower was not given them


def remember_plan(cu_seqlens: torch.Tensor, bounds: list[int]) -> list[tuple[int, torch.Tensor | None]]:
    """Builds and keeps the chunk plan of ``cu_seqlens`` from ``bounds``, its values on the host; returns it."""
    starts_by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    if len(starts_by_length) == 1:
        plan = [(next(iter(starts_by_length)), None)]
    else:
        plan = [
            (length, upload((np.asarray(starts)[:, None] + np.arange(length)).ravel(), torch.long, cu_seqlens.device))
            for length, starts in starts_by_length.items()
        ]
    _recent_plans.insert(0, (cu_seqlens, plan))
    del _recent_plans[MAX_PLANS:]
    return plan
