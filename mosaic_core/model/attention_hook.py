"""The one place where Mosaic takes over a transformers model's attention.

transformers resolves each attention layer's kernel through ``AttentionInterface`` by name. Mosaic registers
``"mosaic"`` and builds the language model with it, so every decoder layer calls ``mosaic_attention`` with the
layer's post-RoPE queries, keys and values. The engine passes an ``AttentionPlan`` through the forward call's
keyword arguments (they reach the attention function untouched); the plan decides which KV each layer sees:
sink + retrieved clusters + local window + the new tokens. Nothing about a stream is stored on the shared model.

This is the hook the ``Cache``/``CacheLayerMixin`` API cannot give: a cache only sees keys and values, while
scoring clusters needs the question's queries, layer by layer.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import AttentionInterface

MOSAIC_ATTENTION = "mosaic"
PLAN_KWARG = "mosaic_plan"


class AttentionPlan(Protocol):
    """Decides, for one forward pass, what each layer attends to and what it keeps."""

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention for one layer.

        Args:
            layer_idx: decoder layer index.
            query: ``[batch, num_q_heads, new_tokens, head_dim]``, post-RoPE.
            key: ``[batch, num_kv_heads, new_tokens, head_dim]``, post-RoPE, for the new tokens only.
            value: ``[batch, num_kv_heads, new_tokens, head_dim]``.
            scale: softmax scale.

        Returns:
            ``[batch, new_tokens, num_q_heads, head_dim]``, the layout transformers expects back.
        """
        ...


def mosaic_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan: AttentionPlan | None = kwargs.get(PLAN_KWARG)
    if plan is None:
        raise RuntimeError(
            "the Mosaic attention was called without an attention plan; run the model through the engine"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return plan.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(MOSAIC_ATTENTION, mosaic_attention)
