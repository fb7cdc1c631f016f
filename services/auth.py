"""The API key check of every call: with keys configured (``services.api_keys``), every call except health and
reflection must carry one in the ``x-api-key`` metadata header; otherwise UNAUTHENTICATED with a sentence, counted
in ``mosaic_errors_total``."""

from __future__ import annotations

import grpc

from services.api_keys import ApiKeys
from services.config import ServiceConfig
from services.errors import UnauthenticatedError, status_for
from services.metrics import MosaicMetrics
from services.ray_setup import is_loopback
from services.request_log import replace_behaviour

API_KEY_HEADER = "x-api-key"
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without one of the ``keys`` in ``x-api-key``; health and reflection stay open to probes."""

    def __init__(self, keys: ApiKeys, metrics: MosaicMetrics) -> None:
        self._keys = keys
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not checks_key(handler_call_details.method):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get(API_KEY_HEADER, "")
        if given and self._keys.matches(given):
            return handler
        return _deny(handler, self._metrics, "missing" if not given else "wrong")


def checks_key(method: str) -> bool:
    """Whether ``ApiKeyInterceptor`` asks calls of ``method`` (``/package.Service/Method``) for a key."""
    return not method.startswith(_OPEN_METHOD_PREFIXES)


def _deny(handler: grpc.RpcMethodHandler, metrics: MosaicMetrics, what: str) -> grpc.RpcMethodHandler:
    status = status_for(
        UnauthenticatedError(f"the {API_KEY_HEADER} metadata header is {what}; send the server's API key")
    )

    async def refuse(request, context):
        metrics.error(status.code.name)
        await context.abort(status.code, status.message)

    return replace_behaviour(handler, refuse)


def clear_text_key_warning(cfg: ServiceConfig) -> str | None:
    """What to warn of when gRPC without TLS, on more than loopback, carries API keys; None when nothing."""
    if not (cfg.api_key or cfg.api_key_file) or cfg.tls_cert or is_loopback(cfg.host):
        return None
    return (
        f"gRPC on {cfg.host} has no TLS: API keys cross the network in clear text; pass --tls-cert and --tls-key, "
        "or keep a TLS-terminating proxy or mesh in front"
    )
