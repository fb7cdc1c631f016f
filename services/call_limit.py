"""Calls the router holds open at once, of every method but the health check: bounded, in all and per client.

Each limit of its own (``max_push_calls``, ``max_watch_subscribers``, the question queue) bounds one method; health
Watch and reflection streams need no API key and had none, so a client that opened them without end took the
router's memory. ``CallLimitInterceptor`` refuses a call past ``max_open_calls`` with ``RESOURCE_EXHAUSTED`` and a
sentence, counted in ``mosaic_errors_total``. The unary health check is never refused: a probe must hear the truth
however busy the router is.

Where they are set, one client (``services.client_calls``) may hold at most ``max_open_calls_per_client`` of those
calls, and at most ``max_push_calls_per_client`` PushFrames calls, so that it cannot take every place from the others;
unset, a client is refused only by the server's limits, as before there were clients. A call is its
API key's where the server checks keys and the method needs one (``services.auth``); the calls that need none
(health Watch, reflection) are their host's, since a key nobody checked could name a new client on every call.
"""

from __future__ import annotations

import grpc

from mosaic_core.errors import CapacityError
from services.auth import API_KEY_HEADER, checks_key
from services.client_calls import Client, ClientCalls
from services.errors import QueueFullError, abort
from services.metrics import MosaicMetrics
from services.request_log import replace_behaviour, stream_responses

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
PUSH_FRAMES = "/mosaic.v1.Mosaic/PushFrames"
PUSH_RETRY_AFTER_S = 1.0  # the retry hint of a refused PushFrames call: past its client's limit, or the server's


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    """Counts the calls running, and refuses one that would make more than ``max_open_calls``, more than
    ``max_open_calls_per_client`` of its client, or, for PushFrames, more than ``max_push_calls_per_client``.

    Args:
        max_open_calls_per_client, max_push_calls_per_client: None, no cap of the client's own.
        by_api_key: the server checks API keys, so a call that carries a checked one is that key's.
    """

    def __init__(
        self,
        max_open_calls: int,
        metrics: MosaicMetrics,
        *,
        max_open_calls_per_client: int | None = None,
        max_push_calls_per_client: int | None = None,
        by_api_key: bool = False,
    ) -> None:
        self.max_open_calls = max_open_calls
        self.open_calls = 0
        self.client_calls = None if max_open_calls_per_client is None else ClientCalls(max_open_calls_per_client)
        self.client_pushes = None if max_push_calls_per_client is None else ClientCalls(max_push_calls_per_client)
        self.by_api_key = by_api_key
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method == HEALTH_CHECK:
            return handler
        api_key = None
        if self.by_api_key and checks_key(method):
            api_key = dict(handler_call_details.invocation_metadata or ()).get(API_KEY_HEADER)
        return self._counted(handler, api_key, push=method == PUSH_FRAMES)

    def _counted(self, handler: grpc.RpcMethodHandler, api_key: str | None, *, push: bool) -> grpc.RpcMethodHandler:
        streaming = handler.response_streaming
        inner = (handler.unary_stream or handler.stream_stream) if streaming else (
            handler.unary_unary or handler.stream_unary
        )  # fmt: skip

        async def behaviour(request, context):
            client = Client.of(context.peer(), api_key)
            if (refusal := self._refusal(client, push=push)) is not None:
                await abort(context, refusal, self._metrics)
            self._open(client, push=push)
            try:
                if streaming:
                    await stream_responses(inner, request, context)
                    return None
                return await inner(request, context)
            finally:
                self._close(client, push=push)

        return replace_behaviour(handler, behaviour)

    def _refusal(self, client: Client, *, push: bool) -> CapacityError | None:
        """Why a call of ``client`` may not open now, or None: the server's limit first, then the client's."""
        if self.open_calls >= self.max_open_calls:
            return CapacityError(
                f"the server has {self.open_calls} calls open, its limit (max_open_calls); close calls you no longer "
                "need, or retry shortly"
            )
        if self.client_calls is not None and not self.client_calls.can_open(client):
            return CapacityError(
                f"this client (calls {client.described}) has {self.client_calls.num_open(client)} calls open, its "
                "limit (max_open_calls_per_client), which leaves the server's other places to other clients; close "
                "calls you no longer need, or retry once one of yours ends"
            )
        if push and self.client_pushes is not None and not self.client_pushes.can_open(client):
            return QueueFullError(
                f"this client (calls {client.described}) has {self.client_pushes.num_open(client)} PushFrames calls "
                "open, its limit (max_push_calls_per_client), which leaves the server's other PushFrames places to "
                "other clients; send several streams' frames in one call, or retry once one of yours ends",
                retry_after_s=PUSH_RETRY_AFTER_S,
            )
        return None

    def _open(self, client: Client, *, push: bool) -> None:
        self.open_calls += 1
        for calls in self._client_counts(push=push):
            calls.open(client)

    def _close(self, client: Client, *, push: bool) -> None:
        self.open_calls -= 1
        for calls in self._client_counts(push=push):
            calls.close(client)

    def _client_counts(self, *, push: bool) -> list[ClientCalls]:
        """The per-client counts a call of this kind takes a place in: those of the caps that are set."""
        counts = [self.client_calls, self.client_pushes] if push else [self.client_calls]
        return [calls for calls in counts if calls is not None]
