"""The embedded store (the default backend): SQLite in WAL mode with synchronous=FULL, one file.

Each item is ONE row (id, code, encrypted blob, metadata), so an item is never half
present; an upload batch is one transaction, acknowledged only after its commit
returns. The FAISS index is rebuilt from here at start.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from dlheir.paths import fsync_path
from dlheir.server.store.base import (
    CollectionGoneError, NothingWritten, StoreCorruptError, StoreError, StoreFullError, StoreUnusableError,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("dlheir.server.store")

# Written beside the store once it exists: a data dir with this marker but no (or an empty)
# store was in use and has lost its store; one with neither is new.
MARKER = "DLHEIR_DATA_DIR"
STORE_FILE = "store.sqlite3"
# Disk space kept beside the store for deletes on a full disk (Store._freeing_room): a delete's
# WAL pages (16 KiB each) for some hundreds of items; a larger delete on a full disk is refused
# and can be split.
RESERVE_FILE = "store.reserve"
RESERVE_BYTES = 2 * 1024 * 1024
WAL_CHECKPOINT_PAGES = 64  # 1 MiB of 16 KiB pages


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """SQLite's error -> one of ours, with a message naming the file and the cause."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code == sqlite3.SQLITE_FULL or "disk is full" in text:
        return StoreFullError(f"the disk holding {path} is full (or its --max-store-mb quota is reached): "
                              f"nothing was written; free space or delete items, reads still work", path)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
        return StoreCorruptError(f"{path} is damaged ({text}): stop the server, restore it from a backup", path)
    return StoreError(f"store {path}: {text}", path)

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    bits INTEGER NOT NULL,
    owner_token_sha256 TEXT NOT NULL,
    reader_token_sha256 TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL DEFAULT '',
    image_size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL REFERENCES collections(name),
    id INTEGER NOT NULL,
    code BLOB NOT NULL,
    blob BLOB NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection, id)
);
-- covering index: rebuilding the FAISS index at start reads codes without touching the blobs
CREATE INDEX IF NOT EXISTS items_codes ON items (collection, id, code);
"""
# Per-user access and key rotation (issue 10, section 2). CREATE TABLE IF NOT EXISTS runs at
# every open, so a store made before these tables existed gains them on its next start.
# readers: one row per (collection, user label): the SHA-256 of that user's reader token, when
# it was issued and when it was revoked (NULL while active); the token itself is never stored.
# code_keys: the owner's key version the collection's stored codes are under (no row: 1).
ACCESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS readers (
    collection TEXT NOT NULL REFERENCES collections(name),
    label TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL,
    PRIMARY KEY (collection, label)
);
CREATE TABLE IF NOT EXISTS code_keys (
    collection TEXT PRIMARY KEY REFERENCES collections(name),
    key_id INTEGER NOT NULL
);
"""
# Private-ranking mode (issue 10, section 4). private_collections: the collections created in
# that mode (their items carry an empty code). code_pages: their append-only sealed code pages,
# numbered 0, 1, 2, ... per collection with no gap; the server cannot open them.
PAGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS private_collections (
    name TEXT PRIMARY KEY REFERENCES collections(name)
);
CREATE TABLE IF NOT EXISTS code_pages (
    collection TEXT NOT NULL REFERENCES collections(name),
    page INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (collection, page)
);
"""
# Columns added to a table after stores were made with it: a store without them gains them (empty
# values) when it opens. collections.model_fingerprint/image_size: the model whose codes a
# collection holds ('' = a raw-code collection, or one made before fingerprints: unchecked).
# One counter, raised by every write transaction: an index snapshot (dlheir.server.snapshot)
# records the value it was taken at and is used at start only while the store still has it.
GENERATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS generation (value INTEGER NOT NULL);
INSERT INTO generation SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM generation);
"""
# Uploads into a large store (issue 17, item 4). Ids are random 63-bit integers, so every batch of
# 10,000 lands all over the (collection, id) b-trees (the primary key's and items_codes): once
# those have more leaves than a batch has items, a commit rewrote (WAL, then checkpoint) about one
# 16 KiB leaf per item in each tree. Measured (existing_ids + write_batch, 10,000 random ids per
# batch, 16-byte blobs): 26 GB written for the 3rd million (a 474 MB file) and 62k/32k/22k/16k
# items/s for the 1st..4th million (sorting each batch by id, done before, had already taken the 1st..3rd
# million from 46k/26k/20k to 78k/38k/28k; a 256 MB page cache or a 4 KiB page gained nothing, one index
# less a third). So, past DELTA_FROM items, a batch goes into items_delta,
# a small table of the same layout whose b-trees fit in a few hundred leaves, and the delta is
# merged into items in one sorted pass (one transaction, every leaf of items visited once) when
# it reaches sqrt(items x 10,000): a two-level log-structured merge, each item written about
# 2 x sqrt(items / 10,000) index entries' worth instead of a leaf per tree. An id is in items or
# in items_delta, never both; every read looks in both. Made at open in a store without it (an
# empty table: nothing to migrate); merged back into items at close, so that a cleanly closed
# store has every item in items, as before.
DELTA_SCHEMA = """
CREATE TABLE IF NOT EXISTS items_delta (
    collection TEXT NOT NULL REFERENCES collections(name),
    id INTEGER NOT NULL,
    code BLOB NOT NULL,
    blob BLOB NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection, id)
);
CREATE INDEX IF NOT EXISTS items_delta_codes ON items_delta (collection, id, code);
"""
# Re-hashing with another model (owner reindex): the new code of each item, kept aside until the
# switch replaces every code of the collection with them in one transaction (codes of one model
# at a time per collection; removed by the switch, a rotation or the collection's deletion).
STAGED_SCHEMA = """
CREATE TABLE IF NOT EXISTS staged_codes (
    collection TEXT NOT NULL REFERENCES collections(name),
    fingerprint TEXT NOT NULL,
    id INTEGER NOT NULL,
    code BLOB NOT NULL,
    PRIMARY KEY (collection, fingerprint, id)
);
"""
DELTA_FROM = 500_000  # items in the store below which a batch goes straight into items (as before)
DELTA_MIN = 100_000  # the delta is merged at max(DELTA_MIN, sqrt(items * DELTA_BATCH)) items
DELTA_BATCH = 10_000
ITEM_COLUMNS = "collection, id, code, blob, metadata"
ADDED_COLUMNS = (
    ("collections", "model_fingerprint", "TEXT NOT NULL DEFAULT ''"),
    ("collections", "image_size", "INTEGER NOT NULL DEFAULT 0"),
    # a random id given at creation: a collection deleted and re-created under the same name is
    # another collection (streams, writes and index snapshots of the old one are refused)
    ("collections", "uid", "TEXT NOT NULL DEFAULT ''"),
)
# A rowid table on 16 KiB pages: measured 3-6x faster inserts of 1 KiB blobs than a WITHOUT
# ROWID table on 4 KiB pages (rows that large overflow a clustered b-tree), and as fast for 32 KiB.
PAGE_SIZE = 16384
# The reads that scan the store at start (quick_check, the index rebuild) map the file instead of
# copying every page through SQLite's page cache: 15-25% less CPU for Store.codes() at 10M items.
# SQLite caps the mapping (2 GiB by default); it is dropped after the scan.
SCAN_MMAP_BYTES = 1 << 40


