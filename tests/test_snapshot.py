"""Index snapshots (server/snapshot.py): a clean shutdown writes each collection's index with
the store's write counter; the next start loads it instead of rebuilding, and a stale (writes
after it, then a crash), damaged or mismatched snapshot is ignored and the index rebuilt from
the store. Results stay the exact top k (ties by id) in every case."""

from __future__ import annotations

import numpy as np
import pytest

from dlheir.client.cloud import CloudClient
from dlheir.codes import hamming
from dlheir.contract import rank
from dlheir.server import snapshot
from dlheir.server.index import BinaryIndex
from dlheir.server.testing import CloudServerProcess

BITS = 48
SERVER_ARGS = ["--mih-min-items", "2000", "--index", "mih", "--shards", "2"]


def _expected(stored: dict[int, bytes], query: np.ndarray, k: int):
    ids = np.array(sorted(stored), dtype=np.int64)
    codes = np.frombuffer(b"".join(stored[i] for i in ids.tolist()), np.uint8).reshape(-1, query.shape[-1])
    d = hamming(query[None], codes)[0].astype(np.int64)
    top = rank(d, ids)[:k]
    return ids[top].tolist(), d[top].tolist()


def _check(client: CloudClient, stored: dict[int, bytes], queries: np.ndarray) -> None:
    for k in (1, 20, 300):
        for (ids, d), q in zip(client.search("c", queries, k), queries):
            assert (ids.tolist(), d.tolist()) == _expected(stored, q, k)


