"""The server's front door: one gRPC interceptor for every call.

* **Credentials before work.** The bearer token is read from the call's metadata and checked
  against the tokens the server knows *before* the handler runs; a call without a known token
  is refused with UNAUTHENTICATED at once, without reading one request message. This runs on
  gRPC's serving thread, so an unauthenticated stream never waits in a worker for its first
  message. Only ``grpc.health.v1.Health/Check`` is public.
* **Idle streams end.** A client stream (Upload, reflection) that sends nothing for
  ``idle_timeout`` seconds is cancelled, so even an authenticated client cannot hold a worker
  by keeping a stream open and silent.
* **Failures are logged and mapped.** Each failed or refused call is logged (method, status,
  peer, message; never a token or key). Store errors become their status (disk full:
  RESOURCE_EXHAUSTED, damaged file: DATA_LOSS); anything unexpected is logged with its
  traceback and answered INTERNAL without internals.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterator

import grpc

from dlheir.server.store import StoreCorruptError, StoreError, StoreFullError

log = logging.getLogger("dlheir.server.calls")

PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
STORE_STATUS = ((StoreFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
                (StoreCorruptError, grpc.StatusCode.DATA_LOSS),
                (StoreError, grpc.StatusCode.UNAVAILABLE))


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry (or a bare token)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value[7:] if value.startswith("Bearer ") else value
    return None


def clip(text: object, limit: int = 64) -> str:
    """``repr`` of client-supplied text, cut to ``limit`` characters: error messages and logs
    never echo unbounded input (a 1 MB name would not fit gRPC's metadata limit)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


class Guard(grpc.ServerInterceptor):
    def __init__(self, known_token: Callable[[str], bool], idle_timeout: float) -> None:
        self.known_token = known_token
        self.idle_timeout = idle_timeout
        # method -> (its handler, the wrapped handler): the wrapping depends on nothing else, so
        # it is built once per method, not once per call (part of every call's latency)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        if method not in PUBLIC_METHODS:
            token = bearer_token(handler_call_details.invocation_metadata)
            if token is None:
                return _refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED,
                                "missing 'authorization: Bearer <token>' metadata")
            if not self.known_token(token):
                return _refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED, "token not valid")
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:  # only registered methods get here: bounded
            cached = self._wrapped[method] = (handler, _wrapped(handler, method, self.idle_timeout))
        return cached[1]


def _log_failure(context, method: str) -> None:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        log.warning("%s -> %s from %s: %s", method, code.name, context.peer(), context.details())


def _fail(context, method: str, exc: Exception):
    """Turn an exception escaping a handler into a status (abort raises)."""
    if context.code() not in (None, grpc.StatusCode.OK):  # the handler aborted: already a status
        _log_failure(context, method)
        raise exc
    if isinstance(exc, grpc.RpcError):  # the client went away or the stream was cancelled
        log.info("%s from %s ended: %s", method, context.peer(), type(exc).__name__)
        raise exc
    for kind, code in STORE_STATUS:
        if isinstance(exc, kind):
            log.warning("%s -> %s from %s: %s", method, code.name, context.peer(), exc)
            context.abort(code, str(exc))
    log.exception("%s from %s failed", method, context.peer())
    context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged on the server)")


def _idle_bounded(requests: Iterator, context, seconds: float, method: str) -> Iterator:
    """The request stream, cancelled when no message arrives for ``seconds``."""
    def cancel():
        log.warning("%s from %s: no message for %.0f s, stream cancelled", method, context.peer(), seconds)
        context.cancel()

    while True:
        timer = threading.Timer(seconds, cancel)
        timer.daemon = True
        timer.start()
        try:
            request = next(requests)
        except StopIteration:
            return
        finally:
            timer.cancel()
        yield request


def _wrapped(handler: grpc.RpcMethodHandler, method: str, idle_timeout: float) -> grpc.RpcMethodHandler:
    def unary_response(behavior):
        def run(request, context):
            if handler.request_streaming:
                request = _idle_bounded(request, context, idle_timeout, method)
            try:
                response = behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, logged, re-raised as a status
                _fail(context, method, exc)
            _log_failure(context, method)
            return response
        return run

    def stream_response(behavior):
        def run(request, context):
            if handler.request_streaming:
                request = _idle_bounded(request, context, idle_timeout, method)
            try:
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001
                _fail(context, method, exc)
            _log_failure(context, method)
        return run

    return _handler_like(handler, unary_response, stream_response)


def _refusal(handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, message: str):
    """A handler of the same shape that refuses at once, without reading any request."""
    def refuse(_request, context):
        log.warning("%s -> %s from %s: %s", method, code.name, context.peer(), message)
        context.abort(code, message)

    def refuse_stream(_request, context):
        refuse(_request, context)
        yield  # pragma: no cover - never reached

    return _handler_like(handler, lambda _b: refuse, lambda _b: refuse_stream)


def _handler_like(handler: grpc.RpcMethodHandler, unary_response, stream_response) -> grpc.RpcMethodHandler:
    """A handler with ``handler``'s shape and (de)serializers, its behaviour wrapped."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **kw)
    return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **kw)
