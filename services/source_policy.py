"""What a stream's ``source_url`` may name on this server (``check_source_url``, ``SourcePolicy``), checked at
CreateStream: a URL whose scheme is on the allow-list (default ``rtsp``, ``rtsps``, ``http``, ``https``) and whose
host is not written as an address in a blocked network (``services.source_hosts``), or the path of a file under one
of the configured source roots (none by default: no local files). Everything else (``file://``, ``concat:``,
``data:``, ``tcp://``, ``ftp://``, a path outside the roots, a missing file under a root) is refused with one sentence
that does not say whether a path exists. The readers that open the sources are in ``services.sources``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from mosaic_core.errors import ConfigError, InvalidArgumentError
from mosaic_core.model.video_sources import PROTOCOLS_BY_SCHEME, source_scheme
from services.source_hosts import DEFAULT_BLOCKED_NETWORKS, Network, literal_refusal, parse_networks
from services.url_text import without_credentials

DEFAULT_SOURCE_SCHEMES = ("rtsp", "rtsps", "http", "https")
SUPPORTED_SOURCE_SCHEMES = tuple(s for s in PROTOCOLS_BY_SCHEME if s != "file")
_MAX_URL_CHARS = 2048
DEFAULT_BLOCKED = parse_networks(DEFAULT_BLOCKED_NETWORKS)  # the networks a source may not reach, parsed


def check_source_schemes(schemes: Iterable[str]) -> tuple[str, ...]:
    """Validates an allow-list of source schemes (config); returns it in lower case.

    Raises:
        ConfigError: a scheme the video reader cannot open (the message lists the supported ones).
    """
    out = tuple(str(s).lower().removesuffix("://") for s in schemes)
    unknown = [s for s in out if s not in SUPPORTED_SOURCE_SCHEMES]
    if unknown:
        raise ConfigError(
            f"allowed_source_schemes {unknown} are not supported; choose from {list(SUPPORTED_SOURCE_SCHEMES)}"
        )
    return out


def check_source_url(
    url: str,
    *,
    allowed_schemes: Iterable[str] = DEFAULT_SOURCE_SCHEMES,
    source_roots: Iterable[str] = (),
    blocked_networks: tuple[Network, ...] = DEFAULT_BLOCKED,
    must_exist: bool = True,
) -> str:
    """The source to open for ``url``, or ``InvalidArgumentError`` with one sentence for every refusal.

    A URL must use an allowed scheme and name a host that is not written as an address in ``blocked_networks``
    (``services.source_hosts.literal_refusal``; nothing is resolved here). A local source must be a plain path
    (not ``file://``) to a regular file inside one of ``source_roots`` after resolving symlinks and ``..``; the
    resolved path is returned. ``must_exist=False`` skips the file-system check (a process that does not hold the
    files). The refusal never depends on whether the path exists, so a caller cannot probe the file system.
    """
    schemes = check_source_schemes(allowed_schemes)
    roots = [os.path.realpath(r) for r in source_roots]
    refused = InvalidArgumentError(_refusal(url, schemes, bool(roots)))
    if not isinstance(url, str) or not url or len(url) > _MAX_URL_CHARS or not url.isprintable():
        raise refused
    scheme = source_scheme(url)
    if scheme != "file" or url.lower().startswith("file:"):
        rest = url[len(scheme) + 3 :] if url.lower().startswith(f"{scheme}://") else ""
        if not (scheme in schemes and rest and not rest.startswith("/")):
            raise refused
        host_refusal = literal_refusal(url, blocked_networks)
        if host_refusal is not None:
            raise InvalidArgumentError(f"source_url {_shown(url)} is not allowed: {host_refusal}")
        if not urlsplit(url).hostname:
            raise InvalidArgumentError(f"source_url {_shown(url)} names no host")
        return url
    if not roots or not os.path.isabs(url):
        raise refused
    path = os.path.realpath(url)
    inside = any(os.path.commonpath([path, root]) == root and path != root for root in roots)
    if not inside or (must_exist and not os.path.isfile(path)):
        raise refused
    return path


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """What a ``source_url`` may name on this server (``check_source_url``'s lists), from the service config."""

    schemes: tuple[str, ...]
    roots: tuple[str, ...]
    blocked_networks: tuple[Network, ...]

    @classmethod
    def of(cls, config) -> SourcePolicy:
        """The policy of a ``ServiceConfig``."""
        return cls(
            tuple(config.allowed_source_schemes),
            tuple(config.source_roots),
            parse_networks(config.source_blocked_networks),
        )

    def check(self, url: str, *, must_exist: bool = True) -> str:
        """``check_source_url`` under this policy: the source to open, or InvalidArgumentError."""
        return check_source_url(
            url, allowed_schemes=self.schemes, source_roots=self.roots, blocked_networks=self.blocked_networks,
            must_exist=must_exist,
        )  # fmt: skip


def _shown(url: object) -> str:
    return repr(without_credentials(url)) if isinstance(url, str) and len(url) <= 200 else "the given source_url"


def _refusal(url: object, schemes: tuple[str, ...], has_roots: bool) -> str:
    shown = _shown(url)
    urls = ", ".join(f"{s}://" for s in schemes) or "no URL scheme"
    files = "the path of a video file under one of its source roots" if has_roots else "no local files"
    if not has_roots:
        return f"source_url {shown} is not allowed: this server opens {urls} URLs and {files}"
    return f"source_url {shown} is not allowed: this server opens {urls} URLs or {files}"
