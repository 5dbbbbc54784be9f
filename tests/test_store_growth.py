"""The embedded store's upload delta (issue 17, item 4): past a size, upload batches go into a
small items_delta table that is merged into items in sorted passes. Nothing a caller sees may
change: an id is stored once (a re-sent id is refused, or replaced with ``replace``), deletes,
fetches, codes, stats and exports see both tables, a cleanly closed store has every item in
items, and a store made before the delta existed opens with its data."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import dlheir.server.store.sqlite as sq
from dlheir.server.store import open_store
from engines import postgres_engine  # noqa: F401 (fixture)

CODE = 6


@pytest.fixture
def small_delta(monkeypatch):
    """Every batch into the delta (from the first item), merged past 250 items."""
    monkeypatch.setattr(sq, "DELTA_FROM", 0)
    monkeypatch.setattr(sq, "DELTA_MIN", 250)
    monkeypatch.setattr(sq, "DELTA_BATCH", 1)


def _items(ids, rng, tag=b"v1"):
    return [(int(i), rng.bytes(CODE), tag + int(i).to_bytes(8, "little", signed=True), {"i": int(i)}) for i in ids]


def _rows(path, table):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def _codes(store, name):
    got = list(store.codes(name, chunk=97))  # small chunks: many id ranges, each merged from both tables
    ids = np.concatenate([c[0] for c in got])
    codes = b"".join(c[1] for c in got)
    return ids, codes


def test_delta_keeps_every_answer(tmp_path, small_delta):
    rng = np.random.default_rng(0)
    store = open_store(tmp_path)
    store.create_collection("c", 48, "o", "r")
    store.create_collection("d", 48, "o", "r")
    ids = rng.integers(-2**63, 2**63 - 1, 1000, dtype=np.int64)
    stored = {}
    for start in range(0, 1000, 100):
        batch = _items(ids[start:start + 100], rng)
        assert store.existing_ids("c", [b[0] for b in batch]) == set()
        store.write_batch("c", batch, replace=False)
        stored.update({b[0]: b for b in batch})
    store.write_batch("d", _items(ids[:10], rng), replace=False)  # the same ids in another collection
    assert 0 < store._delta_n < 1000  # some merged into items, some still in the delta
    assert _rows(store.path, "items_delta") > 0

    # a re-sent id is refused whether it is in items or in the delta; nothing of that batch is written
    in_items = [i for i in stored if store._conn.execute("SELECT 1 FROM items WHERE collection = 'c' AND id = ?",
                                                         (i,)).fetchone()]
    in_delta = [i for i in stored if i not in set(in_items)]
    assert in_items and in_delta
    for dup in (in_items[0], in_delta[0]):
        fresh = int(rng.integers(0, 2**62))
        assert store.existing_ids("c", [dup, fresh]) == {dup}
        with pytest.raises(sqlite3.IntegrityError):
            store.write_batch("c", _items([fresh, dup], rng), replace=False)
        with pytest.raises(sqlite3.IntegrityError):  # also without existing_ids asked first
            store.write_batch("c", _items([dup], rng), replace=False)
        assert store.existing_ids("c", [fresh]) == set()
    assert store.stats("c")[0] == 1000

    # replace: one copy, the new value, wherever the old one was
    again = [in_items[1], in_delta[1]]
    store.existing_ids("c", again)
    store.write_batch("c", _items(again, rng, tag=b"v2"), replace=True)
    store.write_batch("c", _items(again[::-1], rng, tag=b"v3"), replace=True)  # without existing_ids first
    for i in again:
        ((got_id, blob, meta),) = list(store.fetch("c", [i]))
        assert got_id == i and blob.startswith(b"v3") and meta == {"i": i}
    assert store.stats("c")[0] == 1000 == store.page_item_count("c")

    # deletes reach both tables
    gone = [in_items[2], in_delta[2]]
    assert store.delete("c", gone) == 2
    assert store.existing_ids("c", gone) == set() and list(store.fetch("c", gone)) == []
    expect = sorted(set(stored) - set(gone))

    got_ids, got_codes = _codes(store, "c")
    assert list(got_ids) == expect  # ascending, every item once
    by_id = {i: c for i, c in zip(got_ids.tolist(), np.frombuffer(got_codes, np.uint8).reshape(-1, CODE))}
    assert all(by_id[i].tobytes() == stored[i][1] for i in expect if i not in again)
    exported = []
    after = None
    while True:
        part = store.export_codes("c", after, 64)
        if not part:
            break
        exported += part
        after = part[-1][0]
    assert [e[0] for e in exported] == expect
    assert store.stats("d")[0] == 10
    store.close()  # merges the delta: a cleanly closed store has every item in items
    assert _rows(tmp_path / sq.STORE_FILE, "items_delta") == 0
    assert _rows(tmp_path / sq.STORE_FILE, "items") == len(expect) + 10

    store = open_store(tmp_path)
    assert list(_codes(store, "c")[0]) == expect
    assert store.delete_collection("d") and store.stats("d") == (0, 0)
    store.close()


def test_rekey_and_delete_collection_see_the_delta(tmp_path, small_delta):
    rng = np.random.default_rng(1)
    store = open_store(tmp_path)
    store.create_collection("c", 48, "o", "r")
    ids = rng.integers(0, 2**63 - 1, 400, dtype=np.int64)
    for start in range(0, 400, 100):
        store.write_batch("c", _items(ids[start:start + 100], rng), replace=False)
    assert store._delta_n
    n, _ = store.rekey_codes("c", 1, 2, lambda codes: [bytes(CODE)] * len(codes))
    assert n == 400
    got_ids, got_codes = _codes(store, "c")
    assert len(got_ids) == 400 and got_codes == bytes(CODE * 400)
    store.write_batch("c", _items(rng.integers(0, 2**62, 50), rng), replace=False)
    assert store.delete_collection("c")
    assert _rows(store.path, "items") == 0 and _rows(store.path, "items_delta") == 0
    store.close()


OLD_SCHEMA = """
CREATE TABLE collections (name TEXT PRIMARY KEY, bits INTEGER NOT NULL, owner_token_sha256 TEXT NOT NULL,
    reader_token_sha256 TEXT NOT NULL, model_fingerprint TEXT NOT NULL DEFAULT '', image_size INTEGER NOT NULL DEFAULT 0);
