"""How full the KV arena's pages are for common camera shapes: pages the size of the target against the default.

    mosaic bench pages --out FILE.json       # CPU, tiny preset, about a minute

A frame starts a page of its own and takes as many as it needs. For each camera shape and target, one engine with
pages of ``target`` tokens (the default before session 51) and one at the default (``largest_frame_tokens``) each
ingest the same frames (noise of that shape) into one stream; the clusters they hold are then read back
(``Engine.clusters``): their KV bytes against their tokens' own bytes is the share of the memory tiers that holds KV.
How many tokens a frame gets and how many pages it takes do not depend on the model's size, so the tiny preset
gives the 7B shape's fill; the bytes scale with the model's bytes per token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mosaic_core.config import MIB, EngineConfig
from mosaic_core.engine.engine import Engine
from mosaic_core.engine.results import FrameInput
from mosaic_core.model.qwen2_5_vl import Qwen25VLAdapter

# (height, width, what) of cameras people deploy
SHAPES = (
    (1080, 1920, "1080p, 16:9"),
    (720, 1280, "720p, 16:9"),
    (480, 640, "VGA, 4:3"),
    (576, 704, "PAL D1, 11:9"),
    (288, 352, "CIF, 11:9"),
    (1536, 2048, "3 MP, 4:3"),
    (272, 640, "bikes.mp4"),
)


def main_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="64,128", help="targets of tokens per frame, comma-separated")
    parser.add_argument("--frames", type=int, default=12, help="frames each engine ingests")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        args.target_list = [int(t) for t in args.targets.split(",")]
    except ValueError:
        parser.error(f"--targets {args.targets!r}: give counts of tokens, comma-separated")
    if min(args.target_list) < 1 or args.frames < 4:
        parser.error("--targets must be >= 1 and --frames >= 4 (frames must leave the window into clusters)")
    return args


def main(argv=None) -> int:
    args = main_args(argv)
    model = Qwen25VLAdapter.from_preset("tiny", device="cpu")
    rows = []
    for height, width, what in SHAPES:
        frames = np.random.default_rng(0).integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8)
        for target in args.target_list:
            row = {"shape": f"{width}x{height}", "camera": what, "target": target}
            for name, page_tokens in (("pages of the target", target), ("default pages", None)):
                row["frame_tokens"], row[name] = _held(model, frames, target, page_tokens)
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"bytes_per_token": model.kv_spec.bytes_per_token, "rows": rows}, indent=2))
    print(f"written {args.out}", file=sys.stderr)
    return 0


def _held(model, frames: np.ndarray, target: int, page_tokens: int | None) -> tuple[int, dict]:
    """A frame's tokens, and what one stream's clusters hold after ``frames``: their tokens, their bytes in the
    memory tiers, the engine's page."""
    config = EngineConfig(
        target_tokens_per_frame=target,
        page_tokens=page_tokens,
        local_window_tokens=2 * target,  # all but the last frames leave the window into clusters
        retrieval_budget_tokens=2048,  # formation.max_tokens: a cluster fits one retrieval
        device_budget_bytes=256 * MIB,
    )
    engine = Engine(model, config)
    engine.open_stream("cam")
    for i in range(0, len(frames), 4):
        engine.ingest([FrameInput("cam", float(i + k), rgb) for k, rgb in enumerate(frames[i : i + 4])])
    clusters = engine.clusters("cam")
    tokens = sum(c.num_tokens for c in clusters)
    num_bytes = sum(c.num_bytes for c in clusters)
    return engine.stream("cam").geometry.tokens_per_frame, {
        "page_tokens": engine.tiering.tiers.page_tokens,
        "tokens": tokens,
        "bytes": num_bytes,
        "fill": tokens * model.kv_spec.bytes_per_token / num_bytes,
    }


def _line(row: dict) -> str:
    before, now = row["pages of the target"], row["default pages"]
    return (
        f"{row['shape']:>9} ({row['camera']}) at {row['target']}: {row['frame_tokens']} tokens a frame; "
        f"pages of {before['page_tokens']}: {before['fill']:.1%} full, of {now['page_tokens']}: {now['fill']:.1%} full"
    )


if __name__ == "__main__":
    sys.exit(main())
