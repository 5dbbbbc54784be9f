"""Run the cloud server: ``python -m dlheir.server --data-dir DIR [--port 50051] ...`` (foreground).

``dlheir server start`` runs this in the background; tests run it as a subprocess.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

from dlheir.errors import UserError

ADMIN_ENV = "DLHEIR_ADMIN_TOKEN"


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", required=True, help="folder for the durable store (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS")
    p.add_argument("--admin-token-file", help=f"file holding the admin token (else ${ADMIN_ENV}, else generated "
                                              "into DATA_DIR/admin.token)")
    p.add_argument("--shards", type=int, default=None, help="index shards searched in parallel (default: cores)")
    p.add_argument("--workers", type=int, default=8, help="gRPC worker threads")


def host_port(host: str, port: int) -> str:
    """gRPC address of host and port (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(data_dir: Path, token_file: str | None) -> tuple[str, str]:
    """(token, where it came from)."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise UserError(f"--admin-token-file: no such file {path}")
        token = path.read_text().strip()
        if len(token) < 16:
            raise UserError(f"{path}: admin token must be at least 16 characters")
        return token, str(path)
    if os.environ.get(ADMIN_ENV):
        token = os.environ[ADMIN_ENV].strip()
        if len(token) < 16:
            raise UserError(f"${ADMIN_ENV}: admin token must be at least 16 characters")
        return token, f"${ADMIN_ENV}"
    path = data_dir / "admin.token"
    if not path.exists():  # first start: generate one, readable by this user only
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return path.read_text().strip(), str(path)


def check_args(args: argparse.Namespace) -> bool:
    """Validate the bind/TLS options (UserError); returns whether TLS is on."""
    tls = bool(args.tls_cert or args.tls_key)
    if tls and not (args.tls_cert and args.tls_key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    if not tls and not is_loopback(args.host) and not args.insecure:
        raise UserError(f"refusing to serve {args.host} without TLS: give --tls-cert/--tls-key, or --insecure")
    if tls:
        for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            if not Path(path).is_file():
                raise UserError(f"{flag}: no such file {path}")
    return tls


def build_server(args: argparse.Namespace):
    """Create the grpc.Server (not started); returns (server, service, bound port, admin token source)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from dlheir.server.proto import dlheir_cloud_pb2 as pb
    from dlheir.server.proto import dlheir_cloud_pb2_grpc as pb_grpc
    from dlheir.server.service import MAX_MESSAGE_BYTES, CloudStoreService
    from dlheir.server.store import Store

    tls = check_args(args)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    token, token_source = admin_token(data_dir, args.admin_token_file)
    service = CloudStoreService(Store(data_dir / "store.sqlite3"), token, args.shards)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(args.workers), options=options)
    pb_grpc.add_CloudStoreServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["CloudStore"].full_name, reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = host_port(args.host, args.port)
    try:
        if tls:
            creds = grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        service.store.close()
        raise UserError(f"cannot bind {address}: the port is in use or the address is not local "
                        f"(pick another with --port)") from exc
    for name in ("", names[0]):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    service.health = health_servicer  # main() flips it to NOT_SERVING when shutting down
    return server, service, port, token_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlheir.server", description=__doc__)
    add_server_args(parser)
    args = parser.parse_args(argv)
    try:
        server, service, port, token_source = build_server(args)
    except UserError as exc:
        print(f"dlheir server: error: {exc}", file=sys.stderr)
        return 2
    server.start()
    scheme = "TLS" if args.tls_cert else "plaintext"
    print(f"dlheir cloud server listening on {host_port(args.host, port)} ({scheme}; admin token: {token_source}; "
          f"{len(service.collections)} collection(s), {sum(len(c.index) for c in service.collections.values())} "
          f"item(s) indexed)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    service.health.enter_graceful_shutdown()  # health checks answer NOT_SERVING from here
    server.stop(grace=2).wait()
    service.store.close()
    return 0
