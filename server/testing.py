"""Run a real cloud server in a subprocess on a free loopback port (tests, demo, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from dlheir.procs import stop_process
from dlheir.server.app import READY_FILE
from dlheir.server.cli import open_private_log, wait_ready


def proc_status_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/{pid}/status")


def self_signed_certificate(folder: Path, days: int = 90) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``folder``: a self-signed certificate for 127.0.0.1 and localhost,
    valid for ``days`` days from now (the default, past the server's 30-day expiry warning, starts
    it without one), made with the openssl CLI."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


# Run every test server on the real engines instead of the embedded store: $DLHEIR_TEST_PG names a
# PostgreSQL cluster (postgresql://USER@HOST:PORT), $DLHEIR_TEST_S3 an S3 endpoint (credentials
# from the AWS environment variables). Each data dir gets its own database and bucket, named
# from its path, so that a server restarted on the same data dir finds the same store.
TEST_PG_ENV, TEST_S3_ENV = "DLHEIR_TEST_PG", "DLHEIR_TEST_S3"


def engines_for(data_dir: Path) -> tuple[str | None, str | None]:
    """(store URL, blobs URL) for a test server on ``data_dir`` from $DLHEIR_TEST_PG/$DLHEIR_TEST_S3
    (made on first use), or (None, None): the embedded store."""
    import hashlib

    base = os.environ.get(TEST_PG_ENV)
    if not base:
        return None, None
    name = "t" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:20]
    import psycopg

    with psycopg.connect(base.rstrip("/") + "/postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    blobs = None
    endpoint = os.environ.get(TEST_S3_ENV)
    if endpoint:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        blobs = f"s3://{name}?endpoint={endpoint}"
    return f"{base.rstrip('/')}/{name}", blobs


class CloudServerProcess:
    """``python -m dlheir.server`` in the foreground as a child process, on 127.0.0.1.

    ``start()`` returns once the server's ready file (DATA_DIR/server.ready) names this process:
    port bound, index rebuilt, health SERVING; without ``port`` the server binds port 0 and the
    ready file says which port it got. ``stop()`` sends SIGTERM, ``kill()`` SIGKILL. The admin
    token is generated into ``data_dir/admin.token`` (``DLHEIR_ADMIN_TOKEN`` is removed from the child's environment). ``tls_cert``/``tls_key``
    start it with TLS; the certificate must be valid for 127.0.0.1 (clients use it as their CA)."""

    def __init__(self, data_dir: Path | str, port: int | None = None, extra_args: list[str] | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 store_url: str | None = None, blobs_url: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or 0  # 0: the server picks a free port, read back from its ready file
        self.extra_args = list(extra_args or [])
        if tls_cert:
            self.extra_args += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        if store_url is None and blobs_url is None:
            store_url, blobs_url = engines_for(self.data_dir)
        if store_url:
            self.extra_args += ["--store", store_url]
        if blobs_url:
            self.extra_args += ["--blobs", blobs_url]
        self.store_url, self.blobs_url = store_url, blobs_url
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def start(self) -> "CloudServerProcess":
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = self.data_dir / "server.log"
        env = {k: v for k, v in os.environ.items() if k != "DLHEIR_ADMIN_TOKEN"}
        with open_private_log(log_path) as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dlheir.server", "--data-dir", str(self.data_dir), "--port", str(self.port),
                 *self.extra_args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            self.port = wait_ready(self.data_dir / READY_FILE, self.process)["port"]
        except Exception:
            self.kill()
            raise
        return self

    def __enter__(self) -> "CloudServerProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill(self) -> None:
        """kill -9: no chance to flush or clean up."""
        if self.process:
            stop_process(self.process, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (the server's clean stop), SIGKILL if it is still there after 10 s."""
        if self.process:
            stop_process(self.process, signal.SIGTERM, timeout=10.0)


@contextlib.contextmanager
def run_cloud_server(data_dir: Path | str, **kwargs) -> Iterator[CloudServerProcess]:
    server = CloudServerProcess(data_dir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
