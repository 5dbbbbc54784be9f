"""The server's front door: one gRPC interceptor for every call.

* **Credentials before work.** The bearer token is read from the call's metadata and checked
  against the tokens the server knows *before* the handler runs; a call without a known token
  is refused with UNAUTHENTICATED at once, without reading one request message. This runs on
  gRPC's serving thread, so an unauthenticated stream never waits in a worker for its first
  message. Only ``grpc.health.v1.Health/Check`` is public.
* **Idle streams end.** A client stream (Upload, reflection) that sends nothing for
  ``idle_timeout`` seconds is cancelled, so even an authenticated client cannot hold a worker
  by keeping a stream open and silent.
* **Unread streams end, and streams never take every worker.** gRPC's sync server sends a
  streamed reply message from the worker thread and waits there until the client's flow
  control takes it: a client that stops reading (Fetch, SyncCodePages, Upload's acks) would
  hold that worker for as long as it keeps the stream open. A reply message not taken within
  ``write_timeout`` seconds cancels its stream (one watchdog thread checks every stream), and
  streams hold at most ``stream_slots`` workers at once (more are refused with
  RESOURCE_EXHAUSTED at once), so the remaining workers always answer health checks, searches
  and the owner's calls.
* **Failures are logged and mapped.** Each failed or refused call is logged (method, status,
  peer, message; never a token or key). Store errors become their status (disk full:
  RESOURCE_EXHAUSTED, damaged file: DATA_LOSS); anything unexpected is logged with its
  traceback and answered INTERNAL without internals.
* **Calls are counted** (with ``metrics``, ``--metrics-port``): every call's method, final status
  and duration, refusals included, and the store errors seen here (``dlheir.server.metrics``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import grpc

from dlheir.server.store import CollectionGoneError, StoreCorruptError, StoreError, StoreFullError

if TYPE_CHECKING:
    from dlheir.server.metrics import CallMetrics

log = logging.getLogger("dlheir.server.calls")

PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
STORE_STATUS = ((CollectionGoneError, grpc.StatusCode.NOT_FOUND),
                (StoreFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


class StreamLimits:
    """How many workers streams may hold at once, and how long one reply message may wait for
    the client to take it before its stream is cancelled (see the module docstring)."""

    def __init__(self, slots: int, write_timeout: float) -> None:
        self.slots = slots
        self.write_timeout = write_timeout
        self._free = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._sending: dict[int, tuple[float, object, str]] = {}  # stream -> (since, context, method)
        self._watchdog: threading.Thread | None = None
        self.active = 0  # streams holding a slot now (the dlheir_streams_active gauge)

    def acquire(self) -> bool:
        if not self._free.acquire(blocking=False):
            return False
        with self._lock:
            self.active += 1
        return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1
        self._free.release()

    def sending(self, key: int, context, method: str) -> None:
        """A reply message of stream ``key`` is handed to gRPC (its send may block the worker)."""
        with self._lock:
            self._sending[key] = (time.monotonic(), context, method)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="stream-watchdog", daemon=True)
                self._watchdog.start()

    def sent(self, key: int) -> None:
        with self._lock:
            self._sending.pop(key, None)

    def _watch(self) -> None:
        period = min(1.0, self.write_timeout / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                late = [(k, v) for k, v in self._sending.items() if now - v[0] > self.write_timeout]
                for k, _ in late:
                    del self._sending[k]
            for _, (_, context, method) in late:
                log.warning("%s to %s: a reply message was not taken for %.0f s (the client stopped reading), "
                            "stream cancelled", method, context.peer(), self.write_timeout)
                context.cancel()  # ends the blocked send: the worker is free again


class Guard(grpc.ServerInterceptor):
    def __init__(self, known_token: Callable[[str], bool], idle_timeout: float,
                 streams: StreamLimits | None = None, metrics: "CallMetrics | None" = None,
                 consistent: Callable[[], str | None] | None = None) -> None:
        self.known_token = known_token
        # several fronts over one store: None once this front has applied every change committed
        # before the call, else why it cannot answer yet (UNAVAILABLE); checked before the token,
        # which may have been issued by another front
        self.consistent = consistent
        self.idle_timeout = idle_timeout
        self.streams = streams or StreamLimits(6, 15.0)
        self.metrics = metrics  # None: nothing counted, no wrapping beyond the guard's own
        # method -> (its handler, the wrapped handler): the wrapping depends on nothing else, so
        # it is built once per method, not once per call (part of every call's latency)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            if self.metrics is not None:  # under one label: the client's method names are not ours to export
                from dlheir.server.metrics import UNKNOWN_METHOD

                self.metrics.call(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name, None)
            return None
        method = handler_call_details.method
        if method not in PUBLIC_METHODS:
            token = bearer_token(handler_call_details.invocation_metadata)
            if token is None:
                return self._counted(_refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED,
                                              "missing 'authorization: Bearer <token>' metadata"), method)
            behind = self.consistent() if self.consistent is not None else None
            if behind:
                return self._counted(_refusal(handler, method, grpc.StatusCode.UNAVAILABLE, behind), method)
            if not self.known_token(token):
                return self._counted(_refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED, "token not valid"),
                                     method)
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:  # only registered methods get here: bounded
            wrapped = _wrapped(handler, method, self.idle_timeout, self.streams, self.metrics)
            cached = self._wrapped[method] = (handler, self._counted(wrapped, method))
        return cached[1]

    def _counted(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return handler if self.metrics is None else _counted(handler, method, self.metrics)


def _log_failure(context, method: str) -> None:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        log.warning("%s -> %s from %s: %s", method, code.name, context.peer(), context.details())


def _fail(context, method: str, exc: Exception, metrics: "CallMetrics | None" = None):
    """Turn an exception escaping a handler into a status (abort raises)."""
    if context.code() not in (None, grpc.StatusCode.OK):  # the handler aborted: already a status
        _log_failure(context, method)
        raise exc
    if isinstance(exc, grpc.RpcError):  # the client went away or the stream was cancelled
        log.info("%s from %s ended: %s", method, context.peer(), type(exc).__name__)
        raise exc
    for kind, code in STORE_STATUS:
        if isinstance(exc, kind):
            if metrics is not None:
                metrics.store_error(exc)
            log.warning("%s -> %s from %s: %s", method, code.name, context.peer(), exc)
            context.abort(code, exc.client_message())  # without the server's file paths
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


def _take_stream_slot(streams: StreamLimits, context, method: str) -> None:
    if not streams.acquire():
        message = (f"the server runs at most {streams.slots} streams (Fetch, Upload, SyncCodePages) at once and "
                   f"all are in use: retry shortly")
        log.warning("%s -> RESOURCE_EXHAUSTED from %s: %s", method, context.peer(), message)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def _wrapped(handler: grpc.RpcMethodHandler, method: str, idle_timeout: float,
             streams: StreamLimits, metrics: "CallMetrics | None" = None) -> grpc.RpcMethodHandler:
    def unary_response(behavior):
        def run(request, context):
            if handler.request_streaming:
                _take_stream_slot(streams, context, method)
                request = _idle_bounded(request, context, idle_timeout, method)
            try:
                response = behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, logged, re-raised as a status
                _fail(context, method, exc, metrics)
            finally:
                if handler.request_streaming:
                    streams.release()
            _log_failure(context, method)
            return response
        return run

    def stream_response(behavior):
        def run(request, context):
            _take_stream_slot(streams, context, method)
            key = id(context)
            try:
                if handler.request_streaming:
                    request = _idle_bounded(request, context, idle_timeout, method)
                for response in behavior(request, context):
                    streams.sending(key, context, method)
                    try:
                        yield response  # returns once gRPC sent it: the client's flow control took it
                    finally:
                        streams.sent(key)
            except Exception as exc:  # noqa: BLE001
                _fail(context, method, exc, metrics)
            finally:
                streams.release()
            _log_failure(context, method)
        return run

    return _handler_like(handler, unary_response, stream_response)


def _final_code(context, exc: BaseException | None) -> str:
    """The status a call ended with: the one set on its context (abort, set_code), else OK when
    the handler returned, CANCELLED when the client went away or the stream was cancelled, and
    UNKNOWN (what gRPC answers) for any other exception."""
    code = context.code()
    if exc is None:
        return (code or grpc.StatusCode.OK).name
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if isinstance(exc, (grpc.RpcError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


def _counted(handler: grpc.RpcMethodHandler, method: str, metrics: "CallMetrics") -> grpc.RpcMethodHandler:
    """``handler`` (the guard's wrapping or refusal), its calls counted and timed: method, final status."""
    from dlheir.server.metrics import method_label

    label = method_label(method)

    def unary_response(behavior):
        def run(request, context):
            started, failure = time.perf_counter(), None
            try:
                return behavior(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                metrics.call(label, _final_code(context, failure), time.perf_counter() - started)
        return run

    def stream_response(behavior):
        def run(request, context):
            started, failure = time.perf_counter(), None
            try:
                yield from behavior(request, context)
            except BaseException as exc:  # GeneratorExit too: gRPC dropped the stream (client gone, cancelled)
                failure = exc
                raise
            finally:
                metrics.call(label, _final_code(context, failure), time.perf_counter() - started)
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
