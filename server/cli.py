"""CLI: `dlheir server start|stop` (import-light)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dlheir.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from dlheir.server.app import add_server_args

    srv = sub.add_parser("server", help="start or stop the cloud server (gRPC, FAISS index, encrypted blob store)")
    ssub = srv.add_subparsers(dest="action", metavar="ACTION")
    p = ssub.add_parser("start", help="start the cloud server in the background (or --foreground)",
                        description="Serves the CloudStore gRPC service with health checking and reflection. "
                                    "The durable store lives in DATA_DIR; the FAISS index is rebuilt from it at start.")
    add_server_args(p)
    p.add_argument("--foreground", action="store_true", help="run in this process until Ctrl-C")
    p.set_defaults(func=_start)
    p = ssub.add_parser("stop", help="stop the server started with 'dlheir server start --data-dir DIR'")
    p.add_argument("--data-dir", required=True)
    p.set_defaults(func=_stop)


def wait_healthy(address: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise UserError(f"cloud server exited with code {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise UserError(f"cloud server at {address} not healthy after {timeout:.0f}s")


def server_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "dlheir.server", "--data-dir", str(args.data_dir), "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    for flag in ("tls_cert", "tls_key", "admin_token_file", "shards"):
        if getattr(args, flag, None):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.insecure:
        cmd.append("--insecure")
    return cmd


def _start(args: argparse.Namespace) -> int:
    from dlheir.server.app import main

    if args.foreground:
        return main(server_command(args)[3:])
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    pid_file = data_dir / "server.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            raise UserError(f"a server is already running for {data_dir} (pid {pid_file.read_text().strip()})")
        except ProcessLookupError:
            pid_file.unlink()
    log = open(data_dir / "server.log", "ab")
    proc = subprocess.Popen(server_command(args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"127.0.0.1:{args.port}" if args.host in ("0.0.0.0", "::") else f"{args.host}:{args.port}",
                     proc) if not args.tls_cert else time.sleep(1.0)
    except UserError:
        tail = (data_dir / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise UserError("cloud server failed to start:\n" + "\n".join(tail)) from None
    pid_file.write_text(str(proc.pid))
    print(f"cloud server (pid {proc.pid}) listening on {args.host}:{args.port}; log {data_dir / 'server.log'}")
    token = data_dir / "admin.token"
    if not args.admin_token_file and token.exists():
        print(f"admin token in {token}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    pid_file = Path(args.data_dir) / "server.pid"
    if not pid_file.exists():
        raise UserError(f"no {pid_file}: no server was started for that data dir")
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    print(f"cloud server (pid {pid}) stopped")
    return 0