def open_store(data_dir: Path | str, integrity_check: bool = True, max_bytes: int | None = None,
               check_in_background: bool = False) -> "Store":
    """Open the store of ``data_dir``, creating it when the data dir is new.

    Refuses (StoreUnusableError, one line naming the file and what to do) a data dir that was
    in use and whose store is now missing or empty, and a store that fails SQLite's
    ``quick_check``: never serve a damaged or silently emptied store. With
    ``check_in_background`` the check runs in a thread on a connection of its own (SQLite
    releases the GIL) while the caller builds its index, and the caller must call
    ``store.verify()`` (which waits for it and raises the same refusal) before serving."""
    data_dir = Path(data_dir)
    path, marker = data_dir / STORE_FILE, data_dir / MARKER
    size = path.stat().st_size if path.exists() else None
    if marker.exists() and not size:
        raise StoreUnusableError(f"{path} is {'missing' if size is None else 'empty (0 bytes)'} but {data_dir} "
                                 f"holds a store created {marker.read_text().strip()}: {_aside(data_dir)}")
    if size == 0:
        raise StoreUnusableError(f"{path} is empty (0 bytes), not a store: {_aside(data_dir)}")
    if size is None:
        _create(path)
    try:
        store = Store(path, max_bytes=max_bytes)
    except StoreError as exc:
        raise StoreUnusableError(f"cannot open {path}: {exc}; {_aside(data_dir)}") from None
    if integrity_check:
        store._check = IntegrityCheck(path)
    if not check_in_background:
        store.verify()
    return store


def _aside(data_dir: Path) -> str:
    return f"restore it from a backup, or move {data_dir} aside to start a new, empty store"


class IntegrityCheck:
    """SQLite's ``quick_check`` of a store file, run in a thread on its own connection: SQLite
    releases the GIL while it checks, so the check runs beside the index build at start (at 10M
    items each takes seconds) instead of before it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems = ["the check did not finish"]  # until it has: a check that died is a failed one
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="quick_check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA mmap_size={SCAN_MMAP_BYTES}")
                self.problems = quick_check(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:  # cannot even open it to check: a failed check, naming why
            self.problems = [str(exc)]
        except Exception as exc:  # noqa: BLE001 - likewise
            self.problems = [f"{type(exc).__name__}: {exc}"]
        self.seconds = time.monotonic() - started

    def wait(self) -> list[str]:
        """The problems found ([]: the file is sound), once the check is done."""
        self._thread.join()
        return self.problems


def quick_check(conn: sqlite3.Connection) -> list[str]:
    """SQLite's ``PRAGMA quick_check`` on ``conn``: [] when the file is sound, else what is wrong (a
    check that cannot even run because a page is malformed is one such answer, not a logged error)."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    if rows == ["ok"]:
        return []
    return [line for row in rows for line in str(row).splitlines() if line.strip() and not line.startswith("***")]


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _create(path: Path) -> None:
    """A new store with its schema, made under a temporary name and renamed into place, so a
    store file that exists is never half made (a 0-byte store is always a damaged one)."""
    tmp = path.with_name(path.name + ".new")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.close()  # the last connection checkpoints the WAL into the file
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


