"""Headless Chromium (Debian's ``chromium`` package) started by a test and driven over the DevTools protocol.

No Selenium or Playwright: the browser is started with ``--remote-debugging-port=0``, its port is read from
the ``DevToolsActivePort`` file it writes into its profile folder, and the page is driven with a few protocol
commands over aiohttp's websocket client. Every wait is bounded; the browser is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser")
START_TIMEOUT_S = 30.0


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class Chromium:
    """One headless browser with one page; use as ``async with Chromium(binary, profile_dir) as page``.

    Args:
        binary: the chromium executable.
        profile_dir: an empty folder for the browser's profile (the test's tmp dir).
        width, height: the window size, which screenshots have.
    """

    def __init__(self, binary: str, profile_dir: Path, *, width: int = 1280, height: int = 900) -> None:
        self.profile_dir = profile_dir
        args = [
            binary,
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile_dir}",
            f"--window-size={width},{height}",
            "--ignore-certificate-errors",  # the e2e server's certificate is self-signed
            "--no-first-run",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
        ]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI runs as root)
        self.log_path = profile_dir / "chromium.log"
        self._log = self.log_path.open("wb")
        # Its own process group, so that its renderer and helper processes can be stopped with it, by its id.
        self.process = subprocess.Popen(
            [*args, "about:blank"], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Chromium:
        try:
            port = self._wait_for_port()
            self._http = aiohttp.ClientSession()
            async with self._http.get(f"http://127.0.0.1:{port}/json/list", timeout=_timeout(10)) as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _wait_for_port(self) -> int:
        marker = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited with {self.process.returncode}: {tail}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no DevToolsActivePort within {START_TIMEOUT_S}s")

    async def send(self, method: str, timeout_s: float = 30.0, **params) -> dict:
        """One DevTools command; its result (events arriving meanwhile are skipped)."""
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self._ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"the DevTools connection closed ({message.type.name})")
                reply = json.loads(message.data)
                if reply.get("id") == call_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method} failed: {reply['error']}")
                    return reply["result"]

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout_s: float, what: str, interval_s: float = 0.25):
        """Polls ``expression`` until it is truthy; returns its value. While the page loads, the expression may
        raise (its elements do not exist yet): that counts as not yet, and the last error is reported on timeout."""
        deadline = time.monotonic() + timeout_s
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as err:
                value, last_error = None, err
            if value:
                return value
            await asyncio.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_error})")

    async def navigate(self, url: str) -> None:
        await self.send("Page.enable")
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self.process.poll() is None:
            self.process.terminate()  # by PID: this browser only
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # helpers the browser left behind, in its own group
        self._log.close()


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)
