"""Real storage engines on loopback for the store backend's tests: a throwaway PostgreSQL cluster and a
throwaway Ceph cluster (one monitor, one in-memory OSD, the RADOS gateway) speaking S3.

Each engine lives in its own temporary folder (data, config, sockets, logs), listens on 127.0.0.1 only,
and is torn down by the PIDs it started, never by process name. ``postgres_engine`` and ``s3_engine``
are session-scoped pytest fixtures that skip, with the command that installs the engine, when its
binaries are missing (``make engines``).

Run ``python tests/engines.py`` to start both, time them and print a small S3 throughput figure."""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from dlheir.procs import free_port


def _pg_bin() -> Path:
    """$DLHEIR_PG_BIN, else Debian's newest /usr/lib/postgresql/<version>/bin (15 on bookworm), else initdb's
    folder on PATH."""
    if os.environ.get("DLHEIR_PG_BIN"):
        return Path(os.environ["DLHEIR_PG_BIN"])
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")
PG_PACKAGES = "postgresql"
CEPH_PACKAGES = "radosgw ceph-mon ceph-osd ceph-common"


def install_hint(packages: str) -> str:
    return f"make engines (or, as root: apt-get install -y --no-install-recommends {packages})"


# ---------------------------------------------------------------------------------------------------
# process helpers (by PID, never by name)
# ---------------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (zombies excluded), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if fields[0] != "Z" and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _kill_tree(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGKILL a child and all its descendants (by PID: the parent is stopped first so that it cannot
    fork while its descendants are listed; PostgreSQL's children put themselves in their own process
    groups, so a process-group kill would miss them), then wait until they are all gone."""
    if process is None:
        return
    pids = []
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        todo = [process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(_children(pid))
    for pid in reversed(pids):  # parent last (it is stopped)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _stop_tree(process: subprocess.Popen | None, sig: int, timeout: float = 15.0) -> None:
    """Send ``sig`` to the child (its own clean stop), wait for it to exit; SIGKILL it and its descendants
    if it does not within ``timeout`` s."""
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _kill_tree(process)


_LIVE: set = set()  # engines started and not yet stopped or closed


@atexit.register
def _stop_leftovers() -> None:
    """Last resort when a fixture's teardown did not run (the engines' daemons would outlive Python)."""
    for engine in list(_LIVE):
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _as_user(user: str | None) -> dict:
    """Popen keyword arguments that run the child as ``user`` (only when we are root)."""
    if user is None or os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _run(cmd: list[str], *, user: str | None = None, timeout: float = 60.0, **kw) -> str:
    """Run a command to completion; raise with its output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **_as_user(user), **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------

