"""`dlheir server migrate`: a whole deployment from the embedded store into PostgreSQL + S3 (real
engines, tests/engines.py) and back, checked through real servers on each target; an interrupted
migration resumes; --verify-only catches a blob changed in the target; refusals are one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.errors import UserError
from dlheir.server.migrate import Side, migrate
from dlheir.server.testing import CloudServerProcess
from engines import postgres_engine, s3_engine  # noqa: F401 (fixtures)

BITS, N = 48, 2000


@pytest.fixture
def fresh(postgres_engine, s3_engine, monkeypatch):  # noqa: F811
    """A factory of fresh (database URL, bucket URL, bucket) triples; the AWS credentials in the
    environment (servers and the migrate subprocess read them there)."""

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_engine.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_engine.secret_key)

    def make() -> dict:
        name, store = postgres_engine.new_database("m")
        s3_engine.make_bucket(name)
        return {"store": store,
                "blobs": f"s3://{name}?endpoint={s3_engine.endpoint}", "bucket": name, "s3": s3_engine}

    return make


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A stopped embedded server's data dir, filled through the server: 'photos' (N items, rekeyed
    to key 2, reader alice active and bob revoked) and 'sealed' (private, 2 code pages, 300 items),
    with what the checks compare: search results, blobs, readers, tokens."""
    from dlheir.client.private import append_code_page
    from dlheir.contract import PAGE_MAGIC, PAGE_VERSION

    data = tmp_path_factory.mktemp("source") / "cloud"
    rng = np.random.default_rng(7)
    ids = rng.choice(2**62, size=N, replace=False).astype(np.int64)
    codes = rng.integers(0, 256, (N, BITS // 8), dtype=np.uint8)
    blobs = {int(i): rng.bytes(int(rng.integers(50, 1500))) for i in ids}
    pages = [PAGE_MAGIC + bytes([PAGE_VERSION]) + os.urandom(200) for _ in range(2)]
    sealed_blobs = {i: rng.bytes(64) for i in range(1, 301)}
    queries = np.concatenate([rng.integers(0, 256, (3, BITS // 8), dtype=np.uint8), codes[:2]])
    with CloudServerProcess(data, store_url="", blobs_url="").start() as server:
        with CloudClient(server.address) as admin:
            owner_token, _ = admin.create_collection("photos", BITS, server.admin_token)
            sealed_token, _ = admin.create_collection("sealed", BITS, server.admin_token, private=True)
        with CloudClient(server.address, owner_token) as owner:
            list(owner.upload("photos", [(int(i), c.tobytes(), blobs[int(i)], {"n": str(i)})
                                         for i, c in zip(ids, codes)], batch_size=500))
            perm = list(rng.permutation(BITS))
            owner.rekey_codes("photos", 1, 2, perm, rng.bytes(BITS // 8))
            alice = owner.add_reader("photos", "alice")
            bob = owner.add_reader("photos", "bob")
            owner.revoke_reader("photos", "bob")
            results = owner.search("photos", queries, 20)
            readers = owner.list_readers("photos")
        with CloudClient(server.address, sealed_token) as owner:
            list(owner.upload("sealed", [(i, b"", b, {}) for i, b in sealed_blobs.items()], batch_size=100))
            for n, page in enumerate(pages):
                assert append_code_page(owner, "sealed", n, page) == n + 1
        admin_token = server.admin_token
    return {"dir": data, "owner": owner_token, "sealed": sealed_token, "alice": alice, "bob": bob, "ids": ids,
            "blobs": blobs, "sealed_blobs": sealed_blobs, "pages": pages, "queries": queries, "results": results,
            "readers": readers, "admin": admin_token}


def check_served(server: CloudServerProcess, d: dict) -> None:
    """The server on a migrated store serves exactly what the source did."""
    from dlheir.client.private import sync_code_pages

    assert server.admin_token == d["admin"]
    with CloudClient(server.address, d["owner"]) as owner:
        for (gi, gd), (wi, wd) in zip(owner.search("photos", d["queries"], 20), d["results"]):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gd, wd)
        sample = sorted(int(i) for i in d["ids"][::37])
        assert {i: b for i, b, _ in owner.fetch("photos", sample)} == {i: d["blobs"][i] for i in sample}
        assert {i: m for i, _, m in owner.fetch("photos", sample[:3])} == {i: {"n": str(i)} for i in sample[:3]}
        readers = owner.list_readers("photos")
        assert readers == d["readers"] and readers.key_id == 2
        assert owner.stats("photos").items == N
    with CloudClient(server.address, d["alice"]) as alice:  # an active reader works
        assert len(alice.search("photos", d["queries"][:1], 5)[0][0]) == 5
    with CloudClient(server.address, d["bob"]) as bob, pytest.raises(CloudError) as info:  # a revoked one does not
        bob.search("photos", d["queries"][:1], 5)
    assert info.value.code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    with CloudClient(server.address, d["sealed"]) as owner:
        header, pages = sync_code_pages(owner, "sealed", 0)
        assert header.pages == 2 and [p for _, p in pages] == d["pages"]
        got = {i: b for i, b, _ in owner.fetch("sealed", sorted(d["sealed_blobs"]))}
        assert got == d["sealed_blobs"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlheir", "server", "migrate", *args], capture_output=True,
                          text=True, timeout=timeout)


def objects(e: dict) -> list[str]:
    s3 = e["s3"].client()
    return [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=e["bucket"])
            for o in p.get("Contents", [])]


def test_embedded_to_postgresql_and_s3_and_back(tmp_path, deployment, fresh, capsys):
    e = fresh()
    pg_dir = tmp_path / "pg"
    report = migrate(Side(deployment["dir"]), Side(pg_dir, e["store"], e["blobs"]), quiet=True)
    assert report["items"] == N + 300 and report["verified"] == N + 300
    out = capsys.readouterr().out
    assert "photos: 2,000 items, 0 pages, ids+codes sha256" in out and "2,000 blobs read back equal" in out, out
    assert "sealed: 300 items, 2 pages" in out and "items/s" in out, out
    print(f"embedded -> PostgreSQL+S3: {report['rate']:,.0f} items/s ({report['copy_seconds']:.1f} s)")
    assert len(objects(e)) == N + 300  # blobs in the object store
    assert stat.S_IMODE((pg_dir / "admin.token").stat().st_mode) == 0o600
    with CloudServerProcess(pg_dir, store_url=e["store"], blobs_url=e["blobs"]).start() as server:
        check_served(server, deployment)
    # and back, through the CLI, into a new embedded data dir
    back = tmp_path / "back"
    started = time.monotonic()
    proc = cli("--from", str(pg_dir), "--from-store", e["store"], "--from-blobs", e["blobs"], "--to", str(back))
    assert proc.returncode == 0, proc.stderr
    print(f"PostgreSQL+S3 -> embedded: {proc.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.1f} s "
          f"with the process start)")
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == ""  # no bar when stderr is not a terminal
    with CloudServerProcess(back, store_url="", blobs_url="").start() as server:
        check_served(server, deployment)
    # verify-only on the stopped pair: equal
    proc = cli("--from", str(deployment["dir"]), "--to", str(back), "--verify-only")
    assert proc.returncode == 0 and "the target equals the source" in proc.stdout, proc.stderr


def test_interrupted_migration_resumes_and_verifies(tmp_path, deployment, fresh):
    e = fresh()
    target = Side(tmp_path / "pg", e["store"], e["blobs"])

    class Cut(Exception):
        pass

    def cut(collection, written):
        if written >= 1000:
            raise Cut

    with pytest.raises(Cut):
        migrate(Side(deployment["dir"]), target, batch=500, quiet=True, on_batch=cut)
    from dlheir.server.store import open_store

    store = open_store(target.data_dir, store_url=e["store"], blobs_url=e["blobs"])
    try:
        assert store.stats("photos")[0] == 1000  # two durable batches, nothing of 'sealed' yet
        assert "sealed" not in store.uids()
    finally:
        store.close()
    report = migrate(Side(deployment["dir"]), target, batch=500, quiet=True)
    assert report["skipped"] == 1000 and report["items"] == N + 300 - 1000 and report["verified"] == N + 300
    # a third run: nothing left to copy, all verified
    report = migrate(Side(deployment["dir"]), target, quiet=True)
    assert report["items"] == 0 and report["skipped"] == N + 300


def test_verify_only_catches_a_blob_changed_in_the_object_store(tmp_path, deployment, fresh):
    e = fresh()
    pg_dir = tmp_path / "pg"
    migrate(Side(deployment["dir"]), Side(pg_dir, e["store"], e["blobs"]), quiet=True)
    args = ["--from", str(deployment["dir"]), "--to", str(pg_dir), "--to-store", e["store"], "--to-blobs", e["blobs"],
            "--verify-only"]
    key = sorted(objects(e))[0]
    item = int(key.split("/")[2])
    s3 = e["s3"].client()
    body = bytearray(s3.get_object(Bucket=e["bucket"], Key=key)["Body"].read())
    body[len(body) // 2] ^= 1
    s3.put_object(Bucket=e["bucket"], Key=key, Body=bytes(body))
    proc = cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"blob of item {item} read back from the target differs" in lines[0], lines[0]


def test_refusals_are_one_line(tmp_path, deployment, fresh):
    # the source in use by a running server
    other = tmp_path / "other"
    with CloudServerProcess(other, store_url="", blobs_url="").start() as server:
        with CloudClient(server.address) as admin:
            admin.create_collection("photos", BITS, server.admin_token)  # same name, another collection
        proc = cli("--from", str(other), "--to", str(tmp_path / "x"))
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "is in use by a cloud server" in proc.stderr and "dlheir server stop" in proc.stderr
    # a non-empty target of another source
    proc = cli("--from", str(deployment["dir"]), "--to", str(other))
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not a migration of this source" in proc.stderr and "'photos'" in proc.stderr
    # an unreachable target
    from dlheir.procs import free_port

    proc = cli("--from", str(deployment["dir"]), "--to", str(tmp_path / "y"),
               "--to-store", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "PostgreSQL" in proc.stderr and "Traceback" not in proc.stderr
    # nothing to migrate from
    (tmp_path / "empty-src").mkdir()
    with pytest.raises(UserError, match="no store in"):
        migrate(Side(tmp_path / "empty-src"), Side(tmp_path / "z"))
