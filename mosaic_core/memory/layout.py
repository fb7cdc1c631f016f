"""The shape of one model's KV cache, and the sizes derived from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class KVSpec:
    """Per-model KV geometry. Every cluster, window and sink is laid out as

    ``[num_layers, 2 (key, value), num_kv_heads, num_tokens, head_dim]``

    so one layer of one cluster is a contiguous slab: a layer's keys and values move in one copy.
    """

    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_token_layer

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5