class PostgresEngine:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, database ``dlheir``, trust auth for
    127.0.0.1 only, fsync on. Run as the ``postgres`` OS user when we are root (initdb refuses root)."""

    DATABASE = "dlheir"

    def __init__(self, bin_dir: Path = PG_BIN):
        self.bin_dir = Path(bin_dir)
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root: Path | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @staticmethod
    def missing(bin_dir: Path = PG_BIN) -> list[str]:
        missing = [str(bin_dir / b) for b in ("initdb", "postgres") if not os.access(bin_dir / b, os.X_OK)]
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                missing.append("OS user postgres")
        return missing

    # the folder: root/data (the cluster), root/sock (unix socket), root/postgres.log
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.DATABASE}"

    def _init(self) -> None:
        # Not under pytest's tmp_path: its parents are mode 0700 and the postgres user could not reach it.
        parent = None
        if self.user is not None and not os.stat(tempfile.gettempdir()).st_mode & 0o001:
            parent = "/tmp"  # $TMPDIR is closed to other users
        self.root = Path(tempfile.mkdtemp(prefix="dlheir-pg-", dir=parent))
        (self.root / "sock").mkdir()
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            for p in (self.root, self.root / "sock"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        _run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-E", "UTF8",
              "--locale=C", "--auth=trust", "--no-sync", "--no-instructions"], user=self.user, cwd=self.root)
        self.port = free_port()
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# dlheir test engine\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.root / 'sock'}'\n"
                    "fsync = on\n"
                    # crash recovery syncs the file system once instead of fsyncing every file first
                    "recovery_init_sync_method = syncfs\n"
                    "synchronous_commit = on\n"
                    "full_page_writes = on\n"
                    "max_connections = 50\n"
                    "shared_buffers = 32MB\n"
                    "logging_collector = off\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "# dlheir test engine: trust on 127.0.0.1 only (no unix-socket or ::1 access)\n"
            "host all all 127.0.0.1/32 trust\n")

    def start(self) -> PostgresEngine:
        """Create the cluster (first time), start the postmaster, wait until it accepts connections."""
        t0 = time.monotonic()
        first = self.root is None
        if first:
            self._init()
            _LIVE.add(self)
        if self.pid is not None:
            return self
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root, start_new_session=True, **_as_user(self.user))
        log.close()
        self._wait_ready("postgres")
        if first:
            import psycopg

            with psycopg.connect(self._url("postgres"), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {self.DATABASE}")
        self.start_seconds = time.monotonic() - t0
        return self

    def _url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self, prefix: str = "t") -> tuple[str, str]:
        """(name, URL) of a new empty database with a random name starting with ``prefix``."""
        import psycopg

        name = prefix + os.urandom(8).hex()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name, self._url(name)

    def _wait_ready(self, db: str, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}:\n{_tail(self.log_path)}")
            try:
                with psycopg.connect(self._url(db), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {timeout} s:\n{_tail(self.log_path)}")
                time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        _stop_tree(self.process, signal.SIGINT)

    def kill(self) -> None:
        """A crash: SIGKILL the postmaster and every child process; the next start recovers from the WAL."""
        _kill_tree(self.process)

    def restart(self) -> PostgresEngine:
        """Start again on the same data folder and port (after ``stop()`` or ``kill()``)."""
        if self.pid is not None:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the folder."""
        try:
            self.stop()
        finally:
            _LIVE.discard(self)
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# Ceph: monitor + in-memory OSD + RADOS gateway (S3)
# ---------------------------------------------------------------------------------------------------

CEPH_CONF = """\
# dlheir test engine: a one-monitor, one-OSD (memstore) Ceph cluster and an S3 gateway, on 127.0.0.1 only.
# Every path is inside {root}; nothing under /etc/ceph or /var/lib/ceph is read or written.
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.1/32
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
ms bind msgr2 = true
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
ms cluster mode = crc
ms service mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms mon client mode = crc
keyring = {root}/keyring
run dir = {root}/run
admin socket = {root}/run/$cluster-$name.asok
pid file = {root}/run/$cluster-$name.pid
log file = {root}/log/$cluster-$name.log
log to stderr = false
err to stderr = false
log to syslog = false
mon cluster log file = {root}/log/$cluster.log
mon cluster log to syslog = false
crash dir = {root}/crash
exec dir = {root}/run
mon data = {root}/mon/$cluster-$id
osd data = {root}/osd/$cluster-$id
mgr data = {root}/mgr/$cluster-$id
mds data = {root}/mds/$cluster-$id
rgw data = {root}/rgw/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
mon osd full ratio = .99
mon osd nearfull ratio = .98
osd fast shutdown = true
# the monitor batches map changes for 1 s by default: each pool RGW creates, and the OSD's boot, waited for it
# (start 13 s; 1.6 s with these)
paxos propose interval = 0.01
paxos min wait = 0.01
debug ms = 0

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw zone = default
rgw thread pool size = 64
rgw enable usage log = false
rgw enable ops log = false
"""


