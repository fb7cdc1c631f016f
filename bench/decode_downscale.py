"""What scaling frames down as they are decoded costs the decoder and saves downstream, on the CPU.

    python -m bench.decode_downscale [--cap 401408] --out FILE.json

- A pulled 720p source: the first 8 frames of bigbuckbunny.mp4 (1280x720) at 1 fps, through ``iter_video_frames``
  with and without the cap (the time includes decoding the frames between the sampled ones, as a source's child
  process pays it).
- Pushed JPEGs of 1080p and 4K: a frame of that clip resized up and encoded, decoded by ``decode_frame`` as the router
  does, with and without the cap.
- Downstream, per frame: its bytes (what the decoder's pipe or Ray carries), and the copy of a call of 100 such frames
  into one buffer, what the worker's engine thread does before uploading them (``FrameStaging``; pinned memory on a
  GPU host, plain memory here).
- The pushed JPEGs decoded alone at full, half and quarter size (FFmpeg's ``lowres`` 0, 1, 2), without conversion to
  RGB: what ``frames.decode_image`` chooses between.

Medians of 5 rounds, alternating with and without the cap.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mosaic_core.model.geometry import model_pixels
from mosaic_core.model.video import iter_video_frames, sample_clip_path
from services.frames import decode_frame, decode_picture, encode_image
from services.gen.mosaic.v1 import mosaic_pb2 as pb

ROUNDS, CALL_FRAMES = 5, 100


def _median_ms(run, rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _copy_call_ms(frame: np.ndarray) -> float:
    """A call of ``CALL_FRAMES`` copies of ``frame`` into one buffer, as the engine thread stages a call."""
    buffer = np.empty((CALL_FRAMES, *frame.shape), dtype=np.uint8)

    def copy() -> None:
        for k in range(CALL_FRAMES):
            buffer[k] = frame

    return _median_ms(copy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_downscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap", type=int, default=4 * model_pixels(128), help="pixels a frame keeps at most")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    clip = sample_clip_path("bigbuckbunny.mp4")
    rows = []

    def sampled(cap):
        return [f.rgb for f in itertools.islice(iter_video_frames(clip, fps=1.0, max_pixels=cap), 8)]

    first = sampled(None)[0]
    lowres = {}  # pushed size -> ms to decode its JPEG alone, by lowres
    for cap in (None, args.cap):
        frames = sampled(cap)
        rows.append({"source": "pulled 720p clip, 8 frames at 1 fps", "cap": cap, "shape": list(frames[0].shape),
                     "bytes": frames[0].nbytes, "decode_ms_per_frame": _median_ms(lambda c=cap: sampled(c)) / 8,
                     "engine_copy_ms_per_call": _copy_call_ms(frames[0])})  # fmt: skip
    for height, width in ((1080, 1920), (2160, 3840)):
        pixels = torch.from_numpy(first).permute(2, 0, 1)[None].float()
        upscaled = F.interpolate(pixels, size=(height, width), mode="bilinear")[0].permute(1, 2, 0)
        upscaled = upscaled.round().clamp(0, 255).to(torch.uint8).numpy()
        message = pb.Frame(stream_id="cam", timestamp_s=0.0, encoded=encode_image(upscaled))
        lowres[f"{width}x{height}"] = {
            k: _median_ms(lambda k=k, j=message.encoded: decode_picture("mjpeg", j, k)) for k in (0, 1, 2)
        }
        for cap in (None, args.cap):
            rgb = decode_frame(message, cap)
            rows.append({"source": f"pushed {width}x{height} JPEG ({len(message.encoded)} bytes)", "cap": cap,
                         "shape": list(rgb.shape), "bytes": rgb.nbytes,
                         "decode_ms_per_frame": _median_ms(lambda c=cap, m=message: decode_frame(m, c)),
                         "engine_copy_ms_per_call": _copy_call_ms(rgb)})  # fmt: skip
    lines = [f"cap {args.cap:,} pixels; medians of {ROUNDS}; engine copy: a call of {CALL_FRAMES} frames"]
    lines.append(f"{'source':<40} {'cap':>8} {'shape':>16} {'MB':>6} {'decode ms/frame':>16} {'copy ms/call':>13}")
    for r in rows:
        lines.append(
            f"{r['source']:<40} {'yes' if r['cap'] else 'no':>8} {'x'.join(map(str, r['shape'])):>16} "
            f"{r['bytes'] / 1e6:>6.2f} {r['decode_ms_per_frame']:>16.2f} {r['engine_copy_ms_per_call']:>13.1f}"
        )
    lines.append("JPEG decoding alone, ms, at lowres 0 / 1 / 2 (full, half, quarter size):")
    lines += [f"  {size}: " + " / ".join(f"{ms:.2f}" for ms in by_k.values()) for size, by_k in lowres.items()]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(
        json.dumps({"cap": args.cap, "rows": rows, "jpeg_decode_ms_by_lowres": lowres}, indent=2) + "\n"
    )
    args.out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
