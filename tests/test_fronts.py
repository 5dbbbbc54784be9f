"""Several fronts over one store (issue 18): three real cloud-server processes on loopback over one
real PostgreSQL database, each holding its own in-memory index and following the store's change
log (server/follow.py). The consistency rule under test: a call on any front sees every write
acknowledged, by any front, before it started."""

from __future__ import annotations

import os
import secrets

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.codes import hamming
from dlheir.contract import rank
from dlheir.server.testing import CloudServerProcess
from engines import postgres_engine, s3_engine  # noqa: F401 (fixtures)

BITS = 32


@pytest.fixture
def store_url(postgres_engine):  # noqa: F811
    """A fresh PostgreSQL database for one test."""
    return postgres_engine.new_database("f")[1]


class Fronts:
    """Fronts over one store, sharing one admin token (each with its own data dir); stopped at exit."""

    def __init__(self, tmp_path, store_url: str, extra_args: list[str] | None = None,
                 blobs_url: str | None = None) -> None:
        self.tmp_path, self.store_url, self.extra_args, self.blobs_url = tmp_path, store_url, extra_args or [], blobs_url
        self.token_file = tmp_path / "admin.token"
        self.token_file.write_text(secrets.token_urlsafe(32) + "\n")
        os.chmod(self.token_file, 0o600)
        self.admin_token = self.token_file.read_text().strip()
        self.all: list[CloudServerProcess] = []

    def start(self, name: str) -> CloudServerProcess:
        server = CloudServerProcess(self.tmp_path / name, store_url=self.store_url, blobs_url=self.blobs_url,
                                    extra_args=["--admin-token-file", str(self.token_file), *self.extra_args])
        self.all.append(server)
        return server.start()

    def create_collection(self, front: CloudServerProcess, name: str = "c") -> tuple[str, str]:
        """(owner token, reader token) of a new collection, created through ``front``."""
        with CloudClient(front.address) as admin:
            return admin.create_collection(name, BITS, self.admin_token)

    def __enter__(self) -> "Fronts":
        return self

    def __exit__(self, *exc) -> None:
        for server in self.all:
            server.stop()


