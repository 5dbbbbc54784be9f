"""The durable store, the source of truth, behind one small protocol (:class:`StoreBackend`).

One module per backend: ``sqlite`` (the embedded default: one SQLite file in the data dir,
blobs inline) and ``postgres`` (collections, codes, pages and key ids in PostgreSQL; blobs in
PostgreSQL too, or in an S3-compatible object store, ``s3``). :func:`open_store` picks one from
the server's settings; the service does not know which it has.
"""

from __future__ import annotations

from pathlib import Path

from dlheir.server.store.base import (  # noqa: F401 (re-exported)
    CollectionGoneError, StoreBackend, StoreCorruptError, StoreError, StoreFullError, StoreUnusableError,
)
from dlheir.server.store.sqlite import MARKER, STORE_FILE, Store, open_store as open_sqlite  # noqa: F401


def open_store(data_dir: Path | str, integrity_check: bool = True, max_bytes: int | None = None,
               check_in_background: bool = False, store_url: str | None = None,
               blobs_url: str | None = None) -> StoreBackend:
    """The store for a server with ``data_dir``: the embedded SQLite store there (the default),
    or, with ``store_url`` (``postgresql://...``), PostgreSQL, with blobs in it or, with
    ``blobs_url`` (``s3://BUCKET?endpoint=URL``), in that object store."""
    if not store_url:
        if blobs_url:
            raise StoreUnusableError("--blobs needs --store postgresql://...: the embedded store keeps its blobs "
                                     "in its own file")
        return open_sqlite(data_dir, integrity_check=integrity_check, max_bytes=max_bytes,
                           check_in_background=check_in_background)
    from dlheir.server.store.postgres import open_postgres

    return open_postgres(data_dir, store_url, blobs_url)
