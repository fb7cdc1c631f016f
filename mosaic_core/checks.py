"""Checks of what a user typed, made before anything slow starts: a video, a model, a device.

Each check answers with a sentence that names the problem (or raises one); nothing here imports torch except
``device_problem``, so ``mosaic serve``'s preflight and the engine commands can run them in milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mosaic_core.errors import NotFoundError

# A checkpoint directory needs its config and its weights in one of these layouts.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_video(source: str) -> str:
    """A path, URL or sample clip name as something FFmpeg can open.

    Raises:
        NotFoundError: a path that does not exist, or a bare name that is neither a file here nor a sample
            clip (the two say different things).
    """
    if "://" in source or os.path.exists(source):
        return source
    from mosaic_core.model.video import sample_clip_path

    if os.sep in source or (os.altsep and os.altsep in source):
        raise NotFoundError(f"Video file {source!r} does not exist.")
    try:
        return sample_clip_path(source)
    except NotFoundError as error:
        raise NotFoundError(
            f"No file named {source!r} here, and it is not a sample clip name either ({_after_colon(error)})."
        ) from None


def _after_colon(error: Exception) -> str:
    text = str(error).rstrip(".").replace("available:", "sample clips:")
    return text.split("; ", 1)[1] if "; " in text else text


def model_problem(name_or_path: str) -> str | None:
    """Why ``name_or_path`` is neither a preset nor a loadable checkpoint directory, or ``None`` if it is one.

    Cheap (no torch): it looks for the files ``from_pretrained`` needs, and names the missing ones.
    """
    from mosaic_core.model.presets import PRESETS

    if name_or_path in PRESETS:
        return None
    path = Path(name_or_path).expanduser()
    presets = ", ".join(PRESETS)
    if not path.exists():
        return f"model {name_or_path!r} is neither a preset ({presets}) nor an existing checkpoint directory"
    if not path.is_dir():
        return f"model path {name_or_path!r} is a file; give the checkpoint's directory or a preset ({presets})"
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    weights = [name for name in _WEIGHT_FILES if (path / name).is_file()] or sorted(
        p.name for p in path.glob("*.safetensors")
    )
    if not weights:
        missing.append("the weights (model.safetensors, model-0000N-of-0000M.safetensors with its index, or "
                       "pytorch_model.bin)")  # fmt: skip
    for index in (w for w in weights if w.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            missing.append(f"a readable {index}")
            continue
        absent = [shard for shard in shards if not (path / shard).is_file()]
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            missing.append(f"{len(absent)} of the {len(shards)} shards {index} lists ({', '.join(absent[:3])}{more})")
    if missing:
        listed = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        return f"checkpoint directory {str(path)!r} is missing {listed}"
    return None


def device_problem(device: str | None) -> str | None:
    """Why the torch ``device`` cannot be used here, or ``None`` (imports torch)."""
    if not device or device == "cpu":
        return None
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"device {device!r} is not available: this torch build sees no CUDA GPU; pass --device cpu"
    if device.startswith("cuda:") and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        return f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)"
    return None
