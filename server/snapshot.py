"""Index snapshots: restart without rebuilding a large index from the store.

At a clean shutdown (and after the index was built at start, in the background) each
collection's index is written to ``DATA_DIR/index/NAME.npz``: its arrays as they are
(``BinaryIndex.state()``: the sealed multi-index hash's tables, the flat part's ids and codes)
and the store's write counter (``Store.generation()``) at that moment. At start a snapshot is
used only when the store's counter still has that value, i.e. nothing was written since; a
snapshot that is stale (a crash after writes), unreadable or inconsistent is ignored (logged)
and the index is rebuilt from the store, which stays the source of truth.

Written under a temporary name, fsynced and renamed: a crash while writing leaves the old
snapshot or none, never half of one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from dlheir.server.index import BinaryIndex
from dlheir.server.store import fsync_path

log = logging.getLogger("dlheir.server.snapshot")

FOLDER = "index"


def snapshot_path(data_dir: Path | str, collection: str) -> Path:
    """Where a collection's snapshot lives (collection names are [A-Za-z0-9][A-Za-z0-9_.-]*)."""
    return Path(data_dir) / FOLDER / f"{collection}.npz"


def save(path: Path, generation: int, arrays: dict[str, np.ndarray]) -> float:
    """Write ``arrays`` (an index's ``state()``) and the store ``generation`` durably; returns seconds."""
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, generation=np.array(generation, dtype=np.int64), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)  # the rename itself is durable
    return time.perf_counter() - started


def load(path: Path, generation: int, bits: int, **index_kwargs) -> BinaryIndex | None:
    """The index saved at ``path`` if it was taken at store ``generation``, else None (logged)."""
    if not path.exists():
        return None
    started = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = int(z["generation"])
            if saved != generation:
                log.info("%s is stale (taken at store generation %d, the store is at %d): rebuilding from the store",
                         path, saved, generation)
                return None
            index = BinaryIndex.from_state({k: z[k] for k in z.files if k != "generation"}, bits, **index_kwargs)
    except Exception as exc:  # noqa: BLE001 - any damage means "rebuild from the store"
        log.warning("%s cannot be used (%s: %s): rebuilding from the store", path, type(exc).__name__, exc)
        return None
    log.info("%s: %d items (%s) loaded in %.2f s", path, len(index), index.kind, time.perf_counter() - started)
    return index


def clear_leftovers(data_dir: Path | str) -> None:
    """Temporary files of snapshots whose writing was cut short (a crash, a kill)."""
    for tmp in (Path(data_dir) / FOLDER).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def remove(data_dir: Path | str, collection: str) -> None:
    snapshot_path(data_dir, collection).unlink(missing_ok=True)
