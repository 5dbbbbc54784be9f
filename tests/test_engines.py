"""The real storage engines of tests/engines.py start, work, and survive what the store tests do to them:
PostgreSQL keeps committed rows across a crash (SIGKILL) and restart; the S3 gateway (Ceph RGW) fails
fast while killed and serves the same objects once started again."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from engines import postgres_engine, s3_engine, s3_throughput  # noqa: F401

pytestmark = pytest.mark.slow


def _pg_connect(engine):
    import psycopg

    return psycopg.connect(engine.dsn, connect_timeout=5)


def test_engines_missing_binaries_are_named(monkeypatch):
    from engines import PostgresEngine, S3Engine

    monkeypatch.setenv("PATH", "/nonexistent")
    assert "radosgw" in S3Engine.missing() and "ceph-mon" in S3Engine.missing()
    assert PostgresEngine.missing(Path("/nonexistent")) == ["/nonexistent/initdb", "/nonexistent/postgres"]


def test_postgres_starts_on_loopback(postgres_engine, capsys):  # noqa: F811
    assert postgres_engine.pid is not None
    assert postgres_engine.dsn == f"postgresql://postgres@127.0.0.1:{postgres_engine.port}/dlheir"
    with _pg_connect(postgres_engine) as conn:
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SELECT current_database()").fetchone()[0] == "dlheir"
    with capsys.disabled():
        print(f"\n[postgres engine] up in {postgres_engine.start_seconds:.2f} s at {postgres_engine.dsn}")


def test_postgres_table_roundtrip(postgres_engine):  # noqa: F811
    table = f"t_{uuid.uuid4().hex[:8]}"
    with _pg_connect(postgres_engine) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"row{i}") for i in range(10)])
        conn.commit()
        rows = conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()
    assert rows == [(i, f"row{i}") for i in range(10)]


def test_postgres_survives_kill_and_restart(postgres_engine):  # noqa: F811
    import psycopg

    table = f"crash_{uuid.uuid4().hex[:8]}"
    port, old_pid = postgres_engine.port, postgres_engine.pid
    conn = _pg_connect(postgres_engine)  # not `with`: leaving the block would commit on the dead connection
    try:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 100)")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES (1000)")  # never committed: must be gone after the crash
        postgres_engine.kill()
    finally:
        conn.close()
    assert postgres_engine.pid is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_engine.dsn, connect_timeout=2).close()
    postgres_engine.restart()
    assert postgres_engine.port == port and postgres_engine.pid not in (None, old_pid)
    with _pg_connect(postgres_engine) as conn:
        ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
    assert ids == list(range(1, 101))
    print(f"\npostgres restarted after SIGKILL in {postgres_engine.start_seconds:.2f} s")


def test_s3_put_get_list_delete(s3_engine, capsys):  # noqa: F811
    assert s3_engine.endpoint == f"http://127.0.0.1:{s3_engine.port}"
    bucket = s3_engine.make_bucket(f"rt-{uuid.uuid4().hex[:8]}")
    s3 = s3_engine.client()
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    stats = s3_throughput(s3_engine, bucket, n=100, size=1024)
    with capsys.disabled():  # shown in `make test`'s output too, not only with -s
        timings = ", ".join(f"{k} {v:.2f} s" for k, v in s3_engine.timings.items())
        print(f"\n[s3 engine] Ceph RGW up in {s3_engine.timings['total']:.2f} s ({timings}); 100 x 1 KiB objects: "
              f"{stats['put_per_s']:.0f} PUT/s, GET p50 {stats['get_p50_ms']:.2f} ms ({stats})")
    s3.put_object(Bucket=bucket, Key="a/b.bin", Body=b"\x00hello\xff")
    assert s3.get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == b"\x00hello\xff"
    s3.delete_object(Bucket=bucket, Key="a/b.bin")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    s3.delete_bucket(Bucket=bucket)


def test_s3_gateway_kill_and_restart(s3_engine):  # noqa: F811
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = s3_engine.make_bucket(f"gw-{uuid.uuid4().hex[:8]}")
    s3 = s3_engine.client()
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=f"value {i}".encode())
    port, old_pid = s3_engine.port, s3_engine.pids["radosgw"]

    s3_engine.kill_gateway()
    assert s3_engine.pids["radosgw"] is None and s3_engine.pids["osd"] and s3_engine.pids["mon"]
    fast = s3_engine.client(connect_timeout=1, read_timeout=2, max_attempts=1)
    t = time.monotonic()
    with pytest.raises((BotoCoreError, ClientError)):
        fast.get_object(Bucket=bucket, Key="k0")
    assert time.monotonic() - t < 3

    s3_engine.start_gateway()
    assert s3_engine.port == port and s3_engine.pids["radosgw"] not in (None, old_pid)
    s3 = s3_engine.client()
    for i in range(5):
        assert s3.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == f"value {i}".encode()
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]) == [f"k{i}" for i in range(5)]
    print(f"\nradosgw restarted in {s3_engine.timings['gateway']:.2f} s")