class S3Engine:
    """A throwaway Ceph cluster (one monitor, one in-memory OSD) with the RADOS gateway serving S3 on
    http://127.0.0.1:<free port>, and an S3 user ``dlheir``."""

    REGION = "us-east-1"

    def __init__(self, memstore_bytes: int = 1 << 30):
        self.memstore_bytes = memstore_bytes
        self.root: Path | None = None
        self.fsid = str(uuid.uuid4())
        self.mon_port: int | None = None
        self.port: int | None = None
        self.access_key = "DLHEIR" + uuid.uuid4().hex[:14].upper()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}

    @staticmethod
    def missing() -> list[str]:
        return [b for b in CEPH_BINARIES if shutil.which(b) is None]

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> dict[str, int | None]:
        return {name: (p.pid if p is not None and p.poll() is None else None)
                for name, p in (("mon", self.mon), ("osd", self.osd), ("radosgw", self.gateway))}

    def _ceph(self, *args: str, timeout: float = 30.0) -> str:
        return _run(["ceph", "-c", str(self.conf), "--connect-timeout", "15", *args], timeout=timeout)

    def _daemon(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        try:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.root, start_new_session=True)
        finally:
            log.close()

    def start(self) -> S3Engine:
        """Create and start the cluster (monitor, OSD, gateway) and the S3 user; about 1.5 s."""
        if self.root is not None:
            raise RuntimeError("this S3Engine was started already (use start_gateway() after kill_gateway())")
        t0 = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="dlheir-ceph-"))
        _LIVE.add(self)
        for d in ("run", "log", "crash", "mon", "osd", "rgw"):
            (self.root / d).mkdir()
        self.mon_port, self.port = free_port(), free_port()
        while self.port == self.mon_port:
            self.port = free_port()
        self.conf.write_text(CEPH_CONF.format(root=self.root, fsid=self.fsid, mon_port=self.mon_port,
                                              rgw_port=self.port, memstore_bytes=self.memstore_bytes))
        try:
            self._start_mon()
            self.timings["mon"] = time.monotonic() - t0
            self._start_osd()
            self.timings["osd"] = time.monotonic() - t0
            self.start_gateway()
            self._make_user()
            self.timings["total"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def _start_mon(self) -> None:
        keyring = str(self.root / "keyring")
        _run(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])
        _run(["ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
              "--cap", "osd", "allow *", "--cap", "mgr", "allow *"])
        monmap = str(self.root / "monmap")
        _run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]",
              monmap])
        _run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring])
        self.mon = self._daemon("mon.a", ["ceph-mon", "-c", str(self.conf), "-f", "-i", "a"])
        self._wait(lambda: self._ceph("mon", "stat", timeout=20), "ceph-mon", self.mon, "mon.a")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        (self.root / "osd" / f"ceph-{osd_id}").mkdir()
        _run(["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], timeout=60)
        self.osd = self._daemon(f"osd.{osd_id}", ["ceph-osd", "-c", str(self.conf), "-f", "-i", osd_id])

        def up():
            osds = json.loads(self._ceph("osd", "dump", "--format", "json"))["osds"]
            if not osds or not osds[0]["up"]:
                raise RuntimeError("osd not up yet")
        self._wait(up, "ceph-osd", self.osd, f"osd.{osd_id}")

    def start_gateway(self, timeout: float = 60.0) -> None:
        """Start radosgw (again) on the same port; wait until it answers HTTP."""
        if self.gateway is not None and self.gateway.poll() is None:
            return
        t0 = time.monotonic()
        self.gateway = self._daemon("client.rgw", ["radosgw", "-c", str(self.conf), "-f", "-n", "client.rgw"])

        def answers():
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(self.endpoint, timeout=2).read()
            except urllib.error.HTTPError:
                pass  # any HTTP answer will do
        self._wait(answers, "radosgw", self.gateway, "client.rgw", timeout)
        self.timings["gateway"] = time.monotonic() - t0

    def _make_user(self) -> None:
        _run(["radosgw-admin", "-c", str(self.conf), "-n", "client.rgw", "user", "create", "--uid=dlheir",
              "--display-name=dlheir", f"--access-key={self.access_key}", f"--secret={self.secret_key}"])

    def _wait(self, probe, what: str, process: subprocess.Popen, log_name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited {process.returncode}:\n"
                                   f"{_tail(self.root / 'log' / f'ceph-{log_name}.log')}\n"
                                   f"{_tail(self.root / 'log' / f'{log_name}.out')}")
            try:
                probe()
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} not ready after {timeout} s: {e}\n"
                                       f"{_tail(self.root / 'log' / f'ceph-{log_name}.log')}") from e
                time.sleep(0.1)

    def kill_gateway(self) -> None:
        """SIGKILL radosgw only (the monitor and the OSD keep running)."""
        _kill_tree(self.gateway)

    def stop(self) -> None:
        """SIGKILL every process this engine started (gateway, OSD, monitor), by PID; remove the folder."""
        for process in (self.gateway, self.osd, self.mon):
            _kill_tree(process)
        _LIVE.discard(self)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    close = stop

    def client(self, connect_timeout: float = 5.0, read_timeout: float = 30.0, max_attempts: int = 3):
        """A boto3 S3 client for this gateway (path-style addressing, region us-east-1)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                          connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"max_attempts": max_attempts, "mode": "standard"}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> S3Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------
# pytest fixtures (session-scoped; conftest.py imports them)
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_engine():
    """A running PostgresEngine for the whole session; skips (one line) when PostgreSQL is not installed."""
    missing = PostgresEngine.missing()
    if missing:
        pytest.skip(f"PostgreSQL not installed ({', '.join(missing)}): run {install_hint(PG_PACKAGES)}")
    engine = PostgresEngine()
    try:
        engine.start()
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def s3_engine():
    """A running S3Engine (Ceph RGW) for the whole session; skips (one line) when Ceph is not installed."""
    missing = S3Engine.missing()
    if missing:
        pytest.skip(f"Ceph RGW not installed ({', '.join(missing)}): run {install_hint(CEPH_PACKAGES)}")
    engine = S3Engine().start()
    try:
        yield engine
    finally:
        engine.stop()


def s3_throughput(engine: S3Engine, bucket: str, n: int = 100, size: int = 1024) -> dict[str, float]:
    """PUT, GET, LIST and DELETE ``n`` small objects; return PUT/s, GET p50 (ms) and the totals."""
    s3 = engine.client()
    body = os.urandom(size)
    puts, gets = [], []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        s3.put_object(Bucket=bucket, Key=f"bench/{i:04d}", Body=body)
        puts.append(time.perf_counter() - t)
    put_s = time.perf_counter() - t0
    for i in range(n):
        t = time.perf_counter()
        got = s3.get_object(Bucket=bucket, Key=f"bench/{i:04d}")["Body"].read()
        gets.append(time.perf_counter() - t)
        assert got == body
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="bench/")
            for o in page.get("Contents", [])]
    assert len(keys) == n, len(keys)
    t = time.perf_counter()
    for i in range(0, n, 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
    del_s = time.perf_counter() - t
    left = s3.list_objects_v2(Bucket=bucket, Prefix="bench/").get("KeyCount", 0)
    assert left == 0, left
    puts.sort()
    gets.sort()
    ms = 1000.0
    return {"n": n, "size": size, "put_per_s": round(n / put_s, 1), "put_p50_ms": round(puts[n // 2] * ms, 2),
            "put_max_ms": round(puts[-1] * ms, 2), "get_p50_ms": round(gets[n // 2] * ms, 2),
            "get_p90_ms": round(gets[int(n * 0.9)] * ms, 2), "get_max_ms": round(gets[-1] * ms, 2),
            "delete_ms": round(del_s * ms, 2)}

def run_with_engines(argv: list[str]) -> int:
    """``python tests/engines.py run -- CMD ...``: start PostgreSQL and Ceph RGW, make a database and
    a bucket, run CMD with ``{store}`` and ``{blobs}`` replaced by their URLs (and the S3
    credentials in the AWS environment variables), stop both. For benchmarks on the engines."""

    with PostgresEngine() as pg, S3Engine() as s3e:
        name, store = pg.new_database("bench")
        s3e.make_bucket(name)
        urls = {"store": store, "blobs": f"s3://{name}?endpoint={s3e.endpoint}"}
        env = {**os.environ, "AWS_ACCESS_KEY_ID": s3e.access_key, "AWS_SECRET_ACCESS_KEY": s3e.secret_key}
        cmd = [a.format(**urls) for a in argv]
        print(f"engines up: PostgreSQL {urls['store']}, Ceph RGW {s3e.endpoint}; running: {' '.join(cmd)}", flush=True)
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["run"]:
        args = sys.argv[2:]
        sys.exit(run_with_engines(args[1:] if args[:1] == ["--"] else args))
    with PostgresEngine() as pg:
        print(f"postgres: {pg.dsn} pid {pg.pid} started in {pg.start_seconds:.2f} s")
        pg.kill()
        pg.restart()
        print(f"postgres: restarted after kill in {pg.start_seconds:.2f} s")
    with S3Engine() as s3e:
        print(f"s3: {s3e.endpoint} pids {s3e.pids} timings {s3e.timings}")
        s3e.make_bucket("bench")
        print("s3:", s3_throughput(s3e, "bench"))
