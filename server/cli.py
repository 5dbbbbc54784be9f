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
    p.set_defaults(func=_start, server_parser=p)
    p = ssub.add_parser("stop", help="stop the server started with 'dlheir server start --data-dir DIR'")
    p.add_argument("--data-dir", help="the server's data folder (required, here or in --server-config)")
    p.add_argument("--server-config", metavar="FILE", help="the settings file the server was started with")
    p.set_defaults(func=_stop, server_parser=p)
    p = ssub.add_parser(
        "migrate", help="copy a whole deployment into another store (embedded <-> PostgreSQL+S3), then verify it",
        description="Copies every collection (its items, blobs, readers, key version and sealed code pages) and the "
                    "admin token from the stopped server's store (--from) into another (--to), in durable batches, "
                    "then verifies the target against the source (counts, SHA-256 over ids+codes and pages, every "
                    "blob read back). The target must be empty or an interrupted migration of the same source "
                    "(it is continued). Stop the source server first: its data dir is locked while this runs.")
    p.add_argument("--from", dest="source", required=True, metavar="DATA_DIR",
                   help="the source server's data dir (holds its store, or names it with --from-store)")
    p.add_argument("--from-store", metavar="URL", help="the source store, postgresql://... (else the embedded one)")
    p.add_argument("--from-blobs", metavar="URL", help="the source's object store, s3://BUCKET?endpoint=URL")
    p.add_argument("--to", dest="target", required=True, metavar="DATA_DIR",
                   help="the target server's data dir (created; gets the admin token)")
    p.add_argument("--to-store", metavar="URL", help="the target store, postgresql://... (else an embedded one)")
    p.add_argument("--to-blobs", metavar="URL", help="the target's object store, s3://BUCKET?endpoint=URL")
    p.add_argument("--verify-only", action="store_true", help="copy nothing: only compare the target with the source")
    p.add_argument("--batch-size", type=int, default=2000, metavar="N",
                   help="items per durable write (default 2000; a batch also ends at 64 MiB of blobs)")
    p.set_defaults(func=_migrate)


def wait_ready(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> dict:
    """Wait until *this* server process (the pid in the file) has written its ready file: its port is
    bound and health answers SERVING (a stale file of an earlier, killed server has another pid).
    Returns the file's contents (pid, address, port, tls)."""
    from dlheir.server.app import read_ready

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_ready(path)
        if info is not None and info.get("pid") == process.pid:
            return info
        if process.poll() is not None:
            raise UserError(f"cloud server exited with code {process.returncode}")
        time.sleep(0.1)
    raise UserError(f"cloud server did not start within {timeout:.0f}s (no {path})")


def open_private_log(path: Path):
    """``path`` opened for appending, mode 0600 whatever the umask (an existing one is tightened)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def server_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "dlheir.server", "--data-dir", str(args.data_dir), "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers),
           "--max-concurrent-rpcs", str(args.max_concurrent_rpcs), "--stream-idle-timeout", str(args.stream_idle_timeout),
           "--stream-write-timeout", str(args.stream_write_timeout), "--log-level", args.log_level, "--index", args.index]
    if args.max_streams is not None:  # 0 too: the server refuses it, naming the flag
        cmd += ["--max-streams", str(args.max_streams)]
    for flag in ("tls_cert", "tls_key", "admin_token_file", "shards", "max_store_mb", "mih_min_items", "ready_file",
                 "store", "blobs"):
        if getattr(args, flag, None):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if getattr(args, "metrics_port", None) is not None:  # 0 means: a free port
        cmd += ["--metrics-port", str(args.metrics_port)]
    cmd += ["--log-format", getattr(args, "log_format", "text")]
    for flag in ("insecure", "skip_integrity_check"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    return cmd


def _start(args: argparse.Namespace) -> int:
    from dlheir.server.app import apply_server_config, check_args, main, ready_file

    apply_server_config(args.server_parser, args, getattr(args, "argv", []))  # flags beat the settings file
    if args.foreground:
        return main(server_command(args)[3:])
    check_args(args)  # refuse bad TLS/bind options here, before anything starts
    data_dir = Path(args.data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the server tightens an existing one (with a warning)
    pid_file = data_dir / "server.pid"
    if pid_file.exists():
        pid = pid_file.read_text().strip()
        if pid.isdigit() and _is_our_server(int(pid)):
            raise UserError(f"a server is already running for {data_dir} (pid {pid}); "
                            f"stop it with: dlheir server stop --data-dir {data_dir}")
        pid_file.unlink()
    log_path = data_dir / "server.log"
    with open_private_log(log_path) as log:
        offset = log.tell()
        proc = subprocess.Popen(server_command(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # detached: survives this command and its terminal
    try:
        info = wait_ready(ready_file(args), proc)
    except UserError as exc:
        if proc.poll() is None:
            proc.kill()
        with open(log_path, "rb") as f:
            f.seek(offset)
            tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
        raise UserError(f"cloud server failed to start ({exc}); {log_path} says:\n" + "\n".join(tail)) from None
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(str(proc.pid))
    os.replace(tmp, pid_file)
    print(f"cloud server (pid {proc.pid}) listening on {info['address']}"
          f"{' with TLS' if args.tls_cert else ''}; log {log_path}; stop with: dlheir server stop --data-dir {data_dir}")
    token = data_dir / "admin.token"
    if args.admin_token_file:
        print(f"admin token: {args.admin_token_file}")
    elif os.environ.get("DLHEIR_ADMIN_TOKEN"):
        print("admin token: $DLHEIR_ADMIN_TOKEN")
    elif token.exists():
        print(f"admin token in {token} (mode 0600)")
    return 0


def _is_our_server(pid: int) -> bool:
    """The pid is alive and (where /proc tells) runs dlheir.server, not a recycled pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"dlheir.server" in cmdline.read_bytes()


def _stop(args: argparse.Namespace) -> int:
    from dlheir.server.app import apply_server_config

    apply_server_config(args.server_parser, args, getattr(args, "argv", []), only_known=True)
    pid_file = Path(args.data_dir) / "server.pid"
    if not pid_file.exists():  # stopping a stopped server is not an error: the goal holds
        print(f"no server is running on {args.data_dir} (no {pid_file.name} there)")
        return 0
    try:
        pid = int(pid_file.read_text())
    except ValueError:
        raise UserError(f"{pid_file} does not hold a process id") from None
    if not _is_our_server(pid):
        pid_file.unlink()
        print(f"no server is running on {args.data_dir}: pid {pid} was not running; removed {pid_file}")
        return 0
    from dlheir.procs import stop_pid
    from dlheir.server.app import READY_FILE, read_ready

    # SIGTERM is graceful (in-flight calls finish, the store closes); SIGKILL after 10 s: acked data is safe
    stop_pid(pid, signal.SIGTERM, timeout=10.0)

    ready = Path(args.data_dir) / READY_FILE  # a clean stop removed it; a killed server could not
    if (read_ready(ready) or {}).get("pid") == pid:
        ready.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    print(f"cloud server (pid {pid}) stopped")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from dlheir.server.migrate import run

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return run(args)
