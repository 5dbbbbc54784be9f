"""The PostgreSQL backend (psycopg 3): collections, codes, readers, key versions and sealed pages
in PostgreSQL; blobs there too, or in an S3-compatible object store (``server/store/s3.py``).

``--store postgresql://USER@HOST:PORT/DB`` (any libpq URL; a password from ``PGPASSWORD`` or
``~/.pgpass``, not the command line). The schema is created at first start (``SCHEMA``,
``schema_version`` records it). Every write is one transaction on one writer connection,
durable when it returns (PostgreSQL's commit, synchronous_commit on); reads use a connection per
thread and never wait for a writer.

**Commit order with an object store.** An upload batch first journals its new object keys (the
``blob_journal`` table, committed), PUTs every blob (each under a fresh key), then commits its
rows, which name those keys, and removes them from the journal in the same commit; it is
acknowledged only after that. A crash before the commit leaves objects no row names, and the
journal names them: the sweep at the next start deletes them (never an acknowledged item
without its blob). A replaced or deleted item's old object, and a deleted collection's key
prefix, are journaled in the commit that unnames them and deleted after it; a failure there
leaves them journaled for the sweep. The sweep reads the journal, not the bucket: its cost does
not grow with the store.

A lost connection (PostgreSQL stopped or restarted) is a StoreError naming PostgreSQL
(UNAVAILABLE to the client); the next call connects again, so the server recovers by itself.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator
from urllib.parse import urlsplit

from dlheir.server.store.base import (
    CollectionGoneError, NothingWritten, StoreCorruptError, StoreError, StoreUnusableError,
)

if TYPE_CHECKING:
    import numpy as np

    from dlheir.server.store.s3 import S3Blobs

log = logging.getLogger("dlheir.server.store.postgres")
SCHEMA_VERSION = 2  # 2: change_log, fronts, blob_journal.front (several fronts over one store)
CHANGES_CHANNEL = "dlheir_changes"  # NOTIFY channel: a commit that logged a change wakes every front
CONNECT_TIMEOUT_S = 5
FETCH_WINDOW = 32  # items read per query by fetch (their GETs in parallel)
FETCH_WINDOW_BYTES = 64 << 20  # and at most this many bytes of blobs held at once (one blob may be larger)

# Which of many ids a collection holds: one primary-key probe per id. Not "id = ANY(%s)": while a
# batch is a large part of the table the planner scanned the table, testing every row against the
# whole array (an upload's batch took 0.3 s more per 10,000 items stored); nor a plain join on the
# unnested ids: on a table without statistics yet (a fresh store's first minutes) it chose a hash
# join over a scan of the whole table (0.65-0.71 s per 10,000 ids at 1.5M rows, against 0.08 s
# probing). The LIMIT keeps the lateral subquery a probe per id whatever the statistics say.
IDS_IN = ("SELECT u.id FROM unnest(%s::bigint[]) AS u(id) CROSS JOIN LATERAL (SELECT 1 FROM items i "
          "WHERE i.collection = %s AND i.id = u.id LIMIT 1) AS hit")
# the same probes, for the codes of those present (with a code), ascending
CODES_OF = ("SELECT u.id, hit.code FROM unnest(%s::bigint[]) AS u(id) CROSS JOIN LATERAL (SELECT i.code FROM items i "
            "WHERE i.collection = %s AND i.id = u.id AND i.code <> ''::bytea LIMIT 1) AS hit ORDER BY u.id")
# and for the object keys of those present that have one
BLOB_KEYS_OF = ("SELECT hit.blob_key FROM unnest(%s::bigint[]) AS u(id) CROSS JOIN LATERAL (SELECT i.blob_key FROM "
                "items i WHERE i.collection = %s AND i.id = u.id AND i.blob_key IS NOT NULL LIMIT 1) AS hit")

# the last change committed (the log may have been pruned up to the floor, or to its end)
LAST_CHANGE = "SELECT GREATEST((SELECT COALESCE(MAX(seq), 0) FROM change_log), (SELECT value FROM change_floor))"

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS generation (value BIGINT NOT NULL);
INSERT INTO generation SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM generation);
CREATE SEQUENCE IF NOT EXISTS item_changes;
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    bits INTEGER NOT NULL,
    owner_token_sha256 TEXT NOT NULL,
    reader_token_sha256 TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL DEFAULT '',
    image_size INTEGER NOT NULL DEFAULT 0,
    uid TEXT NOT NULL UNIQUE,
    private BOOLEAN NOT NULL DEFAULT FALSE,
    key_id INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL REFERENCES collections(name),
    id BIGINT NOT NULL,
    code BYTEA NOT NULL,
    blob BYTEA,              -- the blob itself, or NULL when it lives in the object store
    blob_key TEXT,           -- its object key there
    blob_size INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    change BIGINT NOT NULL,  -- from the item_changes sequence: a per-item change order
    PRIMARY KEY (collection, id)
);
CREATE TABLE IF NOT EXISTS readers (
    collection TEXT NOT NULL REFERENCES collections(name),
    label TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION,
    PRIMARY KEY (collection, label)
);
-- object keys (or a deleted collection's key prefix, ending in '/') that may be in the object
-- store with no row naming them: written before a batch's PUTs, removed in its commit; written in
-- the commit of a delete, removed once the objects are gone. The sweep at start reads only this.
CREATE TABLE IF NOT EXISTS blob_journal (
    key TEXT PRIMARY KEY,
    since DOUBLE PRECISION NOT NULL
);
ALTER TABLE blob_journal ADD COLUMN IF NOT EXISTS front TEXT NOT NULL DEFAULT '';  -- the front that wrote it
-- what every write changed, in commit order (server/follow.py: how fronts keep their indexes current).
-- kind: 'add' (ids new to the collection), 'items' (ids replaced or deleted: re-read them),
-- 'collection' (created, deleted, re-created, its tokens or readers), 'codes' (every code: rekey, switch)
CREATE TABLE IF NOT EXISTS change_log (
    seq BIGSERIAL PRIMARY KEY,
    collection TEXT NOT NULL,
    kind TEXT NOT NULL,
    ids BIGINT[],
    at DOUBLE PRECISION NOT NULL
);
-- change_log is pruned (prune_changes); every change up to this one may be gone from it
CREATE TABLE IF NOT EXISTS change_floor (value BIGINT NOT NULL);
INSERT INTO change_floor SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM change_floor);
-- the fronts serving this store, each refreshing its row while it runs (dlheir status lists them)
CREATE TABLE IF NOT EXISTS fronts (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    applied BIGINT NOT NULL,
    seen DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS code_pages (
    collection TEXT NOT NULL REFERENCES collections(name),
    page BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (collection, page)
);
-- owner reindex: each item's code of another model, kept aside until one switch replaces them all
CREATE TABLE IF NOT EXISTS staged_codes (
    collection TEXT NOT NULL REFERENCES collections(name),
    fingerprint TEXT NOT NULL,
    id BIGINT NOT NULL,
    code BYTEA NOT NULL,
    PRIMARY KEY (collection, fingerprint, id)
);
"""


