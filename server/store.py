"""The durable store, the source of truth: SQLite in WAL mode with synchronous=FULL.

Each item is ONE row (id, code, encrypted blob, metadata), so an item is never half
present; an upload batch is one transaction, acknowledged only after its commit
returns. The FAISS index is rebuilt from here at start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    bits INTEGER NOT NULL,
    owner_token_sha256 TEXT NOT NULL,
    reader_token_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL REFERENCES collections(name),
    id INTEGER NOT NULL,
    code BLOB NOT NULL,
    blob BLOB NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;
"""


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one writer; sqlite3 connections are not thread-safe
        self._conn = self._connect()
        self._conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def create_collection(self, name: str, bits: int, owner_hash: str, reader_hash: str) -> bool:
        with self._lock:
            try:
                self._conn.execute("INSERT INTO collections VALUES (?, ?, ?, ?)", (name, bits, owner_hash, reader_hash))
            except sqlite3.IntegrityError:
                return False
        return True

    def collections(self) -> list[tuple[str, int, str, str]]:
        with self._lock:
            return self._conn.execute("SELECT name, bits, owner_token_sha256, reader_token_sha256 FROM collections").fetchall()

    def existing_ids(self, collection: str, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        found: set[int] = set()
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = self._conn.execute(
                    f"SELECT id FROM items WHERE collection = ? AND id IN ({','.join('?' * len(chunk))})",
                    (collection, *chunk)).fetchall()
                found.update(r[0] for r in rows)
        return found

    def write_batch(self, collection: str, items: list[tuple[int, bytes, bytes, dict]], replace: bool) -> None:
        """All items or none, durable when this returns."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        rows = [(collection, i, c, b, json.dumps(m, sort_keys=True)) for i, c, b, m in items]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(f"{verb} INTO items VALUES (?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def delete(self, collection: str, ids: list[int]) -> int:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    n += self._conn.execute(
                        f"DELETE FROM items WHERE collection = ? AND id IN ({','.join('?' * len(chunk))})",
                        (collection, *chunk)).rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return n

    def fetch(self, collection: str, ids: list[int]) -> Iterator[tuple[int, bytes, dict]]:
        """Blobs in the order asked; unknown ids are skipped."""
        for item_id in ids:
            with self._lock:
                row = self._conn.execute("SELECT blob, metadata FROM items WHERE collection = ? AND id = ?",
                                         (collection, item_id)).fetchone()
            if row is not None:
                yield item_id, row[0], json.loads(row[1])

    def codes(self, collection: str) -> tuple[list[int], list[bytes]]:
        with self._lock:
            rows = self._conn.execute("SELECT id, code FROM items WHERE collection = ? ORDER BY id", (collection,)).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def stats(self, collection: str) -> tuple[int, int]:
        with self._lock:
            n, size = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(blob)), 0) FROM items WHERE collection = ?",
                                         (collection,)).fetchone()
        return n, size

    def close(self) -> None:
        with self._lock:
            self._conn.close()
