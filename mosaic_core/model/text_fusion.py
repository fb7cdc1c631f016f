"""The language model's element-wise work, compiled for big passes only.

Ingest runs the language model over thousands of frame tokens a pass (128 frames of 128 tokens: 16,384 rows).
transformers' modules run every element-wise op of an RMSNorm (to float32, pow, mean, rsqrt, mul, back to the input
dtype, mul by the weight) and of the MLP's SiLU gate as a kernel of its own over the whole pass: on an H200 about
100 ms of a 680 ms pass. ``fuse_text_elementwise`` swaps each norm and MLP for one that, on a big pass, runs that
work as a function compiled once with ``torch.compile``; the MLP's matrix products stay in cuBLAS through its
Linear modules, and only ``silu(gate) * up`` is compiled.

A small pass (a question's prefill, a decode step) runs the same arithmetic eagerly: see ``MIN_FUSED_TOKENS``.
"""

from __future__ import annotations

import math

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm, Qwen2MLP

from mosaic_core.errors import ConfigError
from mosaic_core.model.vision_tower import _compiled, _rms_norm

# Question prefills and decode steps have far fewer rows than this and replay from CUDA graphs: there a fused
# kernel saves little, a compile for each new shape would be wasted, and a (re)compile while a graph is being
# captured would break the capture. Ingest passes have thousands of rows and run eagerly, not from graphs.
MIN_FUSED_TOKENS = 1024


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``Qwen2MLP.forward``'s element-wise part with a SiLU gate."""
    return torch.nn.functional.silu(gate) * up


def _is_big_pass(hidden: torch.Tensor, min_tokens: int) -> bool:
    """Whether ``hidden`` (``[..., hidden]``) has at least ``min_tokens`` rows and is not being captured into a
    CUDA graph."""
    if math.prod(hidden.shape[:-1]) < min_tokens:
        return False
    return not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())


class FusedTextRMSNorm(Qwen2_5_VLRMSNorm):
    norm = staticmethod(_rms_norm)  # ``fuse_text_elementwise`` sets the compiled one on the instance
    min_tokens = MIN_FUSED_TOKENS

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _is_big_pass(hidden_states, self.min_tokens):
            return _rms_norm(hidden_states, self.weight, self.variance_epsilon)
        # The compiled function sees [tokens, hidden] whatever the batch's shape: one dynamic graph serves all.
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.norm(rows, self.weight, self.variance_epsilon).reshape(hidden_states.shape)


class FusedTextMLP(Qwen2MLP):
    silu_mul = staticmethod(_silu_mul)  # ``fuse_text_elementwise`` sets the compiled one on the instance
    min_tokens = MIN_FUSED_TOKENS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [..., intermediate]
        if not _is_big_pass(x, self.min_tokens):
            return self.down_proj(_silu_mul(gate, up))
        width = gate.shape[-1]
        product = self.silu_mul(gate.reshape(-1, width), up.reshape(-1, width)).reshape(gate.shape)
        return self.down_proj(product)


def fuse_text_elementwise(
    language_model: torch.nn.Module, *, compile: bool = True, min_tokens: int = MIN_FUSED_TOKENS
) -> int:
    """Swaps the language model's RMSNorms and SiLU MLPs for ones that run their element-wise work as one compiled
    function on passes of at least ``min_tokens`` tokens; returns how many norms and MLPs were swapped.

    Only ``language_model``'s own modules are walked: the vision tower's norms are the same transformers class and
    are left as they are. ``compile`` False keeps the functions eager (the same arithmetic, unfused): what a CPU test
    can check.
    """
    if min_tokens < 2:
        # torch.compile specialises a dimension of size 1, so a one-row pass would compile a graph of its own.
        raise ConfigError(f"min_tokens must be at least 2, got {min_tokens}")
    silu = language_model.config.hidden_act == "silu"
    swapped = 0
    for module in language_model.modules():
        if type(module) is Qwen2_5_VLRMSNorm:
            module.__class__ = FusedTextRMSNorm
            if compile:
                module.norm = _compiled(_rms_norm)
        elif type(module) is Qwen2MLP and silu:
            module.__class__ = FusedTextMLP
            if compile:
                module.silu_mul = _compiled(_silu_mul)
        else:
            continue
        module.min_tokens = min_tokens
        swapped += 1
    return swapped
