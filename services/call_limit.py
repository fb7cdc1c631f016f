"""Calls the router holds open at once, of every method but the health check: bounded.

Each limit of its own (``max_push_calls``, ``max_watch_subscribers``, the question queue) bounds one method; health
Watch and reflection streams need no API key and had none, so a client that opened them without end took the
router's memory. ``CallLimitInterceptor`` refuses a call past ``max_open_calls`` with ``RESOURCE_EXHAUSTED`` and a
sentence, counted in ``mosaic_errors_total``. The unary health check is never refused: a probe must hear the truth
however busy the router is.
"""

from __future__ import annotations

import grpc

from mosaic_core.errors import CapacityError
from services.errors import status_for
from services.metrics import MosaicMetrics
from services.request_log import replace_behaviour, stream_responses

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """Counts the calls running, and refuses one that would make more than ``max_open_calls``."""

    def __init__(self, max_open_calls: int, metrics: MosaicMetrics) -> None:
        self.max_open_calls = max_open_calls
        self.open_calls = 0
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method == HEALTH_CHECK:
            return handler
        return self._counted(handler)

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = handler.response_streaming
        inner = (handler.unary_stream or handler.stream_stream) if streaming else (
            handler.unary_unary or handler.stream_unary
        )  # fmt: skip

        async def behaviour(request, context):
            if self.open_calls >= self.max_open_calls:
                status = status_for(
                    CapacityError(
                        f"the server has {self.open_calls} calls open, its limit (max_open_calls); close calls you "
                        "no longer need, or retry shortly"
                    )
                )
                self._metrics.error(status.code.name)
                await context.abort(status.code, status.message)
            self.open_calls += 1
            try:
                if streaming:
                    await stream_responses(inner, request, context)
                    return None
                return await inner(request, context)
            finally:
                self.open_calls -= 1

        return replace_behaviour(handler, behaviour)