def _codes(rng, n: int) -> np.ndarray:
    return rng.integers(0, 4, (n, BITS // 8), dtype=np.uint8)  # tie-heavy: many equal distances


def _log(server: CloudServerProcess) -> str:
    return (server.data_dir / "server.log").read_text()


@pytest.fixture
def grown(tmp_path):
    """A server holding 6,000 items (sealed into multi-index hashing), some deleted and replaced."""
    rng = np.random.default_rng(3)
    server = CloudServerProcess(tmp_path / "cloud", extra_args=SERVER_ARGS).start()
    try:
        with CloudClient(server.address) as admin:
            owner_token, _ = admin.create_collection("c", BITS, server.admin_token)
        owner = CloudClient(server.address, owner_token)
        codes = _codes(rng, 6000)
        stored = {i: codes[i].tobytes() for i in range(6000)}
        list(owner.upload("c", ((i, c, b"b", {}) for i, c in stored.items()), batch_size=1000))
        owner.delete("c", list(range(0, 6000, 7)))
        for i in range(0, 6000, 7):
            del stored[i]
        replaced = {i: c.tobytes() for i, c in zip(range(1, 6000, 11), _codes(rng, 600))}
        list(owner.upload("c", ((i, c, b"b", {}) for i, c in replaced.items()), batch_size=1000, replace=True))
        stored.update(replaced)
        queries = np.concatenate([codes[:6], _codes(rng, 6)])
        _check(owner, stored, queries)
        owner.close()
        yield server, owner_token, stored, queries, rng
    finally:
        server.stop()


def test_clean_restart_loads_the_snapshot(grown):
    server, token, stored, queries, _ = grown
    server.stop()
    assert "index snapshot (" in _log(server)
    assert snapshot.snapshot_path(server.data_dir, "c").exists()
    server.start()
    assert "c.npz: %d items (mih+flat) loaded" % len(stored) in _log(server)
    with CloudClient(server.address, token) as owner:
        _check(owner, stored, queries)
        assert owner.delete("c", [2, 3]) == 2  # the loaded index takes writes like a rebuilt one
        del stored[2], stored[3]
        new = {10_000 + i: c.tobytes() for i, c in enumerate(_codes(np.random.default_rng(9), 50))}
        list(owner.upload("c", ((i, c, b"b", {}) for i, c in new.items())))
        stored.update(new)
        _check(owner, stored, queries)


def test_writes_after_the_snapshot_then_a_crash_rebuild_from_the_store(grown):
    server, token, stored, queries, rng = grown
    server.stop()  # snapshot written
    server.start()
    with CloudClient(server.address, token) as owner:
        new = {20_000 + i: c.tobytes() for i, c in enumerate(_codes(rng, 100))}
        list(owner.upload("c", ((i, c, b"b", {}) for i, c in new.items())))
        owner.delete("c", [1, 5])
    stored.update(new)
    del stored[1], stored[5]
    server.kill()  # no snapshot of these writes
    server.start()
    assert "is stale" in _log(server)
    with CloudClient(server.address, token) as owner:
        _check(owner, stored, queries)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other bits"])
def test_damaged_snapshot_is_ignored(grown, damage):
    server, token, stored, queries, _ = grown
    server.stop()
    path = snapshot.snapshot_path(server.data_dir, "c")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a snapshot")
    else:  # a consistent snapshot of the right generation, but of a 64-bit index
        with np.load(path) as z:
            generation, uid = int(z["generation"]), str(z["collection_uid"])
        other = BinaryIndex(64, 2)
        other.add(np.arange(10), np.zeros((10, 8), np.uint8))
        snapshot.save(path, generation, other.state(), uid)
    server.start()
    assert "cannot be used" in _log(server)
    with CloudClient(server.address, token) as owner:
        _check(owner, stored, queries)


@pytest.mark.parametrize("sealed", [False, True])
def test_state_round_trip_is_exact(sealed):
    """BinaryIndex.state() -> from_state(): the same answers, flat or sealed (with deletes and a
    flat delta), and refused when the header does not match."""
    rng = np.random.default_rng(5)
    codes = _codes(rng, 5000)
    index = BinaryIndex(BITS, 2, mih_min=1000 if sealed else 10**9, choose="mih" if sealed else "flat")
    index.add(np.arange(5000), codes)
    index.remove(np.arange(0, 5000, 9))
    index.add(np.arange(5000, 5100), _codes(rng, 100), seal=False)  # a flat delta beside the sealed part
    assert index.kind == ("mih+flat" if sealed else "flat")
    arrays = index.state()
    copy = BinaryIndex.from_state(arrays, BITS, n_shards=2)
    assert len(copy) == len(index) and copy.kind == index.kind
    queries = codes[:8]
    for k in (1, 30, 500):
        for (a, da), (b, db) in zip(index.search(queries, k), copy.search(queries, k)):
            assert a.tolist() == b.tolist() and da.tolist() == db.tolist()
    with pytest.raises(ValueError):
        BinaryIndex.from_state(arrays, 64)
    broken = dict(arrays, index_meta=arrays["index_meta"] + np.array([0, 0, 1, 0]))
    with pytest.raises(ValueError):
        BinaryIndex.from_state(broken, BITS)


def test_end_of_an_upload_folds_a_small_delta_into_the_hash(grown):
    """An upload stream that leaves a flat delta of 1-10% of the sealed part re-seals when it
    ends (not only past 10%), and the answers stay exact."""
    server, token, stored, queries, rng = grown
    builds = _log(server).count("codes: multi-index hash")
    with CloudClient(server.address, token) as owner:
        small = {30_000 + i: c.tobytes() for i, c in enumerate(_codes(rng, 20))}  # under 1%: stays flat
        list(owner.upload("c", ((i, c, b"b", {}) for i, c in small.items())))
        assert _log(server).count("codes: multi-index hash") == builds
        more = {40_000 + i: c.tobytes() for i, c in enumerate(_codes(rng, 150))}  # 2-3%: folded in
        list(owner.upload("c", ((i, c, b"b", {}) for i, c in more.items())))
        assert _log(server).count("codes: multi-index hash") == builds + 1
        stored.update(small)
        stored.update(more)
        _check(owner, stored, queries)


@pytest.mark.parametrize("chunk", [1, 7, 1_000_000])
@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_rebuild_from_the_store_holds_exactly_its_items(tmp_path, chunk):
    """The crash path's rebuild (Store.codes() -> BinaryIndex.load()) holds exactly the store's
    items, id with its own code, after deletes and replaces: ids at both ends of int64 and
    scattered, chunks of 1, 7 and all items, another collection and a private-ranking one
    (empty codes: not indexed) beside it; sealed, it answers as brute force does."""
    from dlheir.server.store import open_store

    rng = np.random.default_rng(11)
    (tmp_path / "data").mkdir()
    store = open_store(tmp_path / "data")
    for name in ("c", "other"):
        store.create_collection(name, BITS, "o" * 64, "r" * 64)
    store.create_collection("private", BITS, "o" * 64, "r" * 64, private=True)
    ids = np.unique(np.concatenate([rng.integers(-2**63, 2**63 - 1, 400, dtype=np.int64),
                                    np.arange(-50, 600), [-2**63, 2**63 - 1]]))
    codes = _codes(rng, len(ids))
    stored = {int(i): c.tobytes() for i, c in zip(ids, codes)}
    items = [(i, c, b"blob", {}) for i, c in stored.items()]
    for start in range(0, len(items), 300):
        store.write_batch("c", items[start:start + 300], replace=False)
    store.write_batch("other", [(i, bytes(6), b"x", {}) for i in range(-5, 5)], replace=False)
    store.write_batch("private", [(i, b"", b"x", {}) for i in range(-5, 5)], replace=False)
    gone = [int(i) for i in ids[::5]]
    assert store.delete("c", gone) == len(gone)
    for i in gone:
        del stored[i]
    replaced = {int(i): c.tobytes() for i, c in zip(ids[1::9], _codes(rng, len(ids[1::9])))}
    store.write_batch("c", [(i, c, b"new", {}) for i, c in replaced.items()], replace=True)
    stored.update(replaced)

    chunks = list(store.codes("c", chunk=chunk))
    assert all(len(c) == len(i) * BITS // 8 for i, c in chunks)
    got_ids = np.concatenate([i for i, _ in chunks])
    assert got_ids.tolist() == sorted(stored)  # ascending, every item once
    got = dict(zip(got_ids.tolist(), (c for _, cs in chunks for c in np.frombuffer(cs, np.uint8).reshape(-1, 6))))
    assert {i: c.tobytes() for i, c in got.items()} == stored
    assert list(store.codes("private", chunk=chunk)) == []

    index = BinaryIndex(BITS, 2, mih_min=100, choose="mih")
    index.load(store.codes("c", chunk=chunk))
    assert index.kind == "mih+flat" and len(index) == len(stored)
    sealed = index.sealed
    assert sorted(sealed.live_ids().tolist()) == sorted(stored)
    held = sealed.codes_bytes(sealed.alive, BITS // 8)
    assert {i: c.tobytes() for i, c in zip(sealed.live_ids().tolist(), held)} == stored
    queries = np.concatenate([codes[:4], _codes(rng, 4)])
    for k in (1, 20, 300):
        for (got_ids, d), q in zip(index.search(queries, k), queries):
            assert (got_ids.tolist(), d.tolist()) == _expected(stored, q, k)
    store.close()


def _wait_for_log(server: CloudServerProcess, text: str, count: int, timeout: float = 60.0) -> None:
    """Until the server's log holds ``text`` ``count`` times (background work: a snapshot)."""
    import time

    deadline = time.monotonic() + timeout
    while _log(server).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times"
        time.sleep(0.05)


def test_a_reseal_after_deletes_is_snapshotted(grown):
    """Deleting a quarter of the sealed part re-seals the index; that one is snapshotted too, so a
    crash right after needs no rebuild (the snapshot matches the store's write counter)."""
    server, token, stored, queries, _ = grown
    builds, snaps = _log(server).count("codes: multi-index hash"), _log(server).count("index snapshot (")
    gone = sorted(stored)[::3]
    with CloudClient(server.address, token) as owner:
        assert owner.delete("c", gone) == len(gone)
    for i in gone:
        del stored[i]
    assert _log(server).count("codes: multi-index hash") == builds + 1
    _wait_for_log(server, "index snapshot (", snaps + 1)
    server.kill()
    server.start()
    assert "c.npz: %d items (mih+flat) loaded" % len(stored) in _log(server)
    with CloudClient(server.address, token) as owner:
        _check(owner, stored, queries)


def test_concurrent_uploads_across_reseals_stay_exact(grown):
    """Re-seals run outside the service's write lock: with two upload streams writing at once
    across several re-seals (a build overtaken by a write is dropped and built again), every
    item is found and the answers are exact."""
    import threading

    server, token, stored, queries, rng = grown
    builds = _log(server).count("codes: multi-index hash")
    parts = [{base + i: c.tobytes() for i, c in enumerate(_codes(rng, 3000))} for base in (50_000, 60_000)]
    errors = []

    def upload(part):
        try:
            with CloudClient(server.address, token) as owner:
                list(owner.upload("c", ((i, c, b"b", {}) for i, c in part.items()), batch_size=100))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in parts:
        stored.update(p)
    assert _log(server).count("codes: multi-index hash") >= builds + 2
    with CloudClient(server.address, token) as owner:
        assert owner.contains("c", list(stored)) == set(stored)
        _check(owner, stored, queries)
