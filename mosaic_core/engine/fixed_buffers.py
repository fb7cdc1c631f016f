"""What the fixed-buffer plans of a question prefill (the anchor pieces and the chain of later layers) share.

A CUDA graph replays fixed addresses, so each such plan keeps its inputs in buffers that outlive the pass and loads
one question's values into them before a replay: where each question token's KV goes, and the slot table a layer
reads with its length. Each layer writes its new KV there and attends in place.
"""

from __future__ import annotations

import numpy as np
import torch

from mosaic_core.engine.attend import attend_paged


def load_write_index(write_index: torch.Tensor, pools, plan) -> None:
    """Fills ``write_index`` ``[2, T]`` with the pages and offsets of the question's first ``T`` slots."""
    slots = plan.question_slots_np[: write_index.shape[1]]
    write_index.copy_(pools.upload(np.stack([slots // pools.page_tokens, slots % pools.page_tokens])))


def load_table(table: torch.Tensor, kv_len: torch.Tensor, plan, layer: int, tokens: int) -> None:
    """Fills ``table`` ``[1, width]`` with ``layer``'s slot table as the question plan built it (-1 after it), and
    ``kv_len`` with the slots the padded question of ``tokens`` reads."""
    built = plan.tables[layer]
    if built.shape[1] > table.shape[1]:
        raise RuntimeError(
            f"layer {layer}'s table has {built.shape[1]} slots, more than the {table.shape[1]} its graphs were "
            "captured for: a choice exceeded the retrieval budget"
        )
    table.fill_(-1)
    table[:, : built.shape[1]].copy_(built)
    kv_len.fill_(plan.static_tokens[layer] + tokens)


def write_and_attend(pools, layer_idx, query, key, value, write_index, table, kv_len, scale):
    """Writes the question's new KV (``key``, ``value`` ``[1, H, T, D]``) at ``write_index``, then attends in place
    over ``table``."""
    kv = torch.stack([key[0], value[0]]).permute(2, 0, 1, 3)  # [T, 2, H, D]
    pools.write_slots(layer_idx, (write_index[0], write_index[1]), kv)
    k_pages, v_pages = pools.layer_pages(layer_idx)
    return attend_paged(query, k_pages, v_pages, table, kv_len, scale)
