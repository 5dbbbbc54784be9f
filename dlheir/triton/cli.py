"""CLI: `dlheir triton start|prepare|stop` and `dlheir hash`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from dlheir.errors import UserError

from dlheir.triton.repository import BACKENDS  # import-light: protobuf and onnx only inside its functions


def _pid_file() -> Path:
    from dlheir.triton.launcher import launcher_state

    return launcher_state() / "tritonserver.pid"


def register(sub: argparse._SubParsersAction) -> None:
    from dlheir.contract import PUBLIC_MODEL

    tri = sub.add_parser("triton", help="start or stop the Triton Inference Server with the model repository")
    tsub = tri.add_subparsers(dest="action", metavar="ACTION")
    p = tsub.add_parser(
        "start", help="start tritonserver in the background (loopback by default)",
        description=f"Generates the model repository for --backend from the latest export (or --onnx) in the "
                    f"state folder ($DLHEIR_STATE, else $XDG_STATE_HOME/dlheir, else ~/.local/state/dlheir), "
                    f"starts the tritonserver binary of nvidia-pytriton with exactly that backend's models "
                    f"(dlheir_preprocess, the network, the ensemble '{PUBLIC_MODEL}') and waits until they are "
                    f"ready. The pid file and log are kept in STATE/triton. nvidia-pytriton's tritonserver has "
                    f"only the python backend: onnx-gpu and tensorrt need NVIDIA's Triton container (the "
                    f"repository is still generated for it).")
    _repository_flags(p)
    p.add_argument("--model-repository", default=None,
                   help="serve this repository as it is (default: the one generated in the state folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS only (HTTP is then off); "
                                                    "clients give its CA with --triton-tls-ca")
    p.add_argument("--tls-key", default=None, help="the certificate's PEM private key (with --tls-cert)")
    p.add_argument("--keep-version", type=int, action="append", default=[], metavar="N",
                   help="also serve version N of the network (an earlier 'dlheir export onnx') as the model "
                        "NETWORK_vN, for collections still holding its codes (e.g. during 'dlheir owner reindex'): "
                        "clients pick it with --model (repeatable; backend onnx-cpu)")
    p.set_defaults(func=_start)
    p = tsub.add_parser("prepare", help="generate the model repository for a backend without starting Triton",
                        description="Writes the repository (e.g. for NVIDIA's Triton container on a GPU host) "
                                    "and prints its path, the models to load and the served fingerprint.")
    _repository_flags(p)
    p.add_argument("--out", default=None, help="repository folder (default: STATE/model_repository)")
    p.set_defaults(func=_prepare)
    p = tsub.add_parser("stop", help="stop the tritonserver started by 'dlheir triton start'")
    p.set_defaults(func=_stop)

    p = sub.add_parser("hash", help="print the hash code of each image, computed by Triton",
                       description="Hashes every image; an image that fails (unreadable, not an image, truncated, "
                                   "corrupt, too large) is reported on its own line on stderr and the exit code is 2.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC address (default 127.0.0.1:8001)")
    p.add_argument("--model", default=PUBLIC_MODEL, help=f"Triton model to call (default {PUBLIC_MODEL})")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_hash)


def _repository_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help="what runs the network: onnx-cpu (python backend + ONNX Runtime, default), onnx-gpu "
                        "(Triton's onnxruntime backend on a GPU), tensorrt (a TensorRT engine)")
    p.add_argument("--onnx", default=None, help="ONNX file to serve (default: the latest 'dlheir export onnx')")
    p.add_argument("--engine", default=None,
                   help="tensorrt: engine built from that ONNX (default: STATE/exports/model.plan)")


def _generate(args: argparse.Namespace, dest: Path):
    from dlheir.triton.repository import exports_dir, latest_export, prepare_repository

    backend = args.backend or "onnx-cpu"
    onnx = Path(args.onnx) if args.onnx else latest_export()
    engine = args.engine or (exports_dir() / "model.plan" if backend == "tensorrt" else None)
    return prepare_repository(dest, onnx, backend, engine_path=engine)


def _prepare(args: argparse.Namespace) -> int:
    from dlheir.triton.repository import default_repository

    repo = _generate(args, Path(args.out) if args.out else default_repository())
    print(repo.describe())
    print(f"load: {' '.join(f'--load-model={m}' for m in repo.models)}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from dlheir.triton.launcher import TritonServer
    from dlheir.triton.repository import check_repository, default_repository

    pid_file = _pid_file()
    if pid_file.exists():
        pid = json.loads(pid_file.read_text())["pid"]
        try:
            os.kill(pid, 0)
            raise UserError(f"a tritonserver started by 'dlheir triton start' is already running (pid {pid}); "
                            "'dlheir triton stop' first")
        except ProcessLookupError:
            pid_file.unlink()
    if args.model_repository:
        if args.onnx or args.engine:
            raise UserError("--onnx/--engine generate a repository: not with --model-repository")
        repo = check_repository(args.model_repository)
        if args.backend and args.backend != repo.backend:
            raise UserError(f"{args.model_repository} serves backend {repo.backend} ({repo.network}), "
                            f"not {args.backend}")
    else:
        repo = _generate(args, default_repository())
    print(repo.describe())
    from dlheir.triton.repository import keep_version

    kept = [keep_version(repo.path, v, repo.backend) for v in dict.fromkeys(args.keep_version) if v != repo.version]
    for name in kept:
        print(f"also serving {name} (an earlier version, for the collections hashed with it): --model {name}")
    server = TritonServer(repo.path, args.host, args.grpc_port, args.http_port, args.metrics_port,
                          models=(*repo.models, *kept), tls_cert=args.tls_cert, tls_key=args.tls_key)
    server.start(detach=True)  # refuses a backend this host's tritonserver lacks (launcher.missing_backend)
    pid_file.write_text(json.dumps({"pid": server.process.pid, "grpc": server.grpc_url, "backend": repo.backend,
                                    "repository": str(Path(repo.path).resolve())}))
    print(f"tritonserver ready (pid {server.process.pid}, backend {repo.backend}, models "
          f"{', '.join((*repo.models, *kept))}): gRPC {args.host}:{args.grpc_port}, HTTP {args.host}:{args.http_port}, "
          f"metrics {args.host}:{args.metrics_port}; log {server.log_path}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    pid_file = _pid_file()
    if not pid_file.exists():
        raise UserError(f"no {pid_file}: no tritonserver started by 'dlheir triton start' is running")
    from dlheir.procs import stop_pid

    pid = json.loads(pid_file.read_text())["pid"]
    stop_pid(pid, signal.SIGINT, 20.0)
    pid_file.unlink()
    print(f"tritonserver (pid {pid}) stopped")
    return 0


def _hash(args: argparse.Namespace) -> int:
    """Hash every image; each failure is one line on stderr with its reason; exit 2 if any failed."""
    from dlheir.client.triton import TritonHasher
    from dlheir.codes import to_hex

    failed = 0
    with TritonHasher(args.triton, model=args.model) as hasher:
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
