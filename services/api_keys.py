"""The API keys a call may carry in ``x-api-key``: one fixed key (``api_key``), or every line of a file
(``api_key_file``) that is read again when it changes, so a key is rotated without a restart.

Rotation with a file: add the new key as a second line, move the clients to it, then remove the old line. A
Kubernetes Secret mounted as a volume without ``subPath`` is such a file (the kubelet swaps in a new one some time
after the Secret changes); a Secret passed as an environment variable is read once, at start.

Keys are compared in constant time, each as its SHA-256 digest, so neither a key's characters nor its length shows
in how long a refusal takes. No key ever appears in a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

from mosaic_core.errors import ConfigError

log = logging.getLogger(__name__)
# How often the key file is looked at (one stat) while calls come in; a changed file is read on the next call after.
# A call whose key matches none has it looked at again at once.
RECHECK_S = 1.0


def check_key(key: str, where: str) -> None:
    """Raises ``ValueError`` for a key no gRPC client can send: not printable ASCII, or with surrounding spaces."""
    if not (key.isascii() and key.isprintable()):
        what = "a line break or other control character" if key.isascii() else "a non-ASCII character"
        raise ValueError(f"{where} must be printable ASCII, which gRPC metadata can carry; it has {what}")
    if key != key.strip():
        raise ValueError(f"{where} starts or ends with spaces; no client would send them")


def read_key_file(path: str | os.PathLike) -> list[str]:
    """The keys of a key file: one a line, blank lines skipped, each line's end (``\\n``, ``\\r\\n``) dropped.

    Raises:
        ConfigError: the file cannot be read, holds no key, or a key no client can send (the line number is said,
            never the key).
    """
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the API key file {str(path)!r}: {err}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            check_key(line, f"line {number} of the API key file {str(path)!r}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        keys.append(line)
    if not keys:
        raise ConfigError(f"the API key file {str(path)!r} holds no key; every call would be refused")
    return keys


class ApiKeys:
    """The keys calls are checked against (thread-safe).

    Args:
        key: one fixed key.
        path: a key file (``read_key_file``), read now and again whenever its size, time or inode changes. A
            change that cannot be read, or holds no valid key, keeps the keys read before (logged).
    """

    def __init__(self, *, key: str | None = None, path: str | None = None) -> None:
        if (key is None) == (path is None):
            raise ConfigError("give the API key or the API key file, not both nor neither")
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._next_check_s = time.monotonic() + RECHECK_S
        if path is None:
            self._digests = [_digest(key)]
        else:
            self._stamp = _stamp(path)
            self._digests = [_digest(k) for k in read_key_file(path)]

    def matches(self, given: str | bytes) -> bool:
        """Whether ``given`` is one of the keys; every key is compared, in constant time. A key that matches none
        has the file looked at again first, however recently it was: a key just added is never refused."""
        self._reload_if_changed()
        digest = _digest(given)
        if self._known(digest):
            return True
        if self.path is None:
            return False
        self._reload_if_changed(now=True)
        return self._known(digest)

    def _known(self, digest: bytes) -> bool:
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def _reload_if_changed(self, *, now: bool = False) -> None:
        if self.path is None or (not now and time.monotonic() < self._next_check_s):
            return
        with self._lock:
            if not now and time.monotonic() < self._next_check_s:
                return
            self._next_check_s = time.monotonic() + RECHECK_S
            try:
                stamp = _stamp(self.path)
            except OSError as err:
                self._keep(err, stamp=None)
                return
            if stamp == self._stamp:
                return
            try:
                digests = [_digest(k) for k in read_key_file(self.path)]
            except ConfigError as err:
                self._keep(err, stamp)
                return
            self._digests, self._stamp = digests, stamp
            log.warning("API key file %s read again: %d key(s) accepted from now on", self.path, len(digests))

    def _keep(self, err: Exception, stamp: tuple[int, int, int] | None) -> None:
        """Keeps the keys read before; says so once per change of the file."""
        if stamp is not None and stamp == self._stamp:
            return
        self._stamp = stamp
        log.error("%s; the %d key(s) read before are still accepted", err, len(self._digests))


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def _stamp(path: str) -> tuple[int, int, int]:
    """What changes when the file does: a Kubernetes Secret volume swaps in a new file (a new inode)."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size