def describe(url: str) -> str:
    """``PostgreSQL at HOST:PORT/DB`` (never the password)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return f"PostgreSQL at {host}:{parts.port or 5432}{parts.path or ''}"


def open_postgres(data_dir: Path | str, url: str, blobs_url: str | None = None) -> "PostgresStore":
    """Connect, create or check the schema, check the object store: StoreUnusableError (one line
    naming the engine and the setting) when either cannot be used."""
    blobs = None
    if blobs_url:
        from dlheir.server.store.s3 import S3Blobs

        blobs = S3Blobs(blobs_url)
        blobs.check()
    return PostgresStore(url, Path(data_dir), blobs)


class PostgresStore:
    def __init__(self, url: str, data_dir: Path, blobs: "S3Blobs | None" = None) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url, self.where, self.blobs = url, describe(url), blobs
        self.path = Path(data_dir) / "store.postgresql"  # not a file: names the store; its parent is the data dir
        self.started = time.time()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list = []
        self._readers_lock = threading.Lock()
        self._writer = None
        # several fronts over one store (server/follow.py): the changes the open transaction logs, the
        # sequence numbers of this process's own committed changes (its index has them already), and
        # a session of its own holding this front's advisory lock (the blob-journal sweep of another
        # front's start leaves the journal of a front that holds it alone) and LISTENing for changes
        self._changes: list[tuple[str, str, list[int] | None]] = []
        self._own_changes: set[int] = set()
        self.front_id = secrets.token_hex(8)
        self._session = None
        self._feed = None
        try:
            with self._transaction(counts=False) as conn:
                conn.execute(SCHEMA)
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise StoreUnusableError(f"{self.where}: schema version {row[0]} is newer than this dlheir's "
                                             f"({SCHEMA_VERSION}): upgrade dlheir")
                elif row[0] < SCHEMA_VERSION:  # the tables above were added: an older dlheir must not write here
                    conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            self._hold_session()
        except StoreUnusableError:
            raise
        except StoreError as exc:
            raise StoreUnusableError(f"{exc} (--store)") from None

    # --- connections -----------------------------------------------------------------------
    def _connect(self, autocommit: bool):
        try:
            return self._psycopg.connect(self.url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S)
        except self._psycopg.Error as exc:
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> StoreError:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return StoreError(f"{self.where}: {text}")

    @contextmanager
    def _pg_errors(self):
        try:
            yield
        except (StoreError, CollectionGoneError):
            raise
        except self._psycopg.Error as exc:
            err = self._error(exc)
            log.error("%s", err)
            raise err from None

    def _reader(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._local.conn = self._connect(autocommit=True)
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _transaction(self, counts: bool = True):
        """One write transaction on the writer connection: all or nothing, durable on exit.
        ``counts``: it raises the write counter (index snapshots taken before are then stale);
        the schema's creation at start does not."""
        with self._lock, self._pg_errors():
            if self._writer is None or self._writer.closed or self._writer.broken:
                self._writer = self._connect(autocommit=False)
            conn = self._writer
            self._changes = []
            try:
                yield conn
                seqs = []
                if counts:
                    # any snapshot is now stale. This row's lock is held to the commit by every
                    # counted write of every front, so change_log's numbers below are taken in commit
                    # order: a front that has applied every change up to N has missed none before it
                    conn.execute("UPDATE generation SET value = value + 1")
                    for collection, kind, ids in self._changes:
                        seqs.append(conn.execute("INSERT INTO change_log (collection, kind, ids, at) VALUES "
                                                 "(%s, %s, %s, %s) RETURNING seq",
                                                 (collection, kind, ids, time.time())).fetchone()[0])
                    if seqs:
                        conn.execute(f"NOTIFY {CHANGES_CHANNEL}")  # delivered at the commit
                conn.commit()
                self._own_changes.update(seqs)
            except BaseException:
                if not conn.closed and not conn.broken:
                    conn.rollback()
                raise
            finally:
                self._changes = []

    @contextmanager
    def _read(self):
        """The writer connection, for reads that must see the writes serialised by the caller."""
        with self._lock, self._pg_errors():
            if self._writer is None or self._writer.closed or self._writer.broken:
                self._writer = self._connect(autocommit=False)
            try:
                yield self._writer
            finally:
                if not self._writer.closed and not self._writer.broken:
                    self._writer.rollback()  # end the read transaction

    def generation(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT value FROM generation").fetchone()[0])

    @property
    def integrity_check(self) -> None:
        return None  # PostgreSQL checks its own pages (and checksums, when the cluster has them)

    def verify(self) -> None:
        """At start, with an object store: sweep the orphans the blob journal names (objects of
        batches that never committed, of deletes whose objects were not all removed), those
        journaled before this start only. Its cost is the journal's size, not the store's."""
        if self.blobs is None:
            return
        with self._read() as conn:
            rows = conn.execute("SELECT key, front FROM blob_journal WHERE since < %s", (self.started,)).fetchall()
            # another front's keys only once it is gone (its session's advisory lock is free): a
            # running front's journal names objects of batches it is committing now
            fronts = {f for _, f in rows if f and f != self.front_id}
            gone = {f for f in fronts if self._front_gone(conn, f)}
        keys = [k for k, f in rows if not f or f in gone]
        prefixes = [k for k in keys if k.endswith("/")]
        objects = [k for k in keys if not k.endswith("/")]
        for prefix in prefixes:  # a deleted collection's objects
            objects += [k for k, _ in self.blobs.list(prefix)]
        if objects:
            self.blobs.delete_many(objects)
            log.info("%s: swept %d orphan object(s) named by the blob journal", self.blobs.where, len(objects))
        self._journal_remove(keys)

    @staticmethod
    def _front_gone(conn, front: str) -> bool:
        """Whether no session holds ``front``'s advisory lock (its process is gone)."""
        if conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (front,)).fetchone()[0]:
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (front,))
            return True
        return False

    def _hold_session(self) -> None:
        """(Re)open this front's own session: its advisory lock, LISTEN for changes."""
        if self._session is not None and not self._session.closed and not self._session.broken:
            return
        with self._pg_errors():
            conn = self._connect(autocommit=True)
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (self.front_id,))
            conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        self._session = conn

    def _journal_add(self, keys: list[str]) -> None:
        """Record keys before their objects may exist unnamed (committed on its own, durably)."""
        with self._transaction(counts=False) as conn:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO blob_journal (key, since, front) VALUES (%s, %s, %s) "
                                "ON CONFLICT (key) DO NOTHING", [(k, time.time(), self.front_id) for k in keys])

    def _journal_remove(self, keys: list[str]) -> None:
        """Forget keys whose objects are named by a row or gone (best effort: the sweep repeats it)."""
        if not keys:
            return
        try:
            with self._transaction(counts=False) as conn:
                conn.execute("DELETE FROM blob_journal WHERE key = ANY(%s)", (keys,))
        except StoreError as exc:
            log.warning("%s; the blob journal keeps %d key(s) for the next start's sweep", exc, len(keys))

    def close(self) -> None:
        for conn in (self._session, self._feed):
            if conn is not None:
                conn.close()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        if self.blobs is not None:
            self.blobs.close()

    # --- several fronts over one store: the change feed (server/follow.py reads it) -------------
    follows = True  # other processes may write here: a front follows change_log (the SQLite store: none)

    def _note(self, collection: str, kind: str, ids: list[int] | None = None) -> None:
        """Inside a write transaction: log a change (written at the commit, see _transaction)."""
        self._changes.append((collection, kind, [int(i) for i in ids] if ids is not None else None))

    def take_own(self, seqs: Iterable[int]) -> set[int]:
        """Which of ``seqs`` this process committed itself (forgotten here once asked about)."""
        with self._lock:
            own = self._own_changes.intersection(seqs)
            self._own_changes -= own
        return own

    def forget_own(self, upto: int) -> None:
        """Forget this process's own changes up to ``upto`` (a reload applied them all)."""
        with self._lock:
            self._own_changes = {s for s in self._own_changes if s > upto}

    def change_head(self) -> int:
        """The last change committed by any front (0: none yet)."""
        with self._pg_errors():
            return int(self._reader().execute(LAST_CHANGE).fetchone()[0])

    def wait_for_change(self, timeout: float) -> None:
        """Return when a change was committed (NOTIFY) or after ``timeout`` seconds."""
        self._hold_session()
        with self._pg_errors():
            for _ in self._session.notifies(timeout=timeout, stop_after=1):
                pass

    @contextmanager
    def change_snapshot(self) -> Iterator["ChangeSnapshot"]:
        """One read-only REPEATABLE READ snapshot of the store: the changes and the state they led to."""
        with self._pg_errors():
            if self._feed is None or self._feed.closed or self._feed.broken:
                self._feed = self._connect(autocommit=False)
            conn = self._feed
            try:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield ChangeSnapshot(self, conn)
            finally:
                if not conn.closed and not conn.broken:
                    conn.rollback()

    def register_front(self, address: str, host: str, pid: int, started: float, applied: int) -> None:
        """Refresh this front's row in ``fronts`` (``dlheir status`` lists them)."""
        with self._pg_errors():
            self._reader().execute(
                "INSERT INTO fronts VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "address = EXCLUDED.address, applied = EXCLUDED.applied, seen = EXCLUDED.seen",
                (self.front_id, address, host, pid, started, applied, time.time()))

    def prune_changes(self, keep_s: float) -> int:
        """Delete changes older than ``keep_s`` seconds that every front seen in the last minute has
        applied; a front further behind (stopped for longer, or paused) then reloads everything
        (``ChangeSnapshot.floor``). Returns how many were deleted."""
        now = time.time()
        with self._transaction(counts=False) as conn:
            (upto,) = conn.execute("SELECT MAX(seq) FROM change_log WHERE at < %s AND seq <= (SELECT COALESCE("
                                   "MIN(applied), 0) FROM fronts WHERE seen > %s)", (now - keep_s, now - 60)).fetchone()
            if upto is None:
                return 0
            conn.execute("UPDATE change_floor SET value = GREATEST(value, %s)", (upto,))
            return conn.execute("DELETE FROM change_log WHERE seq <= %s", (upto,)).rowcount

    def fronts(self, within_s: float = 3600.0) -> list[tuple[str, str, str, int, float, int, float]]:
        """(id, address, host, pid, started, applied, last seen) of fronts seen in the last ``within_s`` s."""
        with self._pg_errors():
            return self._reader().execute("SELECT id, address, host, pid, started, applied, seen FROM fronts "
                                          "WHERE seen > %s ORDER BY started", (time.time() - within_s,)).fetchall()

    # --- collections -------------------------------------------------------------------------
    def create_collection(self, name: str, bits: int, owner_hash: str, reader_hash: str,
                          private: bool = False, fingerprint: str = "", image_size: int = 0) -> str | None:
        uid = secrets.token_hex(16)
        with self._transaction() as conn:
            done = conn.execute("INSERT INTO collections (name, bits, owner_token_sha256, reader_token_sha256, "
                                "model_fingerprint, image_size, uid, private) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                                "ON CONFLICT (name) DO NOTHING",
                                (name, bits, owner_hash, reader_hash, fingerprint, image_size, uid, private)).rowcount
            if done:
                self._note(name, "collection")
        return uid if done else None

    def uids(self) -> dict[str, str]:
        with self._read() as conn:
            return dict(conn.execute("SELECT name, uid FROM collections").fetchall())

    def _check_uid(self, conn, collection: str, uid: str | None) -> None:
        if uid is None:
            return
        row = conn.execute("SELECT uid FROM collections WHERE name = %s FOR UPDATE", (collection,)).fetchone()
        if row is None or row[0] != uid:
            raise CollectionGoneError(f"collection {collection!r} was deleted"
                                      f"{'' if row is None else ' and re-created'} since this call started: "
                                      f"nothing was written")

    def delete_collection(self, name: str) -> bool:
        with self._transaction() as conn:
            row = conn.execute("SELECT uid FROM collections WHERE name = %s", (name,)).fetchone()
            for table in ("items", "staged_codes", "readers", "code_pages"):
                conn.execute(f"DELETE FROM {table} WHERE collection = %s", (name,))
            gone = conn.execute("DELETE FROM collections WHERE name = %s", (name,)).rowcount > 0
            if gone:
                self._note(name, "collection")
            prefix = self.blobs.collection_prefix(row[0]) if gone and row is not None and self.blobs else None
            if prefix:
                self._journal_in(conn, [prefix])
        if prefix:  # after the commit; a failure leaves the prefix journaled for the next start's sweep
            self.blobs.delete_many(k for k, _ in self.blobs.list(prefix))
            self._journal_remove([prefix])
        return gone

    def collections(self) -> list[tuple[str, int, str, str]]:
        with self._read() as conn:
            return conn.execute("SELECT name, bits, owner_token_sha256, reader_token_sha256 FROM collections").fetchall()

    def models(self) -> dict[str, tuple[str, int]]:
        with self._read() as conn:
            return {r[0]: (r[1], r[2]) for r in
                    conn.execute("SELECT name, model_fingerprint, image_size FROM collections")}

    # --- items ---------------------------------------------------------------------------------
    @staticmethod
    def _ids_in(conn, collection: str, ids: list[int]) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(ids), 10_000):
            rows = conn.execute(IDS_IN, (ids[start:start + 10_000], collection)).fetchall()
            found.update(r[0] for r in rows)
        return found

    def existing_ids(self, collection: str, ids: Iterable[int]) -> set[int]:
        with self._read() as conn:
            return self._ids_in(conn, collection, [int(i) for i in ids])

    def present_ids(self, collection: str, ids: Iterable[int]) -> set[int]:
        with self._pg_errors():
            return self._ids_in(self._reader(), collection, [int(i) for i in ids])

    def write_batch(self, collection: str, items: list[tuple[int, bytes, bytes, dict]], replace: bool,
                    uid: str | None = None) -> None:
        """All items or none, durable when this returns: with an object store, every blob is PUT
        first (fresh keys), then the rows commit (the module docstring says what a crash leaves)."""
        keys: list[str | None] = [None] * len(items)
        if self.blobs is not None:
            uid_now = uid or self.uids().get(collection, "")
            keys = [self.blobs.key(uid_now, i, secrets.token_hex(8)) for i, _, _, _ in items]
            self._journal_add(keys)  # before the PUTs: a crash after them leaves orphans the sweep finds
            self.blobs.put_many([(k, bytes(b)) for k, (_, _, b, _) in zip(keys, items)])
        rows = [(collection, int(i), bytes(c), None if k is not None else bytes(b), k, len(b),
                 json.dumps(m, sort_keys=True)) for (i, c, b, m), k in zip(items, keys)]
        replaced: list[str] = []
        try:
            with self._transaction() as conn:
                self._check_uid(conn, collection, uid)
                if self.blobs is not None:  # in this commit the new objects become named: out of the journal
                    conn.execute("DELETE FROM blob_journal WHERE key = ANY(%s)", (keys,))
                if replace and self.blobs is not None:
                    replaced = [r[0] for r in conn.execute(BLOB_KEYS_OF, ([r[1] for r in rows], collection))]
                    self._journal_in(conn, replaced)  # their old objects: deleted after the commit
                self._copy_rows(conn, rows, replace)
                self._note(collection, "items" if replace else "add", [r[1] for r in rows])
        except BaseException:
            if self.blobs is not None:  # nothing committed: the new objects are orphans now, not later
                self.blobs.delete_many(k for k in keys if k)
                self._journal_remove(keys)
            raise
        if replaced:
            self.blobs.delete_many(replaced)
            self._journal_remove(replaced)

    def _journal_in(self, conn, keys: list[str]) -> None:
        """Inside a write transaction: journal keys whose objects the commit leaves unnamed."""
        if keys:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO blob_journal (key, since, front) VALUES (%s, %s, %s) "
                                "ON CONFLICT (key) DO NOTHING", [(k, time.time(), self.front_id) for k in keys])

    # Upload batches go in by COPY into a per-connection staging table, then one INSERT ... SELECT in
    # id order: one round trip of rows and one statement instead of a statement per row (executemany);
    # the same transaction, so still all or nothing. The staging table is temporary (this session
    # only) and emptied at every commit or rollback.
    STAGING = ("CREATE TEMP TABLE IF NOT EXISTS items_staging (collection TEXT, id BIGINT, code BYTEA, blob BYTEA, "
               "blob_key TEXT, blob_size INTEGER, metadata TEXT) ON COMMIT DELETE ROWS")

    # Random 63-bit ids land all over the primary key's b-tree, as in the embedded store, but here
    # measured (existing_ids + write_batch, 10,000 random ids per batch, 16-byte blobs in PostgreSQL,
    # shared_buffers 32 MB) write_batch took 13/15/16/16/19/18 s per million for the 1st..6th million:
    # a slow rise, not SQLite's collapse. The small delta table merged in sorted passes that fixes
    # SQLite (server/store/sqlite.py) was slower here (17-24 s per million: every row written twice,
    # and every lookup made in two tables), so rows go straight into items.
    def _copy_rows(self, conn, rows: list[tuple], replace: bool) -> None:
        if replace:  # one statement may not update a row twice: the last item of an id wins, as row by row
            rows = list({r[1]: r for r in rows}.values())
        conn.execute(self.STAGING)
        with conn.cursor() as cur:
            with cur.copy("COPY items_staging (collection, id, code, blob, blob_key, blob_size, metadata) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "int8", "bytea", "bytea", "text", "int4", "text"])
                for row in rows:
                    copy.write_row(row)
            upsert = (" ON CONFLICT (collection, id) DO UPDATE SET code = EXCLUDED.code, blob = EXCLUDED.blob, "
                      "blob_key = EXCLUDED.blob_key, blob_size = EXCLUDED.blob_size, metadata = EXCLUDED.metadata, "
                      "change = EXCLUDED.change") if replace else ""
            cur.execute("INSERT INTO items (collection, id, code, blob, blob_key, blob_size, metadata, change) "
                        "SELECT collection, id, code, blob, blob_key, blob_size, metadata, nextval('item_changes') "
                        "FROM items_staging ORDER BY id" + upsert)

    def delete(self, collection: str, ids: list[int], uid: str | None = None) -> int:
        with self._transaction() as conn:
            self._check_uid(conn, collection, uid)
            rows = conn.execute("DELETE FROM items i USING unnest(%s::bigint[]) AS u(id) WHERE i.collection = %s "
                                "AND i.id = u.id RETURNING i.blob_key, i.id",  # a join, not ANY: see IDS_IN
                                (sorted({int(i) for i in ids}), collection)).fetchall()
            gone = [r[0] for r in rows if r[0]]
            if rows:
                self._note(collection, "items", [r[1] for r in rows])
            self._journal_in(conn, gone)
        if self.blobs is not None and gone:
            self.blobs.delete_many(gone)
            self._journal_remove(gone)
        return len(rows)

    def fetch(self, collection: str, ids: list[int]) -> Iterator[tuple[int, bytes, dict]]:
        """Blobs in the order asked; unknown ids are skipped. Read in windows of at most FETCH_WINDOW
        items and FETCH_WINDOW_BYTES (one query each, the object store's GETs in parallel), so that a
        page of results costs about one round trip, not one per item, and memory stays bounded."""
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), FETCH_WINDOW):
            window = ids[start:start + FETCH_WINDOW]
            with self._pg_errors():
                rows = {r[0]: r for r in self._reader().execute(
                    "SELECT id, blob_size, blob_key, metadata FROM items WHERE collection = %s AND id = ANY(%s)",
                    (collection, window))}
            batch: list[int] = []
            for item_id in window + [None]:  # None: the end of the window
                row = rows.get(item_id) if item_id is not None else None
                if item_id is not None and row is None:
                    continue
                if batch and (item_id is None or sum(rows[i][1] for i in batch) + row[1] > FETCH_WINDOW_BYTES):
                    yield from self._fetch_rows(collection, [rows[i] for i in batch])
                    batch = []
                if item_id is not None:
                    batch.append(item_id)

    def _fetch_rows(self, collection: str, rows: list[tuple]) -> Iterator[tuple[int, bytes, dict]]:
        """(id, blob, metadata) of rows (id, size, blob_key, metadata): inline blobs read in one query,
        the object store's in parallel."""
        keys = [r[2] for r in rows if r[2] is not None]
        if keys and self.blobs is None:
            raise StoreCorruptError(f"{self.where}: items of {collection!r} name objects ({keys[0]}, ...) but the "
                                    "server runs without --blobs")
        fetched = dict(zip(keys, self.blobs.get_many(keys))) if keys else {}
        inline_ids = [r[0] for r in rows if r[2] is None]
        inline = {}
        if inline_ids:
            with self._pg_errors():
                inline = dict(self._reader().execute("SELECT id, blob FROM items WHERE collection = %s AND id = ANY(%s)",
                                                     (collection, inline_ids)).fetchall())
        for r in rows:
            blob = fetched.get(r[2]) if r[2] is not None else inline.get(r[0])
            if blob is None:
                continue  # deleted between the two reads
            yield r[0], bytes(blob), json.loads(r[3])

    def codes(self, collection: str, chunk: int = 1_000_000) -> Iterator[tuple[np.ndarray, bytes]]:
        """(ids int64, concatenated codes) of every item with a code, ascending ids, in chunks,
        all from one snapshot (REPEATABLE READ), for rebuilding the index at start.

        One binary ``COPY`` of (id, code), in the order the rows lie on disk (a sequential
        scan, not the primary key's order: at 10M items an index-ordered read fetched each row's
        heap page at random, and the earlier per-chunk string_agg read took 23 s to SERVING after a
        crash), parsed with numpy as fixed-length records (every code of a collection has one
        length), then sorted by id in memory. Codes of two lengths raise StoreCorruptError."""
        with self._pg_errors():
            conn = self._connect(autocommit=False)
        try:
            with self._pg_errors():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield from self._copy_codes(conn, collection, chunk)
        finally:
            conn.close()

    def _copy_codes(self, conn, collection: str, chunk: int) -> Iterator[tuple[np.ndarray, bytes]]:
        """``codes()`` read in the transaction of ``conn``."""
        import numpy as np
        from psycopg import sql

        with self._pg_errors():
            query = sql.SQL("COPY (SELECT id, code FROM items WHERE collection = {} AND code <> ''::bytea) "
                            "TO STDOUT (FORMAT BINARY)").format(sql.Literal(collection))
            with conn.cursor() as cur, cur.copy(query) as copy:
                raw = b"".join(bytes(block) for block in copy)
            ids, codes = self._parse_copy(raw, collection)
            del raw
        if not len(ids):
            return
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        for at in range(0, len(ids), chunk):
            yield ids[at:at + chunk], codes[order[at:at + chunk]].tobytes()

    def _parse_copy(self, raw: bytes, collection: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, codes uint8 [n, width]) from a binary COPY of (id BIGINT, code BYTEA) rows."""
        import numpy as np

        header = 11 + 4 + 4  # signature, flags, header extension length (0)
        if len(raw) < header + 2 or raw[:11] != b"PGCOPY\n\xff\r\n\x00":
            raise StoreCorruptError(f"{self.where}: the codes of {collection!r}: not a binary COPY")
        header += int.from_bytes(raw[15:19], "big")
        body = memoryview(raw)[header:len(raw) - 2]  # the trailer: int16 -1
        if not len(body):
            return np.empty(0, np.int64), np.empty((0, 0), np.uint8)
        width = int.from_bytes(body[14:18], "big")  # the first row's code length
        row = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("code_len", ">i4"),
                        ("code", "u1", (width,))])
        if len(body) % row.itemsize:
            raise StoreCorruptError(f"{self.where}: the codes of {collection!r} read back with two lengths")
        rows = np.frombuffer(body, dtype=row)
        if (rows["fields"] != 2).any() or (rows["id_len"] != 8).any() or (rows["code_len"] != width).any():
            raise StoreCorruptError(f"{self.where}: the codes of {collection!r} read back with two lengths")
        return rows["id"].astype(np.int64), np.ascontiguousarray(rows["code"])

    def stats(self, collection: str) -> tuple[int, int]:
        with self._pg_errors():
            n, size = self._reader().execute("SELECT COUNT(*), COALESCE(SUM(blob_size), 0) FROM items "
                                             "WHERE collection = %s", (collection,)).fetchone()
        return int(n), int(size)

    # --- readers and key versions ----------------------------------------------------------
    def readers(self) -> list[tuple[str, str, str, float, float | None]]:
        with self._read() as conn:
            return conn.execute("SELECT collection, label, token_sha256, created, revoked FROM readers "
                                "ORDER BY collection, label").fetchall()

    def add_reader(self, collection: str, label: str, token_hash: str,
                   replace: bool) -> tuple[bool, str | None, float]:
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT token_sha256, revoked FROM readers WHERE collection = %s AND label = %s",
                               (collection, label)).fetchone()
            active = row[0] if row is not None and row[1] is None else None
            if active is not None and not replace:
                return False, active, 0.0
            conn.execute("INSERT INTO readers VALUES (%s, %s, %s, %s, NULL) ON CONFLICT (collection, label) DO UPDATE "
                         "SET token_sha256 = EXCLUDED.token_sha256, created = EXCLUDED.created, revoked = NULL",
                         (collection, label, token_hash, now))
            self._note(collection, "collection")
        return True, active, now

    def revoke_reader(self, collection: str, label: str) -> tuple[str, bool] | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT token_sha256, revoked FROM readers WHERE collection = %s AND label = %s",
                               (collection, label)).fetchone()
            if row is None:
                return None
            if row[1] is None:
                conn.execute("UPDATE readers SET revoked = %s WHERE collection = %s AND label = %s",
                             (time.time(), collection, label))
                self._note(collection, "collection")
        return row[0], row[1] is None

    def disable_shared_reader(self, collection: str) -> bool:
        with self._transaction() as conn:
            done = conn.execute("UPDATE collections SET reader_token_sha256 = '' WHERE name = %s "
                                "AND reader_token_sha256 != ''", (collection,)).rowcount > 0
            if done:
                self._note(collection, "collection")
        return done

    def key_ids(self) -> dict[str, int]:
        with self._read() as conn:
            return dict(conn.execute("SELECT name, key_id FROM collections WHERE key_id != 1").fetchall())

    def rekey_codes(self, collection: str, from_key: int, to_key: int,
                    transform: Callable[[list[bytes]], list[bytes]]) -> tuple[int, list[tuple[str, str]]] | None:
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute("SELECT key_id FROM collections WHERE name = %s FOR UPDATE", (collection,)).fetchone()
            if row is None or row[0] != from_key:
                return None
            rows = conn.execute("SELECT id, code FROM items WHERE collection = %s", (collection,)).fetchall()
            new_codes = transform([bytes(r[1]) for r in rows])  # every row read before any is written
            with conn.cursor() as cur:
                cur.executemany("UPDATE items SET code = %s, change = nextval('item_changes') "
                                "WHERE collection = %s AND id = %s",
                                [(c, collection, r[0]) for r, c in zip(rows, new_codes)])
            conn.execute("UPDATE collections SET key_id = %s, reader_token_sha256 = '' WHERE name = %s",
                         (to_key, collection))
            conn.execute("DELETE FROM staged_codes WHERE collection = %s", (collection,))  # under the old key
            revoked = conn.execute("UPDATE readers SET revoked = %s WHERE collection = %s AND revoked IS NULL "
                                   "RETURNING label, token_sha256", (now, collection)).fetchall()
            self._note(collection, "codes")
        return len(rows), [(label, h) for label, h in revoked]

    # --- re-hashing with another model (owner reindex): see the SQLite store's methods ---------
    def stage_codes(self, collection: str, fingerprint: str, ids: list[int], codes: list[bytes],
                    uid: str | None = None) -> int:
        with self._transaction(counts=False) as conn:
            self._check_uid(conn, collection, uid)
            if conn.execute("SELECT 1 FROM staged_codes WHERE collection = %s AND fingerprint <> %s LIMIT 1",
                            (collection, fingerprint)).fetchone():
                conn.execute("DELETE FROM staged_codes WHERE collection = %s AND fingerprint <> %s",
                             (collection, fingerprint))
            conn.execute("INSERT INTO staged_codes (collection, fingerprint, id, code) SELECT %s, %s, i, c "
                         "FROM unnest(%s::bigint[], %s::bytea[]) AS u(i, c) ON CONFLICT (collection, fingerprint, id) "
                         "DO UPDATE SET code = EXCLUDED.code",
                         (collection, fingerprint, [int(i) for i in ids], [bytes(c) for c in codes]))
        return len(ids)

    def unstaged_ids(self, collection: str, fingerprint: str, after: int, limit: int) -> tuple[list[int], int]:
        with self._pg_errors():
            conn = self._reader()
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM items t WHERE collection = %s AND id > %s AND NOT EXISTS (SELECT 1 FROM staged_codes s "
                "WHERE s.collection = t.collection AND s.fingerprint = %s AND s.id = t.id) ORDER BY id LIMIT %s",
                (collection, int(after), fingerprint, int(limit)))]
            staged = conn.execute("SELECT COUNT(*) FROM staged_codes WHERE collection = %s AND fingerprint = %s",
                                  (collection, fingerprint)).fetchone()[0] if after < 0 else 0
        return ids, int(staged)

    def switch_codes(self, collection: str, fingerprint: str, image_size: int, uid: str | None = None) -> int:
        try:
            return self._switch_codes(collection, fingerprint, image_size, uid)
        except NothingWritten as exc:
            return exc.result

    def _switch_codes(self, collection: str, fingerprint: str, image_size: int, uid: str | None) -> int:
        with self._transaction() as conn:
            self._check_uid(conn, collection, uid)
            conn.execute("SELECT 1 FROM collections WHERE name = %s FOR UPDATE", (collection,))
            (missing,) = conn.execute(
                "SELECT COUNT(*) FROM items t WHERE collection = %s AND NOT EXISTS (SELECT 1 FROM staged_codes s "
                "WHERE s.collection = t.collection AND s.fingerprint = %s AND s.id = t.id)",
                (collection, fingerprint)).fetchone()
            if missing:
                raise NothingWritten(int(missing))  # rolled back: nothing written, the write counter included
            conn.execute("UPDATE items t SET code = s.code, change = nextval('item_changes') FROM staged_codes s "
                         "WHERE t.collection = %s AND s.collection = t.collection AND s.fingerprint = %s AND s.id = t.id",
                         (collection, fingerprint))
            conn.execute("UPDATE collections SET model_fingerprint = %s, image_size = %s WHERE name = %s",
                         (fingerprint, int(image_size), collection))
            conn.execute("DELETE FROM staged_codes WHERE collection = %s", (collection,))
            self._note(collection, "codes")
        return 0

    # --- private-ranking mode: sealed code pages ---------------------------------------------
    def page_private_collections(self) -> set[str]:
        with self._read() as conn:
            return {r[0] for r in conn.execute("SELECT name FROM collections WHERE private")}

    def page_append(self, collection: str, page: int, data: bytes, uid: str | None = None) -> int | None:
        with self._transaction() as conn:
            self._check_uid(conn, collection, uid)
            (count,) = conn.execute("SELECT COUNT(*) FROM code_pages WHERE collection = %s", (collection,)).fetchone()
            if page != count:
                return None
            conn.execute("INSERT INTO code_pages VALUES (%s, %s, %s)", (collection, page, bytes(data)))
        return count + 1

    def page_stats(self, collection: str) -> tuple[int, int]:
        with self._pg_errors():
            n, size = self._reader().execute("SELECT COUNT(*), COALESCE(SUM(length(data)), 0) FROM code_pages "
                                             "WHERE collection = %s", (collection,)).fetchone()
        return int(n), int(size)

    def page_read(self, collection: str, from_page: int, to_page: int) -> Iterator[tuple[int, bytes]]:
        for page in range(from_page, to_page):
            with self._pg_errors():
                row = self._reader().execute("SELECT data FROM code_pages WHERE collection = %s AND page = %s",
                                             (collection, page)).fetchone()
            if row is None:
                raise StoreCorruptError(f"{self.where}: code page {page} of {collection!r} is missing")
            yield page, bytes(row[0])
            del row

    def page_item_count(self, collection: str) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items WHERE collection = %s", (collection,)).fetchone()[0])

    # --- migration only (dlheir.server.migrate): copy a whole store into another --------------
    def import_collection(self, name: str, uid: str, bits: int, owner_hash: str, reader_hash: str, private: bool,
                          fingerprint: str, image_size: int, key_id: int) -> bool:
        """For migration only: create collection ``name`` exactly as the source store has it (its
        ``uid``, token hashes, mode, model and key id of its codes), in one transaction. True when
        created; False when it is already here with the same ``uid`` (a resumed migration: its
        fields are set again); StoreError when a collection of that name with another uid is here."""
        with self._transaction() as conn:
            row = conn.execute("SELECT uid FROM collections WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is not None and row[0] != uid:
                raise StoreError(f"{self.where} already holds another collection named {name!r}")
            values = (bits, owner_hash, reader_hash, fingerprint, image_size, uid, private, key_id, name)
            if row is None:
                conn.execute("INSERT INTO collections (bits, owner_token_sha256, reader_token_sha256, model_fingerprint, "
                             "image_size, uid, private, key_id, name) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                             values)
            else:
                conn.execute("UPDATE collections SET bits = %s, owner_token_sha256 = %s, reader_token_sha256 = %s, "
                             "model_fingerprint = %s, image_size = %s, uid = %s, private = %s, key_id = %s "
                             "WHERE name = %s", values)
            self._note(name, "codes")
        return row is None

    def import_readers(self, collection: str, rows: list[tuple[str, str, float, float | None]]) -> None:
        """For migration only: set (label, token sha256, created, revoked or None) of each reader
        of ``collection`` exactly as given (replacing a label already here), in one transaction."""
        with self._transaction() as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO readers VALUES (%s, %s, %s, %s, %s) ON CONFLICT (collection, label) DO UPDATE "
                            "SET token_sha256 = EXCLUDED.token_sha256, created = EXCLUDED.created, "
                            "revoked = EXCLUDED.revoked",
                            [(collection, label, h, created, revoked) for label, h, created, revoked in rows])
            self._note(collection, "collection")

    def export_codes(self, collection: str, after: int | None, limit: int) -> list[tuple[int, bytes, int]]:
        """For migration only: (id, code, blob size) of up to ``limit`` items with ids above
        ``after`` (None: from the first), ascending; empty codes (private mode) included."""
        with self._pg_errors():
            if after is None:
                rows = self._reader().execute("SELECT id, code, blob_size FROM items WHERE collection = %s "
                                              "ORDER BY id LIMIT %s", (collection, limit)).fetchall()
            else:
                rows = self._reader().execute("SELECT id, code, blob_size FROM items WHERE collection = %s "
                                              "AND id > %s ORDER BY id LIMIT %s", (collection, after, limit)).fetchall()
        return [(int(r[0]), bytes(r[1]), int(r[2])) for r in rows]

    def export_blobs(self, collection: str, ids: list[int]) -> list[tuple[int, bytes, dict]]:
        """For migration only: (id, blob, metadata) of ``ids`` in that order (unknown ids skipped),
        read in one query, the object store's blobs fetched in parallel."""
        with self._pg_errors():
            rows = self._reader().execute("SELECT id, blob, blob_key, metadata FROM items WHERE collection = %s "
                                          "AND id = ANY(%s)", (collection, [int(i) for i in ids])).fetchall()
        by_id = {int(r[0]): r for r in rows}
        rows = [by_id[int(i)] for i in ids if int(i) in by_id]
        keys = [r[2] for r in rows if r[1] is None]
        if keys and self.blobs is None:
            raise StoreCorruptError(f"{self.where}: items of {collection!r} name objects but there is no --blobs")
        fetched = dict(zip(keys, self.blobs.get_many(keys))) if keys else {}  # GETs in parallel
        return [(int(r[0]), bytes(r[1]) if r[1] is not None else fetched[r[2]], json.loads(r[3])) for r in rows]


