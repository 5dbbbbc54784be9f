"""Run the cloud server: ``python -m dlheir.server --data-dir DIR [--port 50051] ...`` (foreground).

``dlheir server start`` runs this in the background; tests run it as a subprocess.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import secrets
import signal
import stat
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

from dlheir.errors import UserError
from dlheir.netaddr import is_loopback

ADMIN_ENV = "DLHEIR_ADMIN_TOKEN"
LOCK_FILE = "server.lock"
READY_FILE = "server.ready"  # default --ready-file, in DATA_DIR
log = logging.getLogger("dlheir.server")


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-config", metavar="FILE",
                   help="TOML file of settings: the flags below without their dashes (data_dir = \"runs/cloud\", "
                        "store = \"postgresql://...\", port = 50051, insecure = true, ...); a flag given on the "
                        "command line beats the file; relative paths are relative to the file's folder")
    p.add_argument("--data-dir", help="folder for the durable store (created if missing; required, here or in "
                                      "--server-config)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS")
    p.add_argument("--admin-token-file", help=f"file holding the admin token (else ${ADMIN_ENV}, else generated "
                                              "into DATA_DIR/admin.token)")
    p.add_argument("--shards", type=int, default=None, help="index shards searched in parallel (default: cores)")
    p.add_argument("--mih-min-items", type=int, default=None, metavar="N",
                   help="collection size from which searches may use exact multi-index hashing instead of a "
                        "flat scan (codes of <= 64 bits; default 100000)")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "mih"),
                   help="auto: from --mih-min-items codes on, time both on the collection's own codes and keep "
                        "the faster (default); flat: always scan; mih: always multi-index hashing from there")
    p.add_argument("--workers", type=int, default=8, help="gRPC worker threads (default 8)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=64,
                   help="calls in progress at once; more are refused with RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--stream-idle-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="cancel a client stream (upload) that sends nothing for this long (default 30)")
    p.add_argument("--stream-write-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="cancel a stream (fetch, sync, upload acks) whose client takes no reply message for this "
                        "long: a client that stops reading cannot hold a worker (default 15)")
    p.add_argument("--max-streams", type=int, default=None, metavar="N",
                   help="streams (fetch, upload, sync) served at once, each holding a worker; more are refused "
                        "with RESOURCE_EXHAUSTED, so the other workers stay free for searches and health checks "
                        "(default: --workers minus a quarter of them, at least 1 kept free)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="where collections, codes and pages live: postgresql://USER@HOST:PORT/DB (a libpq URL; the "
                        "password from PGPASSWORD or ~/.pgpass). Default: the embedded SQLite store in --data-dir")
    p.add_argument("--blobs", default=None, metavar="URL",
                   help="with --store: keep the encrypted blobs in an S3-compatible object store, "
                        "s3://BUCKET?endpoint=http://HOST:PORT (credentials: the AWS environment variables or "
                        "AWS_SHARED_CREDENTIALS_FILE). Default: in the store")
    p.add_argument("--consistency-wait", type=float, default=5.0, metavar="SECONDS",
                   help="with --store postgresql://, where several servers (fronts) may share the store: before "
                        "each call, wait until this server has applied every change any front acknowledged "
                        "before the call, for at most this long, else answer UNAVAILABLE; 0: do not wait (a "
                        "front may then lag by up to --follow-poll). Default 5")
    p.add_argument("--follow-poll", type=float, default=0.5, metavar="SECONDS",
                   help="with --store postgresql://: look for other fronts' changes at least this often, should "
                        "a notification be lost (default 0.5)")
    p.add_argument("--max-store-mb", type=int, default=None, metavar="MB",
                   help="quota for the store file: uploads past it get RESOURCE_EXHAUSTED as on a full disk "
                        "(default: no quota, the disk's size)")
    p.add_argument("--skip-integrity-check", action="store_true",
                   help="start without SQLite's quick_check of the store (faster start of a huge store; "
                        "a damaged store is then found only when read)")
    p.add_argument("--ready-file", metavar="PATH",
                   help=f"written atomically once the port is bound and health answers SERVING (JSON: pid, "
                        f"address, port, tls; metrics_port with --metrics-port), removed at a clean stop; "
                        f"launchers wait on it (default DATA_DIR/{READY_FILE})")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="DEBUG logs every call, INFO start/stop/collections/deletes, WARNING failed calls (default INFO)")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="json: each log record one JSON object per line (time, level, logger, message and the "
                        "record's extra fields), for log collectors (default text)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, on --host (https with the "
                        "--tls-cert/--tls-key; no token: anyone who reaches the port reads them); 0: a free port, "
                        "written into the ready file as metrics_port. Default: off")


# settings that name files: relative to the settings file's folder when given there
SETTINGS_PATHS = frozenset({"data_dir", "tls_cert", "tls_key", "admin_token_file", "ready_file"})
# flags that are not server settings (the command's own, and dlheir's -v/-q/--config on every command)
NOT_SETTINGS = frozenset({"help", "server_config", "foreground", "verbose", "quiet", "config"})


def apply_server_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
                        only_known: bool = False) -> None:
    """Fill ``args`` from ``--server-config FILE`` (TOML: the flags without dashes) where the
    command line ``argv`` did not give the flag; then require --data-dir. UserError (one line,
    naming the file and the key) for an unreadable file, an unknown key or a bad value
    (``only_known``: keys ``parser`` has no flag for are skipped, as ``server stop`` does)."""
    path = getattr(args, "server_config", None)
    if path:
        import tomllib

        try:
            settings = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"--server-config {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"--server-config {path}: not a TOML file: {exc}") from None
        actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS}
        given = {dest for dest, a in actions.items()
                 if any(tok == opt or tok.startswith(opt + "=") for tok in argv for opt in a.option_strings)}
        for key, value in settings.items():
            dest = key.replace("-", "_")
            action = actions.get(dest)
            if action is None and only_known:
                continue
            if action is None:
                raise UserError(f"--server-config {path}: unknown setting {key!r} (settings are the server's flags "
                                f"without their dashes: {', '.join(sorted(actions))})")
            if dest not in given:
                setattr(args, dest, _setting_value(path, key, value, action))
    if not getattr(args, "data_dir", None):
        raise UserError("give --data-dir DIR (or data_dir in --server-config FILE)")


def _setting_value(path: str, key: str, value, action: argparse.Action):
    """A settings-file value as the flag would give it (its type and choices; booleans for switches)."""
    where = f"--server-config {path}: {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise UserError(f"{where} must be a number or a string, got {value!r}")
    try:
        value = action.type(str(value)) if action.type else str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: not a valid value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    if action.dest in SETTINGS_PATHS and not Path(value).expanduser().is_absolute():
        value = str(Path(path).resolve().parent / Path(value).expanduser())
    return value


def host_port(host: str, port: int) -> str:
    """gRPC address of host and port (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def ready_file(args: argparse.Namespace) -> Path:
    """Where this server announces that it serves: --ready-file, else DATA_DIR/server.ready."""
    return Path(args.ready_file) if getattr(args, "ready_file", None) else Path(args.data_dir) / READY_FILE


class ReadyFile:
    """The file that says "this server serves" (JSON: pid, address, port, tls), written atomically
    (a temporary file renamed over it). Its space is reserved when the server starts, so that a
    full disk (which the server still serves reads from) cannot keep it from being written."""

    RESERVE = 1024  # bytes; the JSON is about 200

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.write_bytes(b" " * self.RESERVE)
        except OSError as exc:  # tried again in write()
            log.warning("cannot reserve the ready file %s: %s", self.tmp, exc)

    def write(self, info: dict) -> None:
        data = (json.dumps(info) + "\n").encode()
        with open(self.tmp, "r+b" if self.tmp.exists() else "wb") as f:  # in place: no new disk space
            f.write(data)
            f.truncate()
        os.replace(self.tmp, self.path)

    def remove(self) -> None:
        """At a clean stop, or when the start failed: remove ours (never another server's file)."""
        self.tmp.unlink(missing_ok=True)
        if (read_ready(self.path) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def read_ready(path: Path) -> dict | None:
    """The ready file's contents, or None while there is none (or it is not one)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info and "port" in info else None


def admin_token(data_dir: Path, token_file: str | None) -> tuple[str, str]:
    """(token, where it came from). A --admin-token-file that group or others can access is refused."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise UserError(f"--admin-token-file: no such file {path}")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise UserError(f"--admin-token-file {path} is accessible by group or others (mode {mode:04o}): "
                            f"refusing an admin token others can read or change; fix with: chmod 600 {path}")
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
        check_tls_pair(args.tls_cert, args.tls_key)
    return tls


def check_tls_pair(cert: str, key: str) -> None:
    """Refuse, naming what is wrong, a certificate or key that is not PEM or a key that does not
    belong to the certificate (gRPC itself would only fail to bind, which reads like a busy port),
    and a certificate outside its validity dates (:func:`check_certificate_dates`)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason:
            raise UserError(f"--tls-key {key} is not the private key of --tls-cert {cert}") from None
        if "PEM" in reason or "NO_START_LINE" in reason or "BAD_BASE64" in reason:
            raise UserError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and private key "
                            f"({reason})") from None
        raise UserError(f"--tls-cert {cert} / --tls-key {key}: {reason}") from None
    check_certificate_dates(cert)


CERT_WARN_DAYS = 30  # a certificate expiring sooner than this is logged as a WARNING at start


def check_certificate_dates(cert: str, now=None) -> None:
    """Refuse (UserError naming the file and the date) a certificate, or one of its chain, that has
    expired or is not valid yet: gRPC serves it without a word and every client then fails with
    "TLS handshake failed", which reads like the network. A WARNING when one expires within
    CERT_WARN_DAYS days. ``now``: an aware datetime (default: the clock)."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509

    now = now or datetime.now(timezone.utc)
    try:
        chain = x509.load_pem_x509_certificates(Path(cert).read_bytes())
    except (OSError, ValueError) as exc:
        raise UserError(f"--tls-cert {cert}: cannot read its certificates ({exc})") from None
    for i, c in enumerate(chain):
        which = f"--tls-cert {cert}" + (f" (certificate {i + 1} of its chain: {c.subject.rfc4514_string()})"
                                        if i else "")
        after, before = c.not_valid_after_utc, c.not_valid_before_utc
        if after <= now:
            raise UserError(f"{which} expired on {after:%Y-%m-%d %H:%M} UTC: renew it (or make a new one) and "
                            f"start the server with that; clients would fail with 'TLS handshake failed'")
        if before > now:
            raise UserError(f"{which} is not valid before {before:%Y-%m-%d %H:%M} UTC (now {now:%Y-%m-%d %H:%M} "
                            f"UTC): check this machine's clock, or use a certificate valid now")
        if after - now < timedelta(days=CERT_WARN_DAYS):
            log.warning("%s expires on %s UTC, in %.1f day(s): renew it before then, or every client will fail "
                        "with 'TLS handshake failed'", which, f"{after:%Y-%m-%d %H:%M}",
                        (after - now) / timedelta(days=1))


def _release_free_heap() -> None:
    """Give the heap that rebuilding the index freed (millions of row tuples) back to the OS, so
    the server's RSS is what it holds, not what it once read (glibc only; a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HeldLogs(logging.Handler):
    """Within ``with HeldLogs() as held:`` the root logger's records are held back until
    ``held.let_through()`` (written then, in order, and later ones at once) or the end of the block;
    ``held.drop()`` discards them: the start of a server that then refuses to serve a damaged
    store leaves its one-line error only."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] | None = []  # None: dropped
        self.released = False

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        if self.released:
            self._write(record)
        elif self.records is not None:
            self.records.append(record)

    def _write(self, record: logging.LogRecord) -> None:
        for handler in self.targets:
            if record.levelno >= handler.level:
                handler.handle(record)

    def let_through(self) -> None:  # (not release(): logging.Handler's own lock uses that name)
        with self.lock:  # emit() holds it too: no record overtakes the held ones
            if self.records is not None and not self.released:
                for record in self.records:
                    self._write(record)
                self.records, self.released = [], True

    def drop(self) -> None:
        with self.lock:
            self.records = None

    def __enter__(self) -> "HeldLogs":
        root = logging.getLogger()
        self.targets, root.handlers = root.handlers, [self]
        return self

    def __exit__(self, *exc) -> None:
        self.let_through()
        logging.getLogger().handlers = self.targets


PRIVATE_UMASK = 0o077  # the server's files (store, WAL, snapshots, admin.token, ...): 0600, folders 0700


def private_data_dir(data_dir: Path) -> int | None:
    """Create DATA_DIR (and missing parents) with mode 0700; an existing one that group or others
    can access is tightened to 0700 (UserError with the ``chmod 700`` fix if that fails) and its
    old mode returned, for the caller's WARNING; else None. The store, its snapshots and the
    admin token are this server's alone."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(data_dir.stat().st_mode)
    except OSError as exc:
        raise UserError(f"cannot create the data folder {data_dir}: {exc.strerror or exc}") from None
    if mode & 0o077:
        try:
            os.chmod(data_dir, 0o700)
        except OSError as exc:
            raise UserError(f"the data folder {data_dir} is accessible by group or others (mode {mode:04o}) and "
                            f"cannot be tightened ({exc.strerror or exc}); fix with: chmod 700 {data_dir}") from None
        return mode
    return None


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive OS lock (flock) on DATA_DIR/server.lock for the life of this process,
    so that two servers never share one store, whatever started them. Returns the lock's fd."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{data_dir} is in use by another cloud server (pid {holder}); stop it "
                        f"(dlheir server stop --data-dir {data_dir}) or give another --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def build_server(args: argparse.Namespace):
    """Create the grpc.Server (not started); returns (server, service, bound port, admin token source)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from dlheir.server.guard import Guard, StreamLimits
    from dlheir.proto import dlheir_cloud_pb2 as pb
    from dlheir.proto import dlheir_cloud_pb2_grpc as pb_grpc
    from dlheir.server.service import MAX_MESSAGE_BYTES, CloudStoreService
    from dlheir.server.store import StoreError, open_store

    tls = check_args(args)
    for flag in ("workers", "max_concurrent_rpcs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.consistency_wait < 0:
        raise UserError("--consistency-wait must be 0 or more seconds")
    for flag in ("stream_idle_timeout", "stream_write_timeout", "follow_poll"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.max_streams is None:
        args.max_streams = max(1, args.workers - max(1, args.workers // 4))
    if not 1 <= args.max_streams:
        raise UserError("--max-streams must be at least 1")
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise UserError(f"--metrics-port must be from 0 to 65535, got {metrics_port}")
    data_dir = Path(args.data_dir)
    loose_mode = private_data_dir(data_dir)
    args.lock_fd = lock_data_dir(data_dir)
    args.ready = ReadyFile(ready_file(args))  # only now: the ready file of a server refused the lock is not ours
    token, token_source = admin_token(data_dir, args.admin_token_file)
    max_bytes = args.max_store_mb * 1024 * 1024 if args.max_store_mb else None
    with HeldLogs() as held:  # a refused start prints one line, not the records of the load it cut short
        log.info("dlheir cloud server (pid %d) starting on %s", os.getpid(), data_dir)
        if loose_mode is not None:  # held like the rest: a refused start still prints one line
            log.warning("the data folder %s was accessible by group or others (mode %04o): tightened to 0700",
                        data_dir, loose_mode)
        from dlheir.server.mih import warm_up

        warming = threading.Thread(target=warm_up, name="warm-up", daemon=True)  # beside the store and index
        warming.start()
        try:
            # SQLite's quick_check runs in a thread while the index is loaded or rebuilt; nothing
            # is served before it passed
            store = open_store(data_dir, integrity_check=not args.skip_integrity_check, max_bytes=max_bytes,
                               check_in_background=True, store_url=args.store, blobs_url=args.blobs)
            check = store.integrity_check
            # the log flows again as soon as the check passed (usually long before a large index is ready)
            threading.Thread(target=lambda: check is None or check.wait() or held.let_through(), daemon=True).start()
            started = time.monotonic()
            try:
                service = CloudStoreService(store, token, args.shards, args.mih_min_items, args.index,
                                            follow_poll_s=args.follow_poll, consistency_wait_s=args.consistency_wait)
            except BaseException:
                store.verify()  # a store that fails the check explains a failed load: refuse as such
                raise
            index_s = time.monotonic() - started
            store.verify()
            waited_s = time.monotonic() - started - index_s
        except StoreError as exc:
            held.drop()
            raise UserError(str(exc)) from None
        log.info("index ready in %.1f s: %s; then waited %.1f s for the store's integrity check", index_s,
                 ", ".join(f"{c.name!r} {len(c.index)} items ({c.index.kind})" for c in service.collections.values())
                 or "no collections", waited_s)
    warming.join()  # the compiled search is loaded before the first request
    service.snapshot_rebuilt()  # only now: a snapshot is never taken of a store that failed the check
    if service.follower is not None:  # only now: the sweep of store.verify() ran before any change is applied
        service.follower.start()
    _release_free_heap()
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0)]
    streams = StreamLimits(args.max_streams, args.stream_write_timeout)
    args.metrics = None
    if metrics_port is not None:  # prometheus-client is imported only then
        from dlheir.server.metrics import MetricsEndpoint

        args.metrics = MetricsEndpoint()
    server = grpc.server(futures.ThreadPoolExecutor(args.workers), options=options,
                         interceptors=[Guard(service.known_token, args.stream_idle_timeout, streams,
                                             args.metrics.calls if args.metrics else None,
                                             service.consistent if service.follower is not None else None)],
                         maximum_concurrent_rpcs=args.max_concurrent_rpcs)
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
    if args.metrics is not None:
        args.metrics.watch(service, lambda: streams.active)
        try:
            args.metrics.start(args.host, metrics_port, args.tls_cert, args.tls_key)
        except OSError as exc:
            service.store.close()
            raise UserError(f"--metrics-port: cannot bind {host_port(args.host, metrics_port)} "
                            f"({exc.strerror or exc}): the port is in use or the address is not local") from None
        if not is_loopback(args.host) and not tls:
            log.warning("metrics served without TLS on %s (collection names, call counts): keep that port "
                        "behind a firewall", host_port(args.host, args.metrics.port))
    for name in ("", names[0]):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    service.health = health_servicer  # main() flips it to NOT_SERVING when shutting down
    return server, service, port, token_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlheir.server", description=__doc__)
    add_server_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        apply_server_config(parser, args, argv)
    except UserError as exc:
        print(f"dlheir server: error: {exc}", file=sys.stderr)
        return 2
    os.umask(PRIVATE_UMASK)  # whatever the caller's umask: every file this server creates is 0600
    # the server's own loggers at --log-level; libraries (faiss's loader, ...) at WARNING
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dlheir").setLevel(args.log_level)
    if args.log_format == "json":
        from dlheir.server.metrics import use_json_logs

        use_json_logs()
    try:
        server, service, port, token_source = build_server(args)
    except UserError as exc:  # one line, no traceback, no log record repeating it
        if getattr(args, "ready", None):
            args.ready.remove()
        if args.log_format == "json":  # one JSON line like the rest of the log
            log.error("dlheir server: error: %s", exc)
        else:
            print(f"dlheir server: error: {exc}", file=sys.stderr, flush=True)
        return 2
    server.start()
    scheme = "TLS" if args.tls_cert else "plaintext"
    log.info("dlheir cloud server (pid %d) listening on %s (%s; admin token: %s; %d collection(s), %d item(s) "
             "indexed; %d workers, at most %d calls and %d streams at once, idle streams cancelled after %.0f s, "
             "unread ones after %.0f s)",
             os.getpid(), host_port(args.host, port), scheme, token_source, len(service.collections),
             sum(len(c.index) for c in service.collections.values()), args.workers, args.max_concurrent_rpcs,
             args.max_streams, args.stream_idle_timeout, args.stream_write_timeout)
    metrics = getattr(args, "metrics", None)
    if metrics is not None:
        log.info("Prometheus metrics on %s://%s/metrics", "https" if args.tls_cert else "http",
                 host_port(args.host, metrics.port))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # bound, started and health SERVING: launchers (dlheir.server.cli.wait_ready) wait for this file
    info = {"pid": os.getpid(), "address": host_port(args.host, port), "host": args.host,
            "port": port, "tls": bool(args.tls_cert), "data_dir": str(Path(args.data_dir).resolve())}
    if metrics is not None:
        info["metrics_port"] = metrics.port
    service.address = info["address"]
    if service.follower is not None:
        service.follower.set_address(info["address"])
    try:
        args.ready.write(info)
    except OSError as exc:  # serve anyway (a foreground server needs no launcher); launchers will time out
        log.error("cannot write the ready file %s (%s): launchers waiting for it will give up", args.ready.path, exc)
    stop.wait()
    args.ready.remove()  # not ready any more (and never left behind stale)
    log.info("stopping: finishing calls in progress (2 s grace)")
    service.health.enter_graceful_shutdown()  # health checks answer NOT_SERVING from here
    server.stop(grace=2).wait()
    if service.follower is not None:
        service.follower.stop()
    service.save_snapshots()  # the next start loads these instead of rebuilding the index
    service.store.close()
    if metrics is not None:
        metrics.stop()
    log.info("stopped")
    return 0