def random_codes(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, BITS // 8), dtype=np.uint8)


def exact(client: CloudClient, queries: np.ndarray, base: np.ndarray, ids: np.ndarray, k: int) -> None:
    """The front's top k equal a brute-force ranking by (distance, id) of (ids, base)."""
    for q, (got_ids, got_d) in zip(queries, client.search("c", queries, k=k)):
        d = hamming(q[None, :], base)[0]
        order = rank(d, ids)[:k]
        assert got_ids.tolist() == ids[order].tolist() and got_d.tolist() == d[order].tolist(), client.address


def found_at_zero(client: CloudClient, codes: np.ndarray, ids) -> list[bool]:
    """For each code, whether its id comes back at distance 0."""
    results = client.search("c", codes, k=10)
    return [bool(((i == item) & (d == 0)).any()) for (i, d), item in zip(results, ids)]


def test_a_search_on_any_front_sees_every_write_acknowledged_on_another(tmp_path, store_url):
    rng = np.random.default_rng(1)
    with Fronts(tmp_path, store_url) as fronts:
        a, b, c = fronts.start("a"), fronts.start("b"), fronts.start("c")
        owner_token, reader_token = fronts.create_collection(b)  # on b: a and c learn it from the change log
        owner_a = CloudClient(a.address, owner_token)
        readers = [CloudClient(b.address, reader_token), CloudClient(c.address, reader_token)]
        next_id, stored = 0, {}
        for round_ in range(15):  # the very next search after each ack, on both other fronts
            codes = random_codes(rng, 20)
            ids = list(range(next_id, next_id + 20))
            next_id += 20
            acks = list(owner_a.upload("c", [(i, code.tobytes(), b"x", {}) for i, code in zip(ids, codes)],
                                       batch_size=20))
            assert sum(len(ack.ids) for ack in acks) == 20
            for reader in readers:
                assert all(found_at_zero(reader, codes, ids)), f"round {round_}: {reader.address} missed an ack"
            stored.update(zip(ids, codes))
        # a delete on c: gone on a and b at once; a replace on b: the new code on a and c at once
        gone = list(range(0, 40, 4))
        assert CloudClient(c.address, owner_token).delete("c", gone) == len(gone)
        for address in (a.address, b.address):
            assert not any(found_at_zero(CloudClient(address, reader_token), np.stack([stored[i] for i in gone]), gone))
        new_code = random_codes(rng, 1)[0]
        list(CloudClient(b.address, owner_token).upload("c", [(5, new_code.tobytes(), b"y", {})], replace=True))
        for address in (a.address, c.address):
            client = CloudClient(address, reader_token)
            assert found_at_zero(client, new_code[None], [5]) == [True]
            assert found_at_zero(client, stored[5][None], [5]) == [False]
        for i in gone:
            stored.pop(i)
        stored[5] = new_code
        # every front answers exactly as a brute-force ranking of what the store holds
        ids = np.array(sorted(stored), dtype=np.int64)
        base = np.stack([stored[i] for i in ids])
        queries = random_codes(rng, 8)
        for address in (a.address, b.address, c.address):
            exact(CloudClient(address, reader_token), queries, base, ids, 15)


def test_collections_readers_and_rekeys_follow_across_fronts(tmp_path, store_url):
    rng = np.random.default_rng(2)
    with Fronts(tmp_path, store_url) as fronts:
        a, b = fronts.start("a"), fronts.start("b")
        owner_token, _ = fronts.create_collection(a)
        owner_a, owner_b = CloudClient(a.address, owner_token), CloudClient(b.address, owner_token)
        codes = random_codes(rng, 50)
        list(owner_a.upload("c", [(i, c.tobytes(), b"x", {}) for i, c in enumerate(codes)]))
        # a reader added on a opens b at once; revoked on a, it is refused by b at once
        token = owner_a.add_reader("c", "alice")
        assert found_at_zero(CloudClient(b.address, token), codes[:3], [0, 1, 2]) == [True] * 3
        assert owner_a.revoke_reader("c", "alice")
        with pytest.raises(CloudError) as refused:
            CloudClient(b.address, token).search("c", codes[:1], k=1)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        # a rekey on b: every code on a is the re-keyed one
        perm = rng.permutation(BITS)
        mask = random_codes(rng, 1)[0]
        assert owner_b.rekey_codes("c", 1, 2, perm, mask.tobytes()).items == 50
        bits = np.unpackbits(codes, axis=1)[:, perm] ^ np.unpackbits(mask)[None, :]
        assert all(found_at_zero(owner_a, np.packbits(bits, axis=1)[:5], range(5)))
        # deleted on b, re-created on a under its name: the old token opens nothing on b, the new one an empty one
        with CloudClient(b.address) as admin:
            admin.delete_collection("c", fronts.admin_token)
        new_owner, _ = fronts.create_collection(a)
        with pytest.raises(CloudError) as refused:
            owner_b.search("c", codes[:1], k=1)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert CloudClient(b.address, new_owner).stats("c").items == 0
        assert CloudClient(b.address, new_owner).search("c", codes[:1], k=1)[0][0].size == 0


def test_a_front_killed_and_restarted_rejoins_exact(tmp_path, store_url):
    rng = np.random.default_rng(3)
    with Fronts(tmp_path, store_url) as fronts:
        a, b = fronts.start("a"), fronts.start("b")
        owner_token, _ = fronts.create_collection(a)
        owner = CloudClient(a.address, owner_token)
        codes = random_codes(rng, 3000)
        list(owner.upload("c", [(i, c.tobytes(), b"", {}) for i, c in enumerate(codes[:1000])], batch_size=500))
        b.kill()  # kill -9 while it holds the collection; then more writes it does not see
        list(owner.upload("c", [(i, c.tobytes(), b"", {}) for i, c in enumerate(codes[1000:], 1000)], batch_size=500))
        owner.delete("c", list(range(0, 3000, 7)))
        b.start()
        late = fronts.start("late")  # a front that joins after all of it
        keep = np.array([i for i in range(3000) if i % 7], dtype=np.int64)
        queries = random_codes(rng, 10)
        for server in (a, b, late):
            exact(CloudClient(server.address, owner_token), queries, codes[keep], keep, 20)


def test_status_lists_every_front_with_what_it_has_applied(tmp_path, store_url):
    import subprocess
    import sys

    import json
    import urllib.request

    from dlheir.server.app import READY_FILE

    with Fronts(tmp_path, store_url, ["--metrics-port", "0"]) as fronts:
        a, b = fronts.start("a"), fronts.start("b")
        owner_token, _ = fronts.create_collection(a)
        list(CloudClient(b.address, owner_token).upload("c", [(1, b"\0" * (BITS // 8), b"", {})]))
        CloudClient(a.address, owner_token).stats("c")  # a call on a: it has applied b's upload
        port = json.loads((a.data_dir / READY_FILE).read_text())["metrics_port"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        series = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("dlheir_changes"))
        assert float(series["dlheir_changes_applied"]) >= 2 and float(series["dlheir_changes_behind"]) == 0, series
        reply = CloudClient(f"{a.address},{b.address}").list_fronts(fronts.admin_token)
        assert reply.shared and reply.head >= 2
        assert sorted(f.address for f in reply.fronts) == sorted([a.address, b.address])
        env = {**os.environ, "DLHEIR_HOME": str(tmp_path / "home")}
        for _ in range(5):  # a front records what it applied a few ms after it did: asked again then
            proc = subprocess.run([sys.executable, "-m", "dlheir", "status", "--server", f"{a.address},{b.address}",
                                   "--admin-token-file", str(fronts.token_file), "--triton", "127.0.0.1:1"],
                                  capture_output=True, text=True, env=env, timeout=120)
            lines = [x for x in proc.stdout.splitlines() if x.strip().startswith("front ")]
            if all(" 0 behind" in x for x in lines):
                break
        assert len(lines) == 2 and all(" 0 behind" in x for x in lines), proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr


def test_fronts_killed_and_restarted_under_load_lose_nothing(tmp_path, store_url, s3_engine, monkeypatch):  # noqa: F811
    """Three fronts over PostgreSQL and the object store (blobs in Ceph RGW). Searchers, a fetcher
    and an uploader on every front's address at once; kill -9 one front, then another, then
    restart both: no call fails after the client's retry, every acknowledged item is stored once,
    and every front answers exactly as brute force when it is back."""
    import threading
    import time

    rng = np.random.default_rng(4)
    bucket = "k" + secrets.token_hex(6)
    s3_engine.make_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_engine.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_engine.secret_key)
    with Fronts(tmp_path, store_url, blobs_url=f"s3://{bucket}?endpoint={s3_engine.endpoint}") as fronts:
        a, b, c = fronts.start("a"), fronts.start("b"), fronts.start("c")
        addresses = f"{a.address},{b.address},{c.address}"
        owner_token, reader_token = fronts.create_collection(a)
        codes = random_codes(rng, 5000)
        blob = lambda i: i.to_bytes(4, "big") * 8  # noqa: E731
        list(CloudClient(a.address, owner_token).upload("c", [(i, codes[i].tobytes(), blob(i), {})
                                                              for i in range(1000)], batch_size=500))
        stop, errors, counts, acked = threading.Event(), [], {"search": 0, "fetch": 0}, []

        def searcher(seed):
            r = np.random.default_rng(seed)
            with CloudClient(addresses, reader_token) as client:
                while not stop.is_set():
                    i = int(r.integers(0, 1000))
                    try:
                        assert found_at_zero(client, codes[i][None], [i]) == [True], f"item {i} not found"
                        counts["search"] += 1
                    except Exception as exc:  # noqa: BLE001 - reported below
                        errors.append(f"search: {exc}")

        def fetcher():
            r = np.random.default_rng(9)
            with CloudClient(addresses, reader_token) as client:
                while not stop.is_set():
                    ids = [int(i) for i in r.choice(1000, 20, replace=False)]
                    try:
                        got = list(client.fetch("c", ids))
                        assert [(i, b) for i, b, _ in got] == [(i, blob(i)) for i in ids], "fetch differs"
                        counts["fetch"] += 1
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"fetch: {exc}")

        def items():
            for i in range(1000, 5000):
                if i % 100 == 0:
                    time.sleep(0.05)  # spread the upload over the kills
                yield i, codes[i].tobytes(), blob(i), {}

        def uploader():
            try:
                with CloudClient(addresses, owner_token) as client:
                    for ack in client.upload("c", items(), batch_size=100):
                        acked.extend(ack.ids)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"upload: {exc}")

        threads = [threading.Thread(target=searcher, args=(s,)) for s in (1, 2)]
        threads += [threading.Thread(target=fetcher), threading.Thread(target=uploader)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            a.kill()
            time.sleep(1.5)
            b.kill()
            time.sleep(1.5)
            a.start()
            b.start()
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert errors == [], errors[:5]
        assert counts["search"] > 20 and counts["fetch"] > 5, counts
        assert sorted(acked) == list(range(1000, 5000)), "every uploaded id acknowledged exactly once"
        ids = np.arange(5000, dtype=np.int64)
        queries = np.concatenate([random_codes(rng, 4), codes[[3, 4321]]])
        for server in (a, b, c):
            client = CloudClient(server.address, owner_token)
            assert client.stats("c").items == 5000
            exact(client, queries, codes, ids, 10)


def test_postgresql_restarted_under_fronts_is_unavailable_then_recovers(tmp_path, store_url, postgres_engine):  # noqa: F811
    import time

    rng = np.random.default_rng(5)
    with Fronts(tmp_path, store_url) as fronts:
        a, b = fronts.start("a"), fronts.start("b")
        owner_token, reader_token = fronts.create_collection(a)
        codes = random_codes(rng, 40)
        list(CloudClient(a.address, owner_token).upload("c", [(i, c.tobytes(), b"", {}) for i, c in enumerate(codes[:20])]))
        postgres_engine.kill()
        try:
            with pytest.raises(CloudError) as down:
                CloudClient(f"{a.address},{b.address}", reader_token).search("c", codes[:1], k=1)
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert "PostgreSQL at" in str(down.value) and "\n" not in str(down.value), str(down.value)
        finally:
            postgres_engine.restart()
        # back without a restart of either front: a write on one is seen by the other's next search
        deadline = time.monotonic() + 30
        while True:
            try:
                list(CloudClient(a.address, owner_token).upload("c", [(i, c.tobytes(), b"", {})
                                                                      for i, c in enumerate(codes[20:], 20)]))
                break
            except CloudError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert all(found_at_zero(CloudClient(b.address, reader_token), codes, range(40)))


def test_a_starting_front_sweeps_only_the_orphans_of_fronts_that_are_gone(store_url, s3_engine, monkeypatch):  # noqa: F811
    """The blob journal names objects a batch PUT before its commit. A front that starts sweeps
    those of fronts that are gone (their PostgreSQL session's advisory lock is free), never those
    of a running front, whose batch may be committing right now."""
    from dlheir.server.store.postgres import open_postgres

    bucket = "j" + secrets.token_hex(6)
    s3_engine.make_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_engine.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_engine.secret_key)
    blobs = f"s3://{bucket}?endpoint={s3_engine.endpoint}"
    s3 = s3_engine.client()

    def present(key: str) -> bool:
        return s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0

    running = open_postgres("/tmp", store_url, blobs)
    key = running.blobs.key("0" * 32, 1, "v1")
    running._journal_add([key])  # as write_batch does before its PUTs
    running.blobs.put_many([(key, b"in flight")])
    time_before = running.started
    other = open_postgres("/tmp", store_url, blobs)
    other.started = time_before + 3600  # every journal row counts as from before its start
    other.verify()
    assert present(key), "the sweep deleted a running front's object"
    running.close()  # its session ends: gone
    other.verify()
    assert not present(key), "the orphan of a front that is gone was not swept"
    other.close()


def test_a_front_behind_a_pruned_change_log_reloads_everything(tmp_path, store_url):
    """Changes every running front has applied are pruned from the log after an hour; a front that
    was paused past that (its row in the fronts table stale) finds changes it missed pruned and
    reloads every collection from the store instead of applying the rest."""
    import signal
    import time

    import psycopg

    from dlheir.server.store.postgres import open_postgres

    rng = np.random.default_rng(6)
    with Fronts(tmp_path, store_url) as fronts:
        a, b = fronts.start("a"), fronts.start("b")
        owner_token, _ = fronts.create_collection(a)
        owner = CloudClient(a.address, owner_token)
        codes = random_codes(rng, 300)
        list(owner.upload("c", [(i, c.tobytes(), b"", {}) for i, c in enumerate(codes[:100])]))
        assert all(found_at_zero(CloudClient(b.address, owner_token), codes[:3], range(3)))
        os.kill(b.process.pid, signal.SIGSTOP)  # paused: applies nothing, refreshes no row
        try:
            list(owner.upload("c", [(i, c.tobytes(), b"", {}) for i, c in enumerate(codes[100:], 100)]))
            owner.delete("c", list(range(10)))
            with psycopg.connect(store_url, autocommit=True) as conn:  # b's row as if a minute old
                conn.execute("UPDATE fronts SET seen = seen - 120 WHERE address = %s", (b.address,))
            time.sleep(1.2)  # a refreshes its own row with everything applied
            store = open_postgres(tmp_path, store_url)
            assert store.prune_changes(0) > 0
            store.close()
        finally:
            os.kill(b.process.pid, signal.SIGCONT)
        keep = np.arange(10, 300, dtype=np.int64)
        exact(CloudClient(b.address, owner_token), random_codes(rng, 5), codes[keep], keep, 10)
        assert "reloading every collection" in (tmp_path / "b" / "server.log").read_text()


def test_object_store_restarted_under_fronts_is_unavailable_then_recovers(tmp_path, store_url, s3_engine,  # noqa: F811
                                                                          monkeypatch):
    """The object store's gateway killed under two fronts: fetches answer UNAVAILABLE in one line
    naming it, searches go on (codes live in PostgreSQL and memory); once it is back, both fronts
    fetch again without a restart."""
    rng = np.random.default_rng(8)
    bucket = "g" + secrets.token_hex(6)
    s3_engine.make_bucket(bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_engine.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_engine.secret_key)
    with Fronts(tmp_path, store_url, blobs_url=f"s3://{bucket}?endpoint={s3_engine.endpoint}") as fronts:
        a, b = fronts.start("a"), fronts.start("b")
        owner_token, reader_token = fronts.create_collection(a)
        codes = random_codes(rng, 30)
        list(CloudClient(a.address, owner_token).upload("c", [(i, c.tobytes(), bytes([i]) * 64, {})
                                                              for i, c in enumerate(codes)]))
        both = CloudClient(f"{a.address},{b.address}", reader_token)
        s3_engine.kill_gateway()
        try:
            with pytest.raises(CloudError) as down:
                list(both.fetch("c", [1, 2]))
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert "object store" in str(down.value) and "\n" not in str(down.value), str(down.value)
            assert all(found_at_zero(both, codes[:4], range(4)))
        finally:
            s3_engine.start_gateway()
        for address in (a.address, b.address):
            got = list(CloudClient(address, reader_token).fetch("c", [3, 7]))
            assert [(i, blob) for i, blob, _ in got] == [(3, bytes([3]) * 64), (7, bytes([7]) * 64)]
