"""CLI: `dlheir triton start|stop` and `dlheir hash`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from dlheir.errors import UserError

PID_FILE = Path(".dlheir/tritonserver.pid")


def register(sub: argparse._SubParsersAction) -> None:
    tri = sub.add_parser("triton", help="start or stop the Triton Inference Server with the model repository")
    tsub = tri.add_subparsers(dest="action", metavar="ACTION")
    p = tsub.add_parser("start", help="start tritonserver in the background (loopback by default)",
                        description="Starts the tritonserver binary from nvidia-pytriton with the CPU models "
                                    "(dlheir_preprocess, dlheir_onnx_cpu, ensemble dlheir), waits until they are ready.")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(func=_start)
    p = tsub.add_parser("stop", help="stop the tritonserver started by 'dlheir triton start'")
    p.set_defaults(func=_stop)

    p = sub.add_parser("hash", help="print the hash code of each image, computed by Triton",
                       description="Hashes every image; an image that fails (unreadable, not an image, truncated, "
                                   "corrupt, too large) is reported on its own line on stderr and the exit code is 2.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC address (default 127.0.0.1:8001)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_hash)


def _start(args: argparse.Namespace) -> int:
    from dlheir.triton.launcher import TritonServer

    if PID_FILE.exists():
        pid = int(PID_FILE.read_text())
        try:
            os.kill(pid, 0)
            raise UserError(f"a tritonserver started here is already running (pid {pid}); 'dlheir triton stop' first")
        except ProcessLookupError:
            PID_FILE.unlink()
    server = TritonServer(args.model_repository, args.host, args.grpc_port, args.http_port, args.metrics_port)
    server.start(detach=True)
    PID_FILE.write_text(str(server.process.pid))
    print(f"tritonserver ready (pid {server.process.pid}): gRPC {args.host}:{args.grpc_port}, "
          f"HTTP {args.host}:{args.http_port}, metrics {args.host}:{args.metrics_port}; log {server.log_path}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    if not PID_FILE.exists():
        raise UserError(f"no {PID_FILE}: no tritonserver was started from this folder")
    pid = int(PID_FILE.read_text())
    try:
        os.kill(pid, signal.SIGINT)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    PID_FILE.unlink()
    print(f"tritonserver (pid {pid}) stopped")
    return 0


def _hash(args: argparse.Namespace) -> int:
    """Hash every image; each failure is one line on stderr with its reason; exit 2 if any failed."""
    from dlheir.client.triton import TritonHasher
    from dlheir.codes import to_hex

    failed = 0
    with TritonHasher(args.triton) as hasher:
        for image, result in zip(args.images, hasher.hash_each(args.images)):
            if result.error is not None:
                failed += 1
                print(f"dlheir: error: {image}: {result.error}", file=sys.stderr, flush=True)
            elif args.json:
                print(json.dumps({"image": image, "bits": hasher.bits, "code": to_hex(result.code)}), flush=True)
            else:
                print(f"{to_hex(result.code)}  {image}", flush=True)
    if failed:
        print(f"dlheir: error: {failed} of {len(args.images)} images could not be hashed", file=sys.stderr)
        return 2
    return 0