CREATE TABLE items (collection TEXT NOT NULL REFERENCES collections(name), id INTEGER NOT NULL, code BLOB NOT NULL,
    blob BLOB NOT NULL, metadata TEXT NOT NULL, PRIMARY KEY (collection, id));
CREATE INDEX items_codes ON items (collection, id, code);
"""


def test_store_made_before_the_delta_opens_with_its_data(tmp_path, small_delta):
    """A store file without items_delta (the layout before it): opens, gains the table, keeps
    every item, refuses its ids again, and takes new uploads through the delta."""
    rng = np.random.default_rng(2)
    path = tmp_path / sq.STORE_FILE
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size={sq.PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(OLD_SCHEMA)
    conn.execute("INSERT INTO collections VALUES ('old', 48, 'o', 'r', '', 0)")
    old_ids = sorted(int(i) for i in rng.integers(0, 2**63 - 1, 300))
    conn.executemany("INSERT INTO items VALUES ('old', ?, ?, ?, '{}')", [(i, rng.bytes(CODE), b"x") for i in old_ids])
    conn.commit()
    conn.close()

    store = open_store(tmp_path)
    assert _rows(path, "items_delta") == 0
    assert list(_codes(store, "old")[0]) == old_ids
    with pytest.raises(sqlite3.IntegrityError):
        store.write_batch("old", _items(old_ids[:1], rng), replace=False)
    new_ids = sorted(int(i) for i in rng.integers(-2**63, -1, 100))
    store.write_batch("old", _items(new_ids, rng), replace=False)
    assert store._delta_n == 100
    assert list(_codes(store, "old")[0]) == sorted(old_ids + new_ids)
    assert store.stats("old")[0] == 400
    store.close()
    assert _rows(path, "items") == 400


@pytest.fixture
def pg_url(postgres_engine):  # noqa: F811

    return postgres_engine.new_database("g")[1]


def test_postgres_random_ids_and_bulk_codes_read(tmp_path, pg_url):
    """PostgreSQL keeps one table (its delta measured slower): random ids in batches, a re-sent id
    refused, replace and delete by id, and the start-up read (one binary COPY, sorted in memory)
    returns every code once, in ascending id order, with its own id."""
    from dlheir.server.store import StoreError

    rng = np.random.default_rng(3)
    store = open_store(tmp_path, store_url=pg_url)
    store.create_collection("c", 48, "o", "r")
    store.create_collection("p", 48, "o", "r")
    ids = rng.integers(-2**63, 2**63 - 1, 1000, dtype=np.int64)
    stored = {}
    for start in range(0, 1000, 100):
        batch = _items(ids[start:start + 100], rng)
        assert store.existing_ids("c", [b[0] for b in batch]) == set()
        store.write_batch("c", batch, replace=False)
        stored.update({b[0]: b for b in batch})
    store.write_batch("p", [(int(i), b"", b"x", {}) for i in ids[:5]], replace=False)  # no code: not read
    dup, fresh = int(ids[7]), int(rng.integers(0, 2**62))
    assert store.existing_ids("c", [dup, fresh]) == {dup}
    with pytest.raises(StoreError):
        store.write_batch("c", _items([fresh, dup], rng), replace=False)
    assert store.existing_ids("c", [fresh]) == set()
    store.write_batch("c", _items([dup], rng, tag=b"v2"), replace=True)
    ((_, blob, _),) = list(store.fetch("c", [dup]))
    assert blob.startswith(b"v2")
    assert store.delete("c", [int(ids[8])]) == 1
    expect = sorted(set(stored) - {int(ids[8])})
    assert store.stats("c")[0] == len(expect)
    got_ids, got_codes = _codes(store, "c")
    assert list(got_ids) == expect
    codes = np.frombuffer(got_codes, np.uint8).reshape(-1, CODE)
    assert all(codes[k].tobytes() == stored[i][1] for k, i in enumerate(got_ids.tolist()) if i != dup)
    assert list(store.codes("p")) == []
    store.close()
