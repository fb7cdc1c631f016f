"""The operator console in a real browser: headless Chromium against the shared e2e server's console.

Two cameras pull sample clips; Chromium loads the console over HTTPS, is asked for the API key once, shows both
camera tiles, asks a question, and must show the streamed answer, its timings and at least one evidence
thumbnail that decodes. The screenshot stays in the test's tmp dir (its path is printed; set
MOSAIC_CONSOLE_SCREENSHOT=FILE to also copy it there, as docs/console.png was made).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import urllib.error
import urllib.request

import pytest
from chromium_support import Chromium, find_chromium
from service_support import API_KEY, wait_ingested

from mosaic_core.model.video import sample_clip_path

CAMERAS = {"console-bikes": "bikes.mp4", "console-phone": "carphone_pristine.mp4"}
ASKED = "console-bikes"
QUESTION = "What is moving, and when?"
PAGE_TIMEOUT_S = 90.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def console(service, client):
    if not service.server.console_port:
        pytest.fail("the shared e2e server runs without its console (tests/e2e/conftest.py turns it on)")
    for stream_id, clip in CAMERAS.items():
        client.create_stream(stream_id, fps=2.0, source_url=sample_clip_path(clip), loop_source=True)
    for stream_id in CAMERAS:
        wait_ingested(client, stream_id, 10)
    yield f"https://127.0.0.1:{service.server.console_port}"
    for stream_id in CAMERAS:
        client.delete_stream(stream_id)


def _get(url: str, ca_path: str, headers: dict) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=ca_path)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_console_api_needs_the_key_and_answers_with_the_grpc_sentence(console, service):
    status, body = _get(f"{console}/api/streams", service.tls_ca_path, {})
    assert status == 401 and body["code"] == "UNAUTHENTICATED"
    assert "x-api-key metadata header is missing" in body["message"]  # the gRPC interceptor's own sentence
    status, body = _get(f"{console}/api/streams", service.tls_ca_path, {"X-API-Key": API_KEY})
    assert status == 200 and set(CAMERAS) <= {s["stream_id"] for s in body["streams"]}
    status, body = _get(f"{console}/api/keyframes?stream_id=no-such-cam&latest=1", service.tls_ca_path,
                        {"X-API-Key": API_KEY})  # fmt: skip
    assert status == 404 and body["code"] == "NOT_FOUND"


def test_browser_asks_a_question_and_shows_the_answer_with_evidence_thumbnails(console, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.fail("chromium is not installed; scripts/setup.sh installs Debian's package as root")
    (tmp_path / "profile").mkdir()
    screenshot = asyncio.run(_drive(chromium, console, tmp_path))
    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
    print(f"console screenshot: {screenshot}")
    if target := os.environ.get("MOSAIC_CONSOLE_SCREENSHOT"):
        shutil.copyfile(screenshot, target)


async def _drive(binary: str, url: str, tmp_path):
    async with Chromium(binary, tmp_path / "profile") as page:
        await page.navigate(url + "/")
        await page.wait_for("!document.getElementById('key-form').hidden", timeout_s=30, what="the key prompt")
        await page.evaluate(
            f"document.getElementById('key-input').value = {json.dumps(API_KEY)};"
            "document.getElementById('key-form').requestSubmit(); true"
        )
        tiles = "[...document.querySelectorAll('#cameras .camera .name')].map(n => n.firstChild.textContent)"
        await page.wait_for(
            f"{json.dumps(sorted(CAMERAS))}.every(id => {tiles}.includes(id))", timeout_s=30, what="both camera tiles"
        )
        await page.wait_for(
            "document.querySelectorAll('#cameras img').length >= 2", timeout_s=PAGE_TIMEOUT_S,
            what="a keyframe on each camera tile",
        )  # fmt: skip
        assert API_KEY not in await page.evaluate("location.href")
        await page.evaluate(
            f"document.getElementById('ask-streams').value = {json.dumps(ASKED)};"
            f"document.getElementById('ask-question').value = {json.dumps(QUESTION)};"
            "document.getElementById('ask-form').requestSubmit(); true"
        )
        timings = await page.wait_for(
            "(t => t.includes('first token') && t)(document.getElementById('timings').textContent)",
            timeout_s=PAGE_TIMEOUT_S, what="the answer's timings (its last event)",
        )  # fmt: skip
        answer = await page.evaluate("document.getElementById('answer').textContent")
        assert answer.strip(), f"no answer text; timings line: {timings}"
        thumbs = await page.wait_for(
            "(imgs => imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) && imgs.length)"
            "([...document.querySelectorAll('#evidence img.thumb')])",
            timeout_s=30, what="evidence thumbnails that decode",
        )  # fmt: skip
        assert thumbs >= 1
        rows = await page.evaluate(
            "[...document.querySelectorAll('#evidence .evidence-row .name')].map(n => n.textContent)"
        )
        assert rows == [ASKED]
        return await page.screenshot(tmp_path / "console.png")