class Store:
    def __init__(self, path: Path | str, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one writer connection, used by one thread at a time
        self.max_bytes = max_bytes
        try:
            self._conn = self._connect()
            self._conn.executescript(SCHEMA)
            self._add_columns()
            self._conn.executescript(PAGES_SCHEMA)
            self._conn.executescript(ACCESS_SCHEMA)
            self._conn.executescript(GENERATION_SCHEMA)
            self._conn.executescript(DELTA_SCHEMA)
            self._conn.executescript(STAGED_SCHEMA)
            self._main_n = self._conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM items").fetchone()[0]  # O(log)
            self._delta_n = self._conn.execute("SELECT COUNT(*) FROM items_delta").fetchone()[0]
            self._writes = 0  # write transactions begun: existing_ids' last answer holds while this is unchanged
            self._known: tuple | None = None  # (collection, ids asked, ids found, self._writes then)
            if max_bytes:  # a quota: SQLite answers SQLITE_FULL past it, exactly as on a full disk
                self._conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // PAGE_SIZE)}")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        # readers (fetch, stats, contains, rebuild) get one connection per thread: in WAL mode they
        # read the last committed state without waiting for a writer's fsync
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._check: IntegrityCheck | None = None  # open_store's, until verify()
        if not max_bytes:
            self._make_reserve()

    def _add_columns(self) -> None:
        """Migrate a store made before ADDED_COLUMNS in place (each ALTER is one statement: atomic)."""
        for table, column, decl in ADDED_COLUMNS:
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                log.info("%s: added column %s.%s (existing rows: empty)", self.path, table, column)
        # collections made before uids get one now (their old index snapshots are then rebuilt)
        self._conn.execute("UPDATE collections SET uid = lower(hex(randomblob(16))) WHERE uid = ''")

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect only while the file is still empty
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # the committed pages move from the WAL into the store file after every ~1 MiB (SQLite's default,
        # 1000 pages, is 16 MiB here): on a full disk the WAL then holds little that still needs room in
        # the store file, so a delete's checkpoint fits in the reserve (a one-off timing: upload speed within noise, see the README)
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        return conn

    @contextmanager
    def _sqlite_errors(self):
        """Translate SQLite's errors into StoreError subclasses (logged once, here)."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise  # a constraint (duplicate name, ...): the caller's answer, not a store failure
        except sqlite3.Error as exc:
            err = _translate(exc, self.path)
            log.error("%s", err)
            raise err from None

    @contextmanager
    def _transaction(self, counts: bool = True):
        """One write transaction on the writer connection: all or nothing, durable on exit.
        ``counts``: it raises the write counter (a merge of the delta changes no content: not)."""
        with self._sqlite_errors(), self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._writes += counts  # existing_ids' answer is stale from here (a merge moves, adds no id)
            try:
                yield self._conn
                if counts:
                    self._conn.execute("UPDATE generation SET value = value + 1")  # any snapshot is now stale
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (SQLITE_FULL in COMMIT, for one);
                # a second ROLLBACK would then hide the cause behind "no transaction is active"
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def generation(self) -> int:
        """The write counter: changes with every committed write transaction."""
        with self._sqlite_errors(), self._lock:
            return int(self._conn.execute("SELECT value FROM generation").fetchone()[0])

    @property
    def integrity_check(self) -> "IntegrityCheck | None":
        """The check ``open_store`` left running in the background, until ``verify()``."""
        return self._check

    def verify(self) -> None:
        """Wait for the integrity check ``open_store`` started (if any) and refuse a store that
        failed it (StoreUnusableError, one line; the store is closed); marks the data dir as
        holding a store once it passed."""
        check, self._check = self._check, None
        if check is not None:
            problems = check.wait()
            if problems:
                self.close()
                raise StoreUnusableError(f"{self.path} failed SQLite's integrity check ({problems[0]}"
                                         f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}): "
                                         f"{_aside(self.path.parent)}")
            log.info("quick_check of %s passed in %.2f s", self.path, check.seconds)
        marker = self.path.parent / MARKER
        if not marker.exists():
            _write_durably(marker, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")

    def create_collection(self, name: str, bits: int, owner_hash: str, reader_hash: str,
                          private: bool = False, fingerprint: str = "", image_size: int = 0) -> str | None:
        """Create a collection; returns its new random uid, or None if the name is taken."""
        uid = secrets.token_hex(16)
        try:
            with self._transaction() as conn:
                conn.execute("INSERT INTO collections (name, bits, owner_token_sha256, reader_token_sha256, "
                             "model_fingerprint, image_size, uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (name, bits, owner_hash, reader_hash, fingerprint, image_size, uid))
                if private:  # the mode is part of the collection from its first commit
                    conn.execute("INSERT INTO private_collections VALUES (?)", (name,))
        except sqlite3.IntegrityError:
            return None
        return uid

    def uids(self) -> dict[str, str]:
        """Collection name -> its uid."""
        with self._sqlite_errors(), self._lock:
            return dict(self._conn.execute("SELECT name, uid FROM collections").fetchall())

    def _check_uid(self, conn: sqlite3.Connection, collection: str, uid: str | None) -> None:
        """Inside a write transaction: refuse (CollectionGoneError) a write meant for collection
        ``uid`` when ``collection`` is now another one, or none."""
        if uid is None:
            return
        row = conn.execute("SELECT uid FROM collections WHERE name = ?", (collection,)).fetchone()
        if row is None or row[0] != uid:
            raise CollectionGoneError(f"collection {collection!r} was deleted"
                                      f"{'' if row is None else ' and re-created'} since this call started: "
                                      f"nothing was written")

    def delete_collection(self, name: str) -> bool:
        """Remove a collection and everything it holds in one transaction; False if there is none.
        It frees room, so on a full disk it may use the store's reserve (``_freeing_room``)."""
        def body(conn: sqlite3.Connection) -> bool:
            for table in ("items", "items_delta", "staged_codes", "readers", "code_keys", "code_pages"):
                conn.execute(f"DELETE FROM {table} WHERE collection = ?", (name,))
            conn.execute("DELETE FROM private_collections WHERE name = ?", (name,))
            return conn.execute("DELETE FROM collections WHERE name = ?", (name,)).rowcount > 0

        return self._freeing_room(body)

    # --- room for deletes on a full disk --------------------------------------------------------
    # A delete writes too (its pages go to the WAL first): on a really full disk it would fail like
    # an upload, and the owner could not free room. The store keeps a reserve file of RESERVE_BYTES
    # beside it (so uploads fill the disk that much earlier); a delete that finds the disk full
    # releases it, runs again, truncates the WAL and makes the reserve again where there is room.
    def _reserve_path(self) -> Path:
        return self.path.with_name(RESERVE_FILE)

    def _make_reserve(self) -> bool:
        """Create the reserve file if it is missing; False (logged) when the disk has no room for it."""
        path = self._reserve_path()
        if path.exists() and path.stat().st_size >= RESERVE_BYTES:
            return True
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(bytes(RESERVE_BYTES))  # real blocks, not a sparse file
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return True
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("%s: no room for the store's %d-byte reserve for deletes on a full disk (%s); "
                        "it is made again once there is room", path, RESERVE_BYTES, exc.strerror or exc)
            return False

    def _freeing_room(self, body: Callable[[sqlite3.Connection], object]):
        """Run ``body`` in one write transaction; if the disk is full, release the reserve and run it
        again (a delete must be able to free room), then truncate the WAL and restore the reserve."""
        try:
            with self._transaction() as conn:
                return body(conn)
        except StoreFullError:
            reserve = self._reserve_path()
            if not reserve.exists() or self.max_bytes:  # a quota is not the disk: the reserve does not help
                raise
            reserve.unlink()
            log.warning("%s: disk full: the store's reserve released so that a delete can run", self.path)
        # SQLite built with secure_delete (Debian's is) zeroes every freed page, each one a WAL page:
        # more room than the reserve for a large delete. FAST zeroes only what costs no extra write
        # (the freed overflow pages of blobs keep their AES-GCM ciphertext until they are reused)
        with self._sqlite_errors(), self._lock:
            secure = self._conn.execute("PRAGMA secure_delete").fetchone()[0]
            self._conn.execute("PRAGMA secure_delete=FAST")
        try:
            with self._transaction() as conn:
                result = body(conn)
        finally:
            with self._sqlite_errors(), self._lock:
                self._conn.execute(f"PRAGMA secure_delete={int(secure)}")
        # committed: what follows only tries to give the disk back its reserve. A checkpoint moves the
        # WAL's pages into the store file (which may need room the disk lacks: then later, by SQLite)
        # and truncates the WAL; then the reserve is made again if there is room
        try:
            with self._lock:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("%s: WAL checkpoint after the delete not done (%s); the delete is committed", self.path, exc)
        self._make_reserve()
        return result

    def collections(self) -> list[tuple[str, int, str, str]]:
        with self._sqlite_errors(), self._lock:
            return self._conn.execute("SELECT name, bits, owner_token_sha256, reader_token_sha256 FROM collections").fetchall()

    def models(self) -> dict[str, tuple[str, int]]:
        """Collection -> (model fingerprint, image size) it was created with ('', 0: unchecked)."""
        with self._sqlite_errors(), self._lock:
            return {r[0]: (r[1], r[2]) for r in
                    self._conn.execute("SELECT name, model_fingerprint, image_size FROM collections")}

    @staticmethod
    def _ids_in(conn: sqlite3.Connection, collection: str, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"SELECT id FROM items WHERE collection = ? AND id IN ({marks}) UNION ALL "
                                f"SELECT id FROM items_delta WHERE collection = ? AND id IN ({marks})",
                                (collection, *chunk, collection, *chunk)).fetchall()
            found.update(r[0] for r in rows)
        return found

    @staticmethod
    def _ids_in_main(conn: sqlite3.Connection, collection: str, ids: list[int]) -> list[int]:
        found: list[int] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found += [r[0] for r in conn.execute(f"SELECT id FROM items WHERE collection = ? AND id IN "
                                                 f"({','.join('?' * len(chunk))})", (collection, *chunk))]
        return found

    def existing_ids(self, collection: str, ids: Iterable[int]) -> set[int]:
        """Ids already stored, read on the writer connection (callers serialise writes). The
        answer is kept until the next write: the upload that asked it then writes those same ids,
        and its write_batch does not look each one up again."""
        ids = list(ids)
        with self._sqlite_errors(), self._lock:
            found = self._ids_in(self._conn, collection, ids)
            self._known = (collection, frozenset(ids), frozenset(found), self._writes)
        return found

    def present_ids(self, collection: str, ids: Iterable[int]) -> set[int]:
        """Ids stored as of the last commit (reader connection, never waits for a writer)."""
        with self._sqlite_errors():
            return self._ids_in(self._reader(), collection, list(ids))

    def write_batch(self, collection: str, items: list[tuple[int, bytes, bytes, dict]], replace: bool,
                    uid: str | None = None) -> None:
        """All items or none, durable when this returns. With ``uid``: only into that collection
        (CollectionGoneError if it was deleted or re-created meanwhile)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        # in id order: the rows go into the (collection, id) b-trees leaf after leaf, each leaf the
        # batch touches visited once. A stable sort: a repeated id keeps its order (last wins)
        rows = sorted(((collection, i, c, b, json.dumps(m, sort_keys=True)) for i, c, b, m in items),
                      key=lambda r: r[1])
        with self._transaction() as conn:
            self._check_uid(conn, collection, uid)
            if self._main_n + self._delta_n < DELTA_FROM:  # a small store: straight into items, as before
                conn.executemany(f"{verb} INTO items VALUES (?, ?, ?, ?, ?)", rows)
                self._main_n += len(rows)
            else:
                # an id is in one table only: one already in items is a duplicate (refused as the
                # primary key refuses it) or, with replace, moves into the delta
                ids = sorted({r[1] for r in rows})
                known = self._known
                if known is not None and known[0] == collection and known[3] == self._writes - 1 and known[1] == set(ids):
                    ids = sorted(known[2])  # only these can be in items (existing_ids just looked, no write since)
                if replace:
                    for start in range(0, len(ids), 500):
                        chunk = ids[start:start + 500]
                        conn.execute(f"DELETE FROM items WHERE collection = ? AND id IN ({','.join('?' * len(chunk))})",
                                     (collection, *chunk))
                else:
                    dup = self._ids_in_main(conn, collection, ids)
                    if dup:
                        raise sqlite3.IntegrityError(f"UNIQUE constraint failed: items.collection, items.id ({dup[0]})")
                conn.executemany(f"{verb} INTO items_delta ({ITEM_COLUMNS}) VALUES (?, ?, ?, ?, ?)", rows)
                self._delta_n += len(rows)
        if self._delta_n >= max(DELTA_MIN, int((self._main_n * DELTA_BATCH) ** 0.5)):
            try:  # the batch is committed: a merge that fails (a full disk) is tried again after the next one
                self.merge_delta()
            except StoreError as exc:
                log.warning("%s: merging the upload delta failed (%s); tried again later", self.path, exc)

    def merge_delta(self) -> int:
        """Move every item of items_delta into items in one transaction (in (collection, id)
        order: each leaf of items' b-trees visited once); returns the items moved. No content
        changes: the write counter is not raised (an index snapshot stays valid)."""
        started = time.monotonic()
        with self._transaction(counts=False) as conn:
            n = conn.execute(f"INSERT INTO items ({ITEM_COLUMNS}) SELECT {ITEM_COLUMNS} FROM items_delta "
                             "ORDER BY collection, id").rowcount
            conn.execute("DELETE FROM items_delta")
        self._main_n += max(n, 0)
        self._delta_n = 0
        log.info("%s: merged %d uploaded items into the main table (about %d items) in %.1f s", self.path, n,
                 self._main_n, time.monotonic() - started)
        return n

    def delete(self, collection: str, ids: list[int], uid: str | None = None) -> int:
        """Delete items (with ``uid``: only of that collection, as ``write_batch``); it frees room,
        so on a full disk it may use the store's reserve (``_freeing_room``)."""
        def body(conn: sqlite3.Connection) -> int:
            self._check_uid(conn, collection, uid)
            n = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for table in ("items", "items_delta"):
                    n += conn.execute(f"DELETE FROM {table} WHERE collection = ? AND id IN "
                                      f"({','.join('?' * len(chunk))})", (collection, *chunk)).rowcount
            return n

        return self._freeing_room(body)

    def fetch(self, collection: str, ids: list[int]) -> Iterator[tuple[int, bytes, dict]]:
        """Blobs in the order asked, read one at a time (memory: one blob, whatever the number
        of ids); unknown ids are skipped."""
        conn = self._reader()
        for item_id in ids:
            with self._sqlite_errors():
                # one statement, one snapshot: an item moving between the tables meanwhile is still found
                row = conn.execute("SELECT blob, metadata FROM items_delta WHERE collection = ? AND id = ? UNION ALL "
                                   "SELECT blob, metadata FROM items WHERE collection = ? AND id = ? LIMIT 1",
                                   (collection, item_id, collection, item_id)).fetchone()
            if row is not None:
                yield item_id, row[0], json.loads(row[1])
            del row  # drop this blob before reading the next one

    def codes(self, collection: str, chunk: int = 1_000_000) -> Iterator[tuple[np.ndarray, bytes]]:
        """(ids int64, concatenated codes) of every stored item, in chunks of ascending ids, all
        read in one transaction (one snapshot of the store), for rebuilding the index.

        Each chunk is ONE row from SQLite: the ids as one decimal list and the codes as one
        blob, aggregated over the same rows of the covering index (so id i and code i belong
        together), instead of a Python tuple, int and bytes object per item (at 10M items that
        was over half of a crash restart). A chunk is an id range [lo, hi): hi is found by
        stepping ``chunk`` entries along the index (no row is copied for that), so the aggregate
        reads the index directly; the upload delta's items in the same range (items_delta_codes)
        are merged into the chunk by id. A chunk whose codes do not split into equal lengths raises
        StoreCorruptError (uploads check each code's length)."""
        import numpy as np

        # the boundary only partitions the ids (without the code test it steps twice as fast);
        # empty codes (items of a private-ranking collection) are not indexable: not read
        boundary = "SELECT id FROM items WHERE collection = ? AND id >= ? ORDER BY id LIMIT 1 OFFSET ?"
        read = ("SELECT count(*), CAST(group_concat(id) AS BLOB), CAST(group_concat(code, '') AS BLOB) FROM items "
                "WHERE collection = ? AND code != x'' AND id >= ?")
        read_delta = read.replace("FROM items ", "FROM items_delta ")
        with self._sqlite_errors():
            conn = self._reader()
            conn.execute(f"PRAGMA mmap_size={SCAN_MMAP_BYTES}")
            conn.execute("BEGIN")  # every chunk from the same snapshot
            try:
                lo = -2**63
                while True:
                    hi = conn.execute(boundary, (collection, lo, chunk)).fetchone()  # the first id past this chunk
                    parts = []
                    for query in (read, read_delta):  # items, then the upload delta's items in the same id range
                        if hi is None:  # the last chunk
                            n, ids, codes = conn.execute(query, (collection, lo)).fetchone()
                        else:
                            n, ids, codes = conn.execute(query + " AND id < ?", (collection, lo, hi[0])).fetchone()
                        if n:
                            ids = np.fromstring(ids, dtype=np.int64, sep=",")
                            if len(ids) != n or len(codes) % n:
                                raise StoreCorruptError(f"{self.path}: the codes of {collection!r} read back "
                                                        f"inconsistent ({n} rows, {len(ids)} ids, {len(codes)} bytes "
                                                        "of codes)", self.path)
                            parts.append((ids, codes))
                    if len(parts) == 2:  # merged into one ascending chunk
                        (ids_a, codes_a), (ids_b, codes_b) = parts
                        width = len(codes_a) // len(ids_a)
                        if len(codes_b) != width * len(ids_b):
                            raise StoreCorruptError(f"{self.path}: the codes of {collection!r} read back with two "
                                                    "lengths", self.path)
                        ids = np.concatenate([ids_a, ids_b])
                        order = np.argsort(ids, kind="stable")
                        both = np.frombuffer(codes_a + codes_b, np.uint8).reshape(-1, width)
                        parts = [(ids[order], both[order].tobytes())]
                    if parts:
                        yield parts[0]
                    if hi is None:
                        return
                    lo = hi[0]
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
                conn.execute("PRAGMA mmap_size=0")  # later reads (fetch, stats) as before

    def stats(self, collection: str) -> tuple[int, int]:
        with self._sqlite_errors():
            n, size = self._reader().execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM (SELECT blob FROM items WHERE collection = ? "
                "UNION ALL SELECT blob FROM items_delta WHERE collection = ?)", (collection, collection)).fetchone()
        return n, size

    # --- per-user readers and key rotation -------------------------------------------------
    def readers(self) -> list[tuple[str, str, str, float, float | None]]:
        """Every reader credential: (collection, label, token sha256, created, revoked or None)."""
        with self._sqlite_errors(), self._lock:
            return self._conn.execute("SELECT collection, label, token_sha256, created, revoked FROM readers "
                                      "ORDER BY collection, label").fetchall()

    def add_reader(self, collection: str, label: str, token_hash: str,
                   replace: bool) -> tuple[bool, str | None, float]:
        """Issue ``label``'s credential: (done, the hash it replaces if that one was active, created).
        An active label is replaced only with ``replace``; a revoked one is re-issued."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT token_sha256, revoked FROM readers WHERE collection = ? AND label = ?",
                               (collection, label)).fetchone()
            active = row[0] if row is not None and row[1] is None else None
            if active is not None and not replace:
                return False, active, 0.0
            conn.execute("INSERT OR REPLACE INTO readers VALUES (?, ?, ?, ?, NULL)", (collection, label, token_hash, now))
        return True, active, now

    def revoke_reader(self, collection: str, label: str) -> tuple[str, bool] | None:
        """(token hash, newly revoked) of ``label``, or None if the collection never had it."""
        with self._transaction() as conn:
            row = conn.execute("SELECT token_sha256, revoked FROM readers WHERE collection = ? AND label = ?",
                               (collection, label)).fetchone()
            if row is None:
                return None
            if row[1] is None:
                conn.execute("UPDATE readers SET revoked = ? WHERE collection = ? AND label = ?",
                             (time.time(), collection, label))
        return row[0], row[1] is None

    def disable_shared_reader(self, collection: str) -> bool:
        """Revoke the collection's shared reader token (its stored hash becomes ''); True if it was active."""
        with self._transaction() as conn:
            return conn.execute("UPDATE collections SET reader_token_sha256 = '' WHERE name = ? "
                                "AND reader_token_sha256 != ''", (collection,)).rowcount > 0

    def key_ids(self) -> dict[str, int]:
        """Collection -> the key version of its stored codes (collections never rotated are absent: 1)."""
        with self._sqlite_errors(), self._lock:
            return dict(self._conn.execute("SELECT collection, key_id FROM code_keys").fetchall())

    def rekey_codes(self, collection: str, from_key: int, to_key: int,
                    transform: Callable[[list[bytes]], list[bytes]]) -> tuple[int, list[tuple[str, str]]] | None:
        """In ONE transaction: every stored code of ``collection`` -> ``transform`` of it, the key
        id ``from_key`` -> ``to_key``, every active reader credential revoked and the shared
        reader token disabled. Returns (codes rewritten, [(label, token hash) revoked]), or None
        (nothing written) when the collection's key id is not ``from_key``."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT key_id FROM code_keys WHERE collection = ?", (collection,)).fetchone()
            if (row[0] if row else 1) != from_key:
                return None
            conn.execute(f"INSERT INTO items ({ITEM_COLUMNS}) SELECT {ITEM_COLUMNS} FROM items_delta "
                         "WHERE collection = ? ORDER BY id", (collection,))  # every code in one table first
            conn.execute("DELETE FROM items_delta WHERE collection = ?", (collection,))
            rows = conn.execute("SELECT id, code FROM items WHERE collection = ?", (collection,)).fetchall()
            new_codes = transform([r[1] for r in rows])  # every row read before any is written
            conn.executemany("UPDATE items SET code = ? WHERE collection = ? AND id = ?",
                             [(c, collection, r[0]) for r, c in zip(rows, new_codes)])
            conn.execute("INSERT OR REPLACE INTO code_keys VALUES (?, ?)", (collection, to_key))
            conn.execute("DELETE FROM staged_codes WHERE collection = ?", (collection,))  # under the old key
            revoked = conn.execute("SELECT label, token_sha256 FROM readers WHERE collection = ? AND revoked IS NULL",
                                   (collection,)).fetchall()
            conn.execute("UPDATE readers SET revoked = ? WHERE collection = ? AND revoked IS NULL", (now, collection))
            conn.execute("UPDATE collections SET reader_token_sha256 = '' WHERE name = ?", (collection,))
        return len(rows), [(label, h) for label, h in revoked]

    # --- re-hashing with another model (owner reindex) -------------------------------------------
    def stage_codes(self, collection: str, fingerprint: str, ids: list[int], codes: list[bytes],
                    uid: str | None = None) -> int:
        """Keep the new code of each id aside (staging an id again replaces it; codes staged for
        another model are dropped first). Changes no served content. Returns how many this staged."""
        with self._transaction(counts=False) as conn:
            self._check_uid(conn, collection, uid)
            other = ("SELECT 1 FROM staged_codes WHERE collection = ? AND (fingerprint < ? OR fingerprint > ?) LIMIT 1")
            if conn.execute(other, (collection, fingerprint, fingerprint)).fetchone():  # two index ranges, not a scan
                conn.execute("DELETE FROM staged_codes WHERE collection = ? AND fingerprint != ?", (collection, fingerprint))
            conn.executemany("INSERT OR REPLACE INTO staged_codes VALUES (?, ?, ?, ?)",
                             sorted((collection, fingerprint, int(i), bytes(c)) for i, c in zip(ids, codes)))
        return len(ids)

    def unstaged_ids(self, collection: str, fingerprint: str, after: int, limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` stored ids greater than ``after`` without a staged code of ``fingerprint``
        (ascending), and how many codes of it are staged (counted on the first page only, ``after``
        < 0: a count is a scan)."""
        missing = ("SELECT id FROM {table} t WHERE collection = ? AND id > ? AND NOT EXISTS (SELECT 1 FROM "
                   "staged_codes s WHERE s.collection = t.collection AND s.fingerprint = ? AND s.id = t.id) "
                   "ORDER BY id LIMIT ?")
        with self._sqlite_errors():
            conn = self._reader()
            ids = sorted({r[0] for table in ("items", "items_delta")  # a merge may move an id between the two reads
                          for r in conn.execute(missing.format(table=table), (collection, after, fingerprint, limit))})
            staged = conn.execute("SELECT COUNT(*) FROM staged_codes WHERE collection = ? AND fingerprint = ?",
                                  (collection, fingerprint)).fetchone()[0] if after < 0 else 0
        return ids[:limit], int(staged)

    def switch_codes(self, collection: str, fingerprint: str, image_size: int, uid: str | None = None) -> int:
        """In ONE transaction: every stored code of ``collection`` replaced by its staged code of
        ``fingerprint``, the collection's model set to it, the staged codes dropped. Returns 0, or
        the number of stored items without a staged code (then nothing is written)."""
        try:
            with self._transaction() as conn:
                self._check_uid(conn, collection, uid)
                missing = sum(conn.execute(
                    f"SELECT COUNT(*) FROM {table} t WHERE collection = ? AND NOT EXISTS (SELECT 1 FROM staged_codes s "
                    "WHERE s.collection = t.collection AND s.fingerprint = ? AND s.id = t.id)",
                    (collection, fingerprint)).fetchone()[0] for table in ("items", "items_delta"))
                if missing:
                    raise NothingWritten(missing)
                for table in ("items", "items_delta"):
                    conn.execute(f"UPDATE {table} SET code = (SELECT code FROM staged_codes s WHERE s.collection = "
                                 f"{table}.collection AND s.fingerprint = ? AND s.id = {table}.id) WHERE collection = ?",
                                 (fingerprint, collection))
                conn.execute("UPDATE collections SET model_fingerprint = ?, image_size = ? WHERE name = ?",
                             (fingerprint, int(image_size), collection))
                conn.execute("DELETE FROM staged_codes WHERE collection = ?", (collection,))
        except NothingWritten as exc:
            return exc.result
        return 0

    # --- private-ranking mode: sealed code pages ----------------------------------------------
    def page_private_collections(self) -> set[str]:
        """Names of the collections created in private-ranking mode."""
        with self._sqlite_errors(), self._lock:
            return {r[0] for r in self._conn.execute("SELECT name FROM private_collections")}

    def page_append(self, collection: str, page: int, data: bytes, uid: str | None = None) -> int | None:
        """Store page number ``page`` if it is the next one (pages are append-only, numbered
        without gaps): returns the page count after it, or None (nothing written) when ``page``
        is not the current count. Durable when this returns. ``uid``: as ``write_batch``."""
        with self._transaction() as conn:
            self._check_uid(conn, collection, uid)
            (count,) = conn.execute("SELECT COUNT(*) FROM code_pages WHERE collection = ?", (collection,)).fetchone()
            if page != count:
                return None
            conn.execute("INSERT INTO code_pages VALUES (?, ?, ?)", (collection, page, data))
        return count + 1

    def page_stats(self, collection: str) -> tuple[int, int]:
        """(pages, total bytes) of a collection's sealed code pages."""
        with self._sqlite_errors():
            return tuple(self._reader().execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM code_pages WHERE collection = ?",
                (collection,)).fetchone())

    def page_read(self, collection: str, from_page: int, to_page: int) -> Iterator[tuple[int, bytes]]:
        """(page, data) of pages ``from_page`` .. ``to_page - 1``, in order, read one at a time
        (memory: one page; pages never change once written, so no long read transaction)."""
        conn = self._reader()
        for page in range(from_page, to_page):
            with self._sqlite_errors():
                row = conn.execute("SELECT data FROM code_pages WHERE collection = ? AND page = ?",
                                   (collection, page)).fetchone()
            if row is None:  # pages are never removed: only a damaged store gets here
                raise StoreCorruptError(f"{self.path}: code page {page} of {collection!r} is missing", self.path)
            yield page, row[0]
            del row

    def page_item_count(self, collection: str) -> int:
        """Items stored (read on the writer connection: callers serialise writes)."""
        with self._sqlite_errors(), self._lock:
            return sum(self._conn.execute(f"SELECT COUNT(*) FROM {table} WHERE collection = ?", (collection,)).fetchone()[0]
                       for table in ("items", "items_delta"))

    # --- migration only (dlheir.server.migrate): copy a whole store into another --------------
    def import_collection(self, name: str, uid: str, bits: int, owner_hash: str, reader_hash: str, private: bool,
                          fingerprint: str, image_size: int, key_id: int) -> bool:
        """For migration only: create collection ``name`` exactly as the source store has it (its
        ``uid``, token hashes, mode, model and key id of its codes), in one transaction. True when
        created; False when it is already here with the same ``uid`` (a resumed migration: its
        fields are set again); StoreError when a collection of that name with another uid is here."""
        with self._transaction() as conn:
            row = conn.execute("SELECT uid FROM collections WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != uid:
                raise StoreError(f"{self.path} already holds another collection named {name!r}", self.path)
            values = (bits, owner_hash, reader_hash, fingerprint, image_size, uid, name)
            if row is None:
                conn.execute("INSERT INTO collections (bits, owner_token_sha256, reader_token_sha256, "
                             "model_fingerprint, image_size, uid, name) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            else:
                conn.execute("UPDATE collections SET bits = ?, owner_token_sha256 = ?, reader_token_sha256 = ?, "
                             "model_fingerprint = ?, image_size = ?, uid = ? WHERE name = ?", values)
            conn.execute("DELETE FROM private_collections WHERE name = ?", (name,))
            if private:
                conn.execute("INSERT INTO private_collections VALUES (?)", (name,))
            conn.execute("DELETE FROM code_keys WHERE collection = ?", (name,))
            if key_id != 1:  # no row: key 1, as a collection never rotated
                conn.execute("INSERT INTO code_keys VALUES (?, ?)", (name, key_id))
        return row is None

    def import_readers(self, collection: str, rows: list[tuple[str, str, float, float | None]]) -> None:
        """For migration only: set (label, token sha256, created, revoked or None) of each reader
        of ``collection`` exactly as given (replacing a label already here), in one transaction."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO readers VALUES (?, ?, ?, ?, ?)",
                             [(collection, label, h, created, revoked) for label, h, created, revoked in rows])

    def export_codes(self, collection: str, after: int | None, limit: int) -> list[tuple[int, bytes, int]]:
        """For migration only: (id, code, blob size) of up to ``limit`` items with ids above
        ``after`` (None: from the first), ascending; empty codes (private mode) included."""
        rows = []
        with self._sqlite_errors():
            conn = self._reader()
            conn.execute("BEGIN")  # both tables from one snapshot
            try:
                for table in ("items", "items_delta"):
                    if after is None:
                        rows += conn.execute(f"SELECT id, code, length(blob) FROM {table} WHERE collection = ? "
                                             "ORDER BY id LIMIT ?", (collection, limit)).fetchall()
                    else:
                        rows += conn.execute(f"SELECT id, code, length(blob) FROM {table} WHERE collection = ? "
                                             "AND id > ? ORDER BY id LIMIT ?", (collection, after, limit)).fetchall()
            finally:
                conn.execute("COMMIT")
        rows.sort(key=lambda r: r[0])
        return [(r[0], bytes(r[1]), r[2]) for r in rows[:limit]]

    def export_blobs(self, collection: str, ids: list[int]) -> list[tuple[int, bytes, dict]]:
        """For migration only: (id, blob, metadata) of ``ids`` in that order (unknown ids skipped)."""
        return list(self.fetch(collection, ids))

    def close(self) -> None:
        if self._delta_n:  # a cleanly closed store has every item in items (as stores made before the delta)
            try:
                self.merge_delta()
            except StoreError as exc:  # e.g. a full disk: the delta stays, read and merged later
                log.warning("%s: the upload delta was not merged at close (%s); it is kept", self.path, exc)
        with self._lock:
            self._conn.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
