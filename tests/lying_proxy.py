"""A lying cloud server for tests: a real gRPC server on loopback in front of a real dlheir
server, forwarding every call byte for byte, except the methods given a ``tamper`` function,
whose replies it decodes, changes and re-encodes (what a malicious or compromised server, or
an on-path attacker without TLS, can do). Requests can be recorded (``seen``) to show what a
client sent."""

from __future__ import annotations

from concurrent import futures
from typing import Callable

import grpc

from dlheir.proto import dlheir_cloud_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CloudStore"]


class LyingProxy:
    """``tamper``: method name -> function(request, replies) -> replies, where ``replies`` is the
    list of decoded reply messages (one for a unary method)."""

    def __init__(self, upstream: str, tamper: dict[str, Callable] | None = None) -> None:
        self.tamper = dict(tamper or {})
        self.seen: list[tuple[str, object]] = []  # (method, decoded request) of every unary/server-stream call
        self.channel = grpc.insecure_channel(upstream, [("grpc.max_receive_message_length", 64 << 20),
                                                        ("grpc.max_send_message_length", 64 << 20)])
        self.server = grpc.server(futures.ThreadPoolExecutor(8), options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        self.server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()

    def __enter__(self) -> "LyingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _metadata(context) -> tuple:
    return tuple((k, v) for k, v in context.invocation_metadata() if k == "authorization")


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: LyingProxy) -> None:
        self.proxy = proxy

    def service(self, details):
        name = details.method.rsplit("/", 1)[-1]
        method = SERVICE.methods_by_name.get(name)
        if method is None:
            return None
        path = details.method
        req_cls = _message_class(method.input_type)
        rep_cls = _message_class(method.output_type)
        proxy, tamper = self.proxy, self.proxy.tamper.get(name)

        def forward_error(exc, context):
            context.abort(exc.code(), exc.details())

        if method.client_streaming:  # Upload: passed through untouched
            call = proxy.channel.stream_stream(path)

            def stream_stream(requests, context):
                try:
                    yield from call(requests, metadata=_metadata(context))
                except grpc.RpcError as exc:
                    forward_error(exc, context)
            return grpc.stream_stream_rpc_method_handler(stream_stream)

        if method.server_streaming:
            call = proxy.channel.unary_stream(path)

            def unary_stream(raw, context):
                request = req_cls.FromString(raw)
                proxy.seen.append((name, request))
                try:
                    replies = list(call(raw, metadata=_metadata(context)))
                except grpc.RpcError as exc:
                    forward_error(exc, context)
                if tamper is not None:
                    replies = [r.SerializeToString() for r in tamper(request, [rep_cls.FromString(b) for b in replies])]
                yield from replies
            return grpc.unary_stream_rpc_method_handler(unary_stream)

        call = proxy.channel.unary_unary(path)

        def unary_unary(raw, context):
            request = req_cls.FromString(raw)
            proxy.seen.append((name, request))
            try:
                reply = call(raw, metadata=_metadata(context))
            except grpc.RpcError as exc:
                forward_error(exc, context)
            if tamper is not None:
                (changed,) = tamper(request, [rep_cls.FromString(reply)])
                reply = changed.SerializeToString()
            return reply
        return grpc.unary_unary_rpc_method_handler(unary_unary)


def _message_class(descriptor):
    return getattr(pb, descriptor.name)
