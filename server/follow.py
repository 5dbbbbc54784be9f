"""Several fronts over one store: how a front keeps its in-memory state current.

Every write to a shared store (PostgreSQL: ``server/store/postgres.py``) logs what it changed in
``change_log``, numbered in commit order, and NOTIFYs the fronts. Each front's :class:`Follower`
wakes on that (or polls every ``poll_s`` when a notification was lost), reads the changes after
the last one it applied *and* the state they led to from one snapshot, and applies them under
the service's write lock: the ids of an entry are re-read (present with a code: (re)indexed;
absent: removed), a collection entry reloads the collection's row and readers (a new or
re-created one, and every rekey or model switch, rebuilds its index from the snapshot). Applying
the state of the snapshot, not the entries' contents, makes a change applied twice harmless; the
front's own writes (already in its index) are recognised by their sequence numbers and only
re-read when another front's change in the same catch-up touched the same ids.

**The consistency rule** (``catch_up``, run before every authenticated call): a call on any front
sees every write acknowledged, by any front, before it started. The front reads the store's last
change number (one indexed query) and, if it has not applied that far yet, waits for its follower,
up to ``wait_s`` seconds, then answers UNAVAILABLE. ``wait_s=0`` turns the wait off (a front may
then lag by up to the poll interval).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from dlheir.server.store.base import StoreError

if TYPE_CHECKING:
    from dlheir.server.service import CloudStoreService

log = logging.getLogger("dlheir.server.follow")
BATCH = 10_000  # changes applied per snapshot
KEEP_CHANGES_S = 3600  # changes older than this that every running front has applied are pruned
PRUNE_EVERY_S = 60.0


class Follower:
    def __init__(self, service: "CloudStoreService", applied: int, poll_s: float = 0.5, wait_s: float = 5.0) -> None:
        self.service, self.store = service, service.store
        self.applied = applied  # every change up to this one is in this front's state
        self.poll_s, self.wait_s = poll_s, wait_s
        self.address = ""  # set once the server is bound (the fronts table shows it)
        self.started = time.time()
        self.errors = 0  # store errors met while following (metrics)
        self._cond = threading.Condition()
        # _head_since_call: queries of the store's last change started, the last one done and its value
        self._head_cond = threading.Condition()
        self._head_started = self._head_done = self._head_value = 0
        self._head_running = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered, self._registered_applied = 0.0, -1
        self._pruned = time.monotonic()
        # changes up to this one may already be in the state loaded at start (read after ``applied``):
        # their ids are re-read, never taken as new
        self.loaded_until = applied

    # --- the follower thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="follow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                while self.apply_pending():
                    pass
                self._register()
                self.prune()
                if failing:
                    log.info("following the store's changes again (applied up to %d)", self.applied)
                failing = False
                self.store.wait_for_change(self.poll_s)
            except StoreError as exc:  # the store is down: calls answer UNAVAILABLE meanwhile; retry
                self.errors += 1
                if not failing:
                    log.warning("cannot follow the store's changes: %s (retrying)", exc)
                failing = True
                self._stop.wait(min(1.0, self.poll_s * 2))
            except Exception:  # noqa: BLE001 - log and keep following: a front that stops following serves stale
                self.errors += 1
                log.exception("applying the store's changes failed (retrying)")
                self._stop.wait(1.0)

    def set_address(self, address: str) -> None:
        """Where this front listens, once bound: recorded in the fronts table at once."""
        self.address = address
        try:
            self.store.register_front(address, socket.gethostname(), os.getpid(), self.started, self.applied)
        except StoreError as exc:  # the follower thread records it once the store answers
            log.warning("cannot record this front in the store: %s", exc)

    def _register(self) -> None:
        """Refresh this front's row in the fronts table: at once when it applied more, else each second."""
        now = time.monotonic()
        if now - self._registered >= 1.0 or self.applied != self._registered_applied:
            applied = self.applied
            self.store.register_front(self.address, socket.gethostname(), os.getpid(), self.started, applied)
            self._registered, self._registered_applied = now, applied

    def apply_pending(self) -> bool:
        """Apply the next changes (at most BATCH); whether there were any."""
        service = self.service
        touched = []
        with service.write_lock, self.store.change_snapshot() as snap:
            if self.applied < snap.floor():  # changes it has not applied were pruned: reload everything
                return self._reload_all(snap)
            entries = snap.changes_after(self.applied, BATCH)
            if not entries:
                return False
            own = self.store.take_own(e[0] for e in entries)
            foreign = [e for e in entries if e[0] not in own]
            whole = {e[1] for e in foreign if e[2] in ("collection", "codes")}
            for name in sorted(whole):
                service.sync_collection(name, snap.collection(name),
                                        rebuild=any(e[1] == name and e[2] == "codes" for e in foreign), snap=snap)
            by_name: dict[str, list] = {}
            for e in entries:
                if e[2] in ("add", "items") and e[1] not in whole:
                    by_name.setdefault(e[1], []).append(e)
            for name, group in by_name.items():
                col = self._apply_items(name, group, own, snap)
                if col is not None:
                    touched.append(col)
            with self._cond:
                self.applied = entries[-1][0]
                self._cond.notify_all()
        for col in touched:  # as after an upload: fold a large flat delta, outside the write lock; no
            service._reseal(col, snapshot=False)  # snapshot (most would be stale at once): the clean stop's
        return True

    def _reload_all(self, snap) -> bool:
        """Every collection from the snapshot, indexes rebuilt (under the write lock), as at a start."""
        floor, last = snap.floor(), snap.head()
        names = set(snap.collection_names()) | set(self.service.collections)
        log.warning("this front applied the store's changes up to %d, but changes up to %d were pruned from the "
                    "log meanwhile: reloading every collection (%d)", self.applied, floor, len(names))
        for name in sorted(names):
            self.service.sync_collection(name, snap.collection(name), rebuild=True, snap=snap)
        self.store.forget_own(last)
        with self._cond:
            self.applied = max(last, floor)
            self._cond.notify_all()
        return True

    def prune(self) -> None:
        """Prune the shared change log now and then (any front may; each does it about once a minute)."""
        now = time.monotonic()
        if now - self._pruned >= PRUNE_EVERY_S:
            self._pruned = now
            n = self.store.prune_changes(KEEP_CHANGES_S)
            if n:
                log.info("pruned %d change(s) older than %d s from the store's change log", n, KEEP_CHANGES_S)

    def _apply_items(self, name: str, group: list, own: set[int], snap):
        """Bring the index of collection ``name`` to the snapshot's state for the ids of ``group``."""
        col = self.service.collections.get(name)
        if col is None or col.private or not any(e[0] not in own for e in group):
            return None
        seen = Counter(i for e in group for i in (e[3] or ()))
        new, again = [], set()
        for seq, _, kind, ids in group:
            if seq in own:
                continue
            for i in ids or ():
                # an id new to the collection (an 'add') and in no other change here is not in the
                # index yet; any other is re-read: removed from the index, added back if present
                (new.append(i) if kind == "add" and seen[i] == 1 and seq > self.loaded_until else again.add(i))
        present, codes = snap.item_codes(name, new + sorted(again))
        if present:
            col.index.add(np.array(present, dtype=np.int64), np.frombuffer(b"".join(codes), np.uint8),
                          replace_ids=sorted(again) if again else None, seal=False)
        elif again:
            col.index.remove(sorted(again))
        col.writes += 1
        return col

    # --- the consistency rule --------------------------------------------------------------------
    def catch_up(self) -> str | None:
        """None once this front has applied every change committed before now; else why not
        (the store unreachable, or not caught up within ``wait_s``): the call answers UNAVAILABLE."""
        if self.wait_s <= 0:
            return None
        try:
            head = self._head_since_call()
        except StoreError as exc:
            return str(exc)
        if head <= self.applied:
            return None
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.applied < head:
                left = deadline - time.monotonic()
                if left <= 0:
                    return (f"this server has applied the shared store's changes up to {self.applied}, not yet "
                            f"{head}, after waiting {self.wait_s:g} s: retry (another front may answer)")
                self._cond.wait(left)
        return None

    def _head_since_call(self) -> int:
        """The store's last change, read by a query that began after this call did. Calls that
        arrive together share one query (each waits for the first one started after it arrived),
        so a busy front asks the store about once per round trip, not once per call."""
        with self._head_cond:
            need = self._head_started + 1  # a query running now began before this call: not that one
            while self._head_done < need:
                if self._head_running:
                    self._head_cond.wait()
                    continue
                self._head_started += 1
                number, self._head_running = self._head_started, True
                self._head_cond.release()
                try:
                    value = self.store.change_head()
                finally:
                    self._head_cond.acquire()
                    self._head_running = False
                    self._head_cond.notify_all()
                self._head_done, self._head_value = number, value
            return self._head_value

    def lag(self) -> int:
        """Changes committed to the store that this front has not applied yet (-1: store unreachable)."""
        try:
            return max(0, self.store.change_head() - self.applied)
        except StoreError:
            return -1
