"""The PostgreSQL + S3 store backend (issue 17) against real engines on loopback: PostgreSQL
(tests/engines.py, Debian's) and Ceph RGW (a monitor, an in-memory OSD, the S3 gateway), and
real cloud-server processes started with --store/--blobs. Kill -9 of the server, of PostgreSQL
and of the gateway in the middle of uploads: nothing acknowledged is lost."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.codes import hamming
from dlheir.contract import rank
from dlheir.server.testing import CloudServerProcess
from engines import postgres_engine, s3_engine  # noqa: F401 (fixtures)


@pytest.fixture
def engines(postgres_engine, s3_engine, monkeypatch):  # noqa: F811
    """A fresh database and bucket for one test; the server reads the S3 credentials from the
    usual AWS environment variables."""
    name, store = postgres_engine.new_database()
    s3_engine.make_bucket(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_engine.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_engine.secret_key)
    return {"store": store, "blobs": f"s3://{name}?endpoint={s3_engine.endpoint}", "bucket": name,
            "pg": postgres_engine, "s3": s3_engine}


def start(tmp_path, engines, **kw) -> CloudServerProcess:
    return CloudServerProcess(tmp_path / "cloud", store_url=engines["store"], blobs_url=engines["blobs"], **kw).start()


def owner_of(server, name="c", bits=48, private=False) -> CloudClient:
    with CloudClient(server.address) as admin:
        owner_token, _ = admin.create_collection(name, bits, server.admin_token, private=private)
    return CloudClient(server.address, owner_token)


def objects(engines) -> list[str]:
    s3 = engines["s3"].client()
    return [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=engines["bucket"])
            for o in p.get("Contents", [])]


def test_exact_search_blobs_deletes_and_restart_on_postgresql_and_s3(tmp_path, engines):
    server = start(tmp_path, engines)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (2000, 6), dtype=np.uint8)
    ids = rng.choice(2**62, size=len(codes), replace=False)
    blobs = {int(i): rng.bytes(int(rng.integers(10, 3000))) for i in ids}
    try:
        owner = owner_of(server)
        list(owner.upload("c", [(int(i), c.tobytes(), blobs[int(i)], {"n": str(i)}) for i, c in zip(ids, codes)],
                          batch_size=500))
        assert len(objects(engines)) == len(ids)  # every blob in the object store, none in PostgreSQL
        assert owner.delete("c", [int(i) for i in ids[:100]]) == 100
        list(owner.upload("c", [(int(ids[100]), codes[100].tobytes(), b"replaced", {})], replace=True))
        blobs[int(ids[100])] = b"replaced"
        assert len(objects(engines)) == len(ids) - 100  # deleted and replaced blobs' old objects are gone
        server.stop()
        server = start(tmp_path, engines)  # the index is rebuilt from PostgreSQL
        owner = CloudClient(server.address, owner.token)
        kept_ids, kept = ids[100:], codes[100:]
        queries = np.concatenate([rng.integers(0, 256, (4, 6), dtype=np.uint8), kept[:2]])
        for (got_ids, got_d), q in zip(owner.search("c", queries, 50), queries):
            d = hamming(q[None, :], kept)[0]
            order = rank(d, kept_ids)[:50]
            np.testing.assert_array_equal(got_ids, kept_ids[order])
            np.testing.assert_array_equal(got_d, d[order])
        sample = sorted(int(i) for i in kept_ids[:50])
        assert {i: b for i, b, _ in owner.fetch("c", sample)} == {i: blobs[i] for i in sample}
        assert owner.stats("c").items == len(kept_ids)
        # a deleted collection's objects go with it
        with CloudClient(server.address) as admin:
            admin.delete_collection("c", server.admin_token)
        assert objects(engines) == []
    finally:
        server.stop()


def test_private_mode_pages_live_in_postgresql(tmp_path, engines):
    server = start(tmp_path, engines)
    try:
        owner = owner_of(server, "p", private=True)
        from dlheir.client.private import append_code_page, sync_code_pages
        from dlheir.contract import PAGE_MAGIC, PAGE_VERSION

        page = PAGE_MAGIC + bytes([PAGE_VERSION]) + bytes(4) + os.urandom(60)
        assert append_code_page(owner, "p", 0, page) == 1
        server.stop()
        server = start(tmp_path, engines)
        owner = CloudClient(server.address, owner.token)
        header, pages = sync_code_pages(owner, "p", 0)
        assert header.pages == 1 and list(pages) == [(0, page)]
    finally:
        server.stop()


def _upload_until_killed(owner, blobs, kill, after=1000):
    acked, errors = [], []

    def upload():
        try:
            for ack in owner.upload("c", ((i, bytes(6), blobs[i], {}) for i in blobs), batch_size=100):
                acked.extend(ack.ids)
        except CloudError as exc:
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 90
    while len(acked) < after and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    kill()
    thread.join(60)
    assert acked and len(acked) < len(blobs) and errors, "the kill should interrupt the upload"
    return acked, errors


def _check_nothing_acknowledged_was_lost(owner, blobs, acked):
    present = owner.contains("c", list(blobs))
    assert set(acked) <= present
    assert owner.stats("c").items == len(present) and len(present) % 100 == 0  # whole batches only
    got = {i: b for i, b, _ in owner.fetch("c", sorted(present))}
    assert got == {i: blobs[i] for i in present}  # every stored item has its blob
    (ids, _), = owner.search("c", np.zeros((1, 6), np.uint8), k=len(present))
    assert set(ids.tolist()) == present


def test_kill_9_of_the_server_loses_no_acknowledged_item_and_orphans_are_swept(tmp_path, engines):
    server = start(tmp_path, engines)
    owner = owner_of(server)
    rng = np.random.default_rng(0)
    blobs = {i: rng.bytes(512) for i in range(6000)}
    acked, _ = _upload_until_killed(owner, blobs, server.kill)
    # the state a crash between a batch's PUTs and its commit leaves, made exactly: the key journaled
    # (committed before the PUT), the object stored, no row naming it
    import psycopg

    uid = sorted({k.split("/")[1] for k in objects(engines)})[0]
    orphan = f"collection/{uid}/123/orphan"
    with psycopg.connect(engines["store"], autocommit=True) as conn:
        conn.execute("INSERT INTO blob_journal VALUES (%s, %s)", (orphan, time.time()))
    engines["s3"].client().put_object(Bucket=engines["bucket"], Key=orphan, Body=b"x")
    stray = f"collection/{uid}/456/not-journaled"  # an object the server never wrote: not its to delete
    engines["s3"].client().put_object(Bucket=engines["bucket"], Key=stray, Body=b"y")
    time.sleep(1.1)  # the sweep removes only what was journaled before the server's start
    server = start(tmp_path, engines)
    try:
        owner = CloudClient(server.address, owner.token)
        _check_nothing_acknowledged_was_lost(owner, blobs, acked)
        left = objects(engines)
        assert orphan not in left and stray in left
        assert len(left) == owner.stats("c").items + 1  # the orphans (and the cut batch's) are gone
        with psycopg.connect(engines["store"], autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM blob_journal").fetchone()[0] == 0
    finally:
        server.stop()


def test_postgresql_killed_mid_upload_is_unavailable_then_recovers_by_itself(tmp_path, engines):
    server = start(tmp_path, engines)
    pg = engines["pg"]
    try:
        owner = owner_of(server)
        rng = np.random.default_rng(1)
        blobs = {i: rng.bytes(256) for i in range(5000)}
        acked, errors = _upload_until_killed(owner, blobs, pg.kill, after=500)
        assert any("PostgreSQL" in str(e) for e in errors), [str(e) for e in errors]
        assert all("\n" not in str(e) for e in errors)
        with pytest.raises(CloudError) as info:  # down: one line naming the engine
            owner.stats("c")
        assert "PostgreSQL" in str(info.value) and info.value.code.name == "UNAVAILABLE"
        pg.restart()
        _check_nothing_acknowledged_was_lost(owner, blobs, acked)  # the same server process, no restart
        list(owner.upload("c", [(10**9, bytes(6), b"after", {})]))
        assert owner.stats("c").items == len(owner.contains("c", list(blobs))) + 1
    finally:
        server.stop()
        if pg.pid is None:
            pg.restart()


def test_gateway_killed_mid_upload_is_unavailable_then_recovers_by_itself(tmp_path, engines):
    server = start(tmp_path, engines)
    s3 = engines["s3"]
    try:
        owner = owner_of(server)
        rng = np.random.default_rng(2)
        blobs = {i: rng.bytes(256) for i in range(5000)}
        acked, errors = _upload_until_killed(owner, blobs, s3.kill_gateway, after=500)
        assert any("object store" in str(e) for e in errors), [str(e) for e in errors]
        with pytest.raises(CloudError) as info:
            list(owner.fetch("c", acked[:1]))
        assert "object store" in str(info.value) and info.value.code.name == "UNAVAILABLE"
        s3.start_gateway()
        _check_nothing_acknowledged_was_lost(owner, blobs, acked)
    finally:
        server.stop()


@pytest.mark.parametrize("bad", ["no database", "unreachable", "no bucket", "wrong secret"])
def test_bad_engine_settings_are_one_line_naming_the_engine(tmp_path, engines, monkeypatch, bad):
    from dlheir.procs import free_port

    store, blobs = engines["store"], engines["blobs"]
    if bad == "no database":
        store = store.rsplit("/", 1)[0] + "/nosuchdb"
    elif bad == "unreachable":
        store = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    elif bad == "no bucket":
        blobs = blobs.replace(f"s3://{engines['bucket']}", "s3://nosuchbucket")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dlheir.server", "--data-dir", str(tmp_path / "d"), "--port", "0",
                           "--store", store, "--blobs", blobs], capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    want = {"no database": "PostgreSQL", "unreachable": "PostgreSQL", "no bucket": "does not exist",
            "wrong secret": "credentials"}[bad]
    assert want in lines[0] and ("--store" in lines[0] or "--blobs" in lines[0]), lines[0]
