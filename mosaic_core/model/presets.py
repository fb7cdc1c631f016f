"""Named shape presets: real architectures with random weights, since no weights can be downloaded.

``tiny`` runs in seconds on a CPU and is what the tests and the demo use. ``qwen2.5-vl-7b`` is the real
Qwen2.5-VL-7B-Instruct shape (its published config, written out here because there is no hub access), used by the
GPU benchmarks. A real checkpoint directory is loaded with ``from_pretrained`` instead (see ``qwen2_5_vl.py``).
"""

from __future__ import annotations

import copy
from typing import Any

from mosaic_core.errors import ConfigError

QWEN_SPECIAL_IDS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}

_TINY: dict[str, Any] = {
    "vision_config": {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": 128,
        "fullatt_block_indexes": [1],
        "window_size": 112,
        "tokens_per_second": 2,
    },
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        "tie_word_embeddings": True,
    },
    "tie_word_embeddings": True,
}

# Qwen/Qwen2.5-VL-7B-Instruct config.json, as published.
_QWEN25_VL_7B: dict[str, Any] = {
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "window_size": 112,
        "tokens_per_second": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "silu",
    },
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
    },
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "qwen2.5-vl-7b": _QWEN25_VL_7B}


def preset_config_kwargs(name: str) -> dict[str, Any]:
    """Returns the ``Qwen2_5_VLConfig`` keyword arguments of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets are: {', '.join(sorted(PRESETS))}")
    preset = copy.deepcopy(PRESETS[name])
    preset["text_config"].update(QWEN_SPECIAL_IDS)
    return {**preset, **QWEN_SPECIAL_IDS}