class ChangeSnapshot:
    """The store as of one snapshot, for a front catching up (``PostgresStore.change_snapshot``):
    the changes after a sequence number and the state they led to, nothing committed later."""

    def __init__(self, store: PostgresStore, conn) -> None:
        self.store, self.conn = store, conn

    def floor(self) -> int:
        """Changes up to this one may have been pruned from the log: a front that applied less reloads."""
        return int(self.conn.execute("SELECT value FROM change_floor").fetchone()[0])

    def head(self) -> int:
        return int(self.conn.execute(LAST_CHANGE).fetchone()[0])

    def collection_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM collections")]

    def changes_after(self, seq: int, limit: int = 10_000,
                      max_ids: int = 200_000) -> list[tuple[int, str, str, list[int] | None]]:
        """(seq, collection, kind, ids) of the changes after ``seq``, in commit order: at most
        ``limit`` of them and, past the first, no more than ``max_ids`` ids in all (a catch-up
        holds a bounded batch of ids in memory however far behind it is)."""
        return self.conn.execute(
            "SELECT seq, collection, kind, ids FROM (SELECT seq, collection, kind, ids, SUM(COALESCE(cardinality(ids), "
            "0)) OVER (ORDER BY seq) - COALESCE(cardinality(ids), 0) AS before FROM (SELECT * FROM change_log "
            "WHERE seq > %s ORDER BY seq LIMIT %s) AS next) AS counted WHERE before < %s ORDER BY seq",
            (seq, limit, max_ids)).fetchall()

    def item_codes(self, collection: str, ids: list[int]) -> tuple[list[int], list[bytes]]:
        """(ids, codes) of those of ``ids`` stored with a code, ascending."""
        rows = self.conn.execute(CODES_OF, (sorted(set(ids)), collection)).fetchall()
        return [int(r[0]) for r in rows], [bytes(r[1]) for r in rows]

    def collection(self, name: str) -> dict | None:
        """A collection's row (its fields by name) and its active readers {token sha256: label}."""
        row = self.conn.execute("SELECT bits, owner_token_sha256, reader_token_sha256, uid, private, model_fingerprint, "
                                "image_size, key_id FROM collections WHERE name = %s", (name,)).fetchone()
        if row is None:
            return None
        keys = ("bits", "owner_hash", "reader_hash", "uid", "private", "fingerprint", "image_size", "key_id")
        out = dict(zip(keys, row))
        out["readers"] = dict(self.conn.execute("SELECT token_sha256, label FROM readers WHERE collection = %s "
                                                "AND revoked IS NULL", (name,)).fetchall())
        return out

    def codes(self, collection: str, chunk: int = 1_000_000) -> Iterator[tuple[np.ndarray, bytes]]:
        return self.store._copy_codes(self.conn, collection, chunk)
