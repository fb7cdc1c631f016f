"""One log line per gRPC request at DEBUG (``mosaic serve --log-level DEBUG``): method, peer, status, time.

An interceptor wraps each handler only while the ``mosaic.requests`` logger is enabled for DEBUG, so at the
default level it costs one check per call.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time

import grpc

log = logging.getLogger("mosaic.requests")


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not log.isEnabledFor(logging.DEBUG):
            return handler
        return _logged(handler, handler_call_details.method)


def _logged(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    def finish(context, started: float, error: BaseException | None) -> None:
        code = context.code() if hasattr(context, "code") else None
        status = (code.name if isinstance(code, grpc.StatusCode) else None) or (
            type(error).__name__ if error is not None else "OK"
        )
        log.debug("%s from %s -> %s in %.1f ms", method, context.peer(), status, 1e3 * (time.perf_counter() - started))

    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def behaviour(request, context):
            started, error = time.perf_counter(), None
            try:
                await stream_responses(inner, request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                finish(context, started, error)

    else:
        inner = handler.unary_unary or handler.stream_unary

        async def behaviour(request, context):
            started, error = time.perf_counter(), None
            try:
                return await inner(request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                finish(context, started, error)

    return replace_behaviour(handler, behaviour)


async def stream_responses(behaviour, request, context) -> None:
    """Runs a response-streaming ``behaviour`` of either kind gRPC takes: an async generator, whose responses are
    written here, or a coroutine that writes its own (``context.write``, as grpc_health's Watch does)."""
    result = behaviour(request, context)
    if not inspect.isasyncgen(result):
        await result
        return
    async with contextlib.aclosing(result):  # closed here, not when collected, however the call ends
        async for response in result:
            await context.write(response)


def replace_behaviour(handler: grpc.RpcMethodHandler, behaviour) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as ``handler`` that runs ``behaviour`` instead."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
