"""Exact Hamming top-k over a collection's codes with FAISS binary indexes.

* Codes are zero-padded inside the index to a length FAISS has a fast path for
  (48 bits -> 64); padding never changes a distance.
* The collection is split into shards (one per core by default), searched in parallel
  threads (FAISS releases the GIL) and merged: one query's work is spread over cores.
  A batch of queries is one FAISS call per shard.
* Results are exactly the top k by (distance, id), ties at the k-th distance broken by the
  smaller id: each shard is asked for a few more than k (``_shard_k``); a shard whose last
  returned distance still equals the k-th distance overall may hold more items at that
  distance, and for those (query, shard) pairs the full set at distance <= d_k is taken with
  a FAISS range search before the final (distance, id) sort.
* Large collections (``mih_min`` codes or more, codes of at most 64 bits, CPU, and where a
  timing on the collection's own codes shows it faster than the flat scan) are searched
  with multi-index hashing (``dlheir.server.mih``), exact by construction and sublinear: the
  items are "sealed" into an immutable multi-index hash, new items go to the flat shards
  (the delta), deletes mark sealed rows dead. When the delta passes ``RESEAL_FRACTION`` of
  the sealed part (or a quarter of it is dead) everything is sealed again: built from a
  snapshot outside the lock (searches go on), swapped in under it. Results are the union of
  both parts' exact top k, merged by (distance, id).
* Concurrency: a readers-writer lock (writer preferring). Searches share it and run
  concurrently; an upload batch / delete takes it exclusively only for the in-memory append
  or removal (the durable SQLite commit happens before, outside it), so a search never sees a
  half-applied batch and uploads wait for at most the searches already running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterable

import faiss
import numpy as np

from dlheir.contract import rank
from dlheir.server.mih import MultiIndexHash, to_uint64

log = logging.getLogger("dlheir.server.index")

FAST_BYTES = (8, 16, 32, 64)  # code sizes IndexBinaryFlat has specialised paths for
PARALLEL_MIN_WORK = 65536  # (codes x queries) below which a thread hand-off costs more than the scan it splits
MIH_MIN_ITEMS = 100_000  # from here on, multi-index hashing may beat the flat scan (bench search)
RESEAL_FRACTION = 0.1  # re-seal when the flat delta passes this share of the sealed part
# ... and at the end of an upload stream already from this share: a delta of 10% is a flat scan
# of 10% of the collection in every search (at 10M codes several times the hashing's cost)
UPLOAD_END_RESEAL_FRACTION = 0.01
STATE_FORMAT = 1  # of ``BinaryIndex.state()``
MERGE_BUDGET = 4_000_000  # candidates (distance + id: 12 bytes each) held at once by one search


def padded_bytes(code_len: int) -> int:
    """Bytes per code inside the index: the smallest FAISS fast-path size that holds ``code_len``."""
    return next((n for n in FAST_BYTES if n >= code_len), -(-code_len // 8) * 8)


def default_shards() -> int:
    """One shard per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_available() -> bool:
    """True only with a faiss build that has GPU support *and* a visible GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001 - a broken GPU runtime means "no GPU"
        return False


class faiss_threads:  # noqa: N801 - used like a function: ``with faiss_threads(1): ...``
    """FAISS's OpenMP threads for the calls made inside, in the calling thread only (OpenMP keeps
    the setting per thread), restored after: parallelism here comes from the shards, one FAISS
    call per shard and thread, and nothing else in the process is affected. (A class, not a
    generator context: it wraps every shard search.)"""

    __slots__ = ("n", "before")

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = faiss.omp_get_max_threads()
        if self.before != self.n:
            faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.before != self.n:
            faiss.omp_set_num_threads(self.before)


def _new_index(nbytes: int):
    index = faiss.IndexBinaryFlat(nbytes * 8)
    if gpu_available():  # faiss-gpu with a GPU (not on CPU-only hosts)
        index = faiss.index_binary_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Shard:
    """One IndexBinaryFlat plus the owner ids of its rows (row i of the index is ids[i])."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.index = _new_index(nbytes)
        self._ids = np.zeros(1024, dtype=np.int64)  # grows geometrically: appends are amortised O(batch)
        self.n = 0

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self.n]

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        if not len(ids):
            return
        if self.n + len(ids) > len(self._ids):
            grown = np.zeros(max(2 * len(self._ids), self.n + len(ids)), dtype=np.int64)
            grown[: self.n] = self.ids
            self._ids = grown
        self.index.add(codes)
        self._ids[self.n: self.n + len(ids)] = ids
        self.n += len(ids)

    def remove(self, ids: np.ndarray) -> int:
        rows = np.flatnonzero(np.isin(self.ids, ids))
        if not len(rows):
            return 0
        if gpu_available():  # GPU binary indexes cannot remove: rebuild from the kept codes
            codes = faiss.vector_to_array(faiss.index_binary_gpu_to_cpu(self.index).xb).reshape(-1, self.nbytes)
            keep = np.ones(self.n, bool)
            keep[rows] = False
            self.index = _new_index(self.nbytes)
            self.index.add(np.ascontiguousarray(codes[keep]))
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(rows.astype(np.int64)))  # keeps the order of the rest
        kept = np.delete(self.ids, rows)
        self._ids[: len(kept)] = kept
        self.n = len(kept)
        return len(rows)

    def codes(self) -> np.ndarray:
        """The padded codes [n, nbytes], in row order (a copy)."""
        index = faiss.index_binary_gpu_to_cpu(self.index) if gpu_available() else self.index
        return faiss.vector_to_array(index.xb).reshape(-1, self.nbytes)[: self.n]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances int32 [Q, min(k, n)], ids int64 [Q, min(k, n)]) sorted by distance."""
        k = min(k, self.n)
        if k == 0:
            return np.zeros((len(queries), 0), np.int32), np.zeros((len(queries), 0), np.int64)
        dist = np.empty((len(queries), k), dtype=np.int32)
        pos = np.empty((len(queries), k), dtype=np.int64)
        with faiss_threads(1):  # FAISS's own wrapper, minus its per-call checks (hot path)
            self.index.search_c(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(dist), faiss.swig_ptr(pos))
        return dist, self._ids[pos]  # every pos < n (k <= n): no -1 for a missing result

    def within(self, query: np.ndarray, max_dist: int) -> tuple[np.ndarray, np.ndarray]:
        """All items at distance <= max_dist from one query: (distances, ids)."""
        with faiss_threads(1):
            lims, dist, pos = self.index.range_search(query[None, :], max_dist + 1)  # binary radius is strict (<)
        return dist[lims[0]:lims[1]], self.ids[pos[lims[0]:lims[1]]]


def _shard_k(k: int) -> int:
    """Results asked of each shard: a margin above k makes a tie at the k-th distance that
    crosses the shard's last result rare (such ties then cost a range search); FAISS's scan
    costs the same for k+1 and 2k+16."""
    return 2 * k + 16


class BinaryIndex:
    """One collection's codes in ``n_shards`` FAISS ``IndexBinaryFlat`` shards."""

    def __init__(self, bits: int, n_shards: int | None = None, pool: ThreadPoolExecutor | None = None,
                 mih_min: int | None = None, choose: str = "auto") -> None:
        if choose not in ("auto", "flat", "mih"):
            raise ValueError(f"choose must be auto, flat or mih, got {choose!r}")
        self.bits = bits
        self.choose = choose  # auto: a timing on the collection's own codes; flat / mih: forced
        self.mih_min = MIH_MIN_ITEMS if mih_min is None else mih_min
        self.sealed: MultiIndexHash | None = None
        self._generation = 0  # bumped by every change
        # bumped by every removal (deletes, replaces): a seal built before one is dropped; one built
        # while only adds came keeps them as the new flat delta
        self._removals = 0
        self.seals = 0  # multi-index hash builds swapped in so far
        self._flat_until = 0  # a timing chose the flat scan: stay flat below this size
        self.choice: dict | None = None  # the last flat-vs-hashing timing (per query, ms)
        self.code_len = -(-bits // 8)
        self.nbytes = padded_bytes(self.code_len)
        self.shards = [_Shard(self.nbytes) for _ in range(max(1, n_shards or default_shards()))]
        self.pool = pool or ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard")
        self.lock = RWLock()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _pad(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1, self.code_len)
        if self.nbytes == self.code_len:
            return np.ascontiguousarray(codes)
        out = np.zeros((len(codes), self.nbytes), dtype=np.uint8)
        out[:, : self.code_len] = codes
        return out

    @property
    def kind(self) -> str:
        """Which index answers: 'flat' or 'mih+flat' (sealed multi-index hash plus flat delta)."""
        return "flat" if self.sealed is None else "mih+flat"

    def add(self, ids, codes, replace_ids=None, seal: bool = True) -> None:
        """Add one batch atomically (as seen by searches); ``replace_ids`` are removed first.
        ``seal=False`` skips the re-seal check (bulk loading calls ``maybe_seal()`` once at the end).
        Callers serialise writes (the service holds its write lock)."""
        ids = np.asarray(ids, dtype=np.int64)
        padded = self._pad(codes)  # outside the lock
        with self.lock.write():
            self._generation += 1
            if replace_ids is not None and len(replace_ids):
                self._remove(np.asarray(replace_ids, dtype=np.int64))
            # fill the smallest shards first so shards stay balanced; a small collection stays
            # in one shard (one FAISS call, no merge: splitting it would cost more than it saves)
            sizes = np.array([s.n for s in self.shards])
            if sizes.sum() + len(ids) <= PARALLEL_MIN_WORK:
                self.shards[int(np.argmax(sizes))].add(ids, padded)
            else:
                target = (sizes.sum() + len(ids)) / len(self.shards)
                start = 0
                for i in np.argsort(sizes, kind="stable"):
                    take = int(max(0, min(len(ids) - start, np.ceil(target - sizes[i]))))
                    if take:
                        self.shards[i].add(ids[start:start + take], padded[start:start + take])
                        start += take
                if start < len(ids):
                    self.shards[int(np.argmin(sizes))].add(ids[start:], padded[start:])
            self._n += len(ids)
        if seal:
            self.maybe_seal()

    def _remove(self, ids: np.ndarray) -> int:
        n = sum(shard.remove(ids) for shard in self.shards)
        if self.sealed is not None:
            n += self.sealed.remove(ids)
        self._n -= n
        self._generation += 1
        self._removals += 1
        return n

    def remove(self, ids) -> int:
        with self.lock.write():
            n = self._remove(np.asarray(ids, dtype=np.int64))
        self.maybe_seal()
        return n

    def load(self, chunks: Iterable[tuple[np.ndarray, bytes]]) -> None:
        """Fill an empty index from (ids, packed codes) chunks, e.g. ``Store.codes()``, then seal
        it when large: the hash is built from the arrays just read (ids already ascending: no
        sort by id), not from a copy read back out of the flat shards."""
        if len(self):
            raise ValueError("load() fills an empty index")
        ids_parts, code_parts = [], []
        for ids, codes in chunks:
            ids_parts.append(np.asarray(ids, dtype=np.int64))
            code_parts.append(codes)
        if not ids_parts:
            return
        ids = np.concatenate(ids_parts)
        codes = np.frombuffer(b"".join(code_parts), np.uint8)
        if len(codes) != len(ids) * self.code_len:
            raise ValueError(f"{len(ids)} ids but {len(codes)} bytes of codes ({self.code_len} bytes each expected)")
        codes = codes.reshape(-1, self.code_len)
        del ids_parts, code_parts
        self.add(ids, codes, seal=False)
        self.maybe_seal(_items=(ids, codes))

    def maybe_seal(self, fraction: float = RESEAL_FRACTION, _items: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """(Re)build the multi-index hash over every live item when the collection is large
        and the flat delta has passed ``fraction`` of the sealed part (or a quarter of that is
        dead); returns whether it did. A build from a state that changed meanwhile is dropped.
        ``_items`` (``load()`` only): (ids, codes) equal to the flat shards' whole content."""
        if self.choose == "flat" or self.bits > 64 or gpu_available() or self._n < max(self.mih_min, self._flat_until):
            return False
        delta = sum(s.n for s in self.shards)
        if self.sealed is not None:
            size = len(self.sealed.ids)
            if delta <= fraction * size and size - self.sealed.n_alive <= size // 4:
                return False
        with self.lock.read():  # snapshot; the build below runs without the lock
            generation, removals = self._generation, self._removals
            marks = [s.n for s in self.shards]  # rows a concurrent add appends come after these
            ids, codes64 = [], []  # the parts, as the build takes them: no byte-code round trip
            loaded = _items is not None and self.sealed is None and len(_items[0]) == self._n
            if loaded:
                ids, codes64 = [_items[0]], [to_uint64(_items[1])]
            else:
                if self.sealed is not None:
                    alive = self.sealed.alive
                    ids.append(self.sealed.ids[alive].astype(np.int64, copy=False))
                    codes64.append(self.sealed.codes[alive])
                flat_ids, flat_codes = self._flat_parts()
                ids += flat_ids
                codes64 += [to_uint64(c) for c in flat_codes]
                del flat_ids, flat_codes
        started = time.perf_counter()
        # the build empties the two lists once it has joined them: at the peak, beside the live
        # structure, only the new one and its sort's scratch arrays are held
        sealed = MultiIndexHash.from_parts(ids, codes64, self.bits)
        built_s = time.perf_counter() - started
        if self.sealed is None and self.choose == "auto" and not self._hashing_pays_off(sealed):
            self._flat_until = 2 * self._n  # keep the flat scan; ask again when the collection has doubled
            log.info("%d codes: kept the flat scan (%.2f ms per query vs %.2f ms with multi-index hashing); "
                     "next look at %d codes", self._n, self.choice["flat_ms"], self.choice["mih_ms"], self._flat_until)
            return False
        log.info("%d codes: multi-index hash (%s-bit substrings) built in %.1f s%s", len(sealed), sealed.lengths,
                 built_s, f" ({self.choice['mih_ms']:.2f} ms per query vs {self.choice['flat_ms']:.2f} ms flat)"
                 if self.choice and self.sealed is None else "")
        with self.lock.write():
            if removals != self._removals:  # a delete or replace meanwhile: built from a stale state
                return False
            shards = [_Shard(self.nbytes) for _ in self.shards]
            if generation != self._generation:  # only adds meanwhile: their rows stay in the flat delta
                for new, old, mark in zip(shards, self.shards, marks):
                    if old.n > mark:
                        new.add(old.ids[mark:].copy(), old.codes()[mark:])
            self.sealed = sealed
            self.shards = shards
            self.seals += 1
        return True

    def _flat_parts(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of the non-empty flat shards' ids and unpadded codes (callers hold the lock)."""
        shards = [s for s in self.shards if s.n]
        return [s.ids.copy() for s in shards], [s.codes()[:, : self.code_len] for s in shards]

    # --- snapshot (dlheir.server.snapshot) ------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Everything this index holds, as named arrays: the sealed multi-index hash's own arrays
        (``mih_*``) and the flat shards' ids and codes; one consistent view (read lock)."""
        with self.lock.read():
            out = {"index_meta": np.array([STATE_FORMAT, self.bits, self._n, self._flat_until], dtype=np.int64)}
            if self.sealed is not None:
                out.update({f"mih_{k}": v for k, v in self.sealed.arrays().items()})
            ids, codes = self._flat_parts()
        out["flat_ids"] = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        out["flat_codes"] = np.concatenate(codes) if codes else np.zeros((0, self.code_len), np.uint8)
        return out

    @classmethod
    def from_state(cls, arrays, bits: int, n_shards: int | None = None, pool: ThreadPoolExecutor | None = None,
                   mih_min: int | None = None, choose: str = "auto") -> "BinaryIndex":
        """The inverse of ``state()`` (no rebuild: the sealed arrays are used as they are);
        ValueError when the arrays are not a state of this format, code length and size."""
        fmt, state_bits, n, flat_until = (int(x) for x in arrays["index_meta"])
        if fmt != STATE_FORMAT or state_bits != bits:
            raise ValueError(f"index state of format {fmt} for {state_bits}-bit codes, expected {STATE_FORMAT} "
                             f"and {bits}")
        index = cls(bits, n_shards, pool, mih_min, choose)
        if "mih_meta" in arrays:
            index.sealed = MultiIndexHash.from_arrays({k[4:]: arrays[k] for k in arrays if k.startswith("mih_")})
        flat_ids = np.asarray(arrays["flat_ids"])
        index._n = 0 if index.sealed is None else index.sealed.n_alive
        index.add(flat_ids, np.asarray(arrays["flat_codes"]), seal=False)
        if len(index) != n:
            raise ValueError(f"index state holds {len(index)} items, its header says {n}")
        index._flat_until = flat_until
        return index

    def _hashing_pays_off(self, sealed: MultiIndexHash, k: int = 20, n_queries: int = 16) -> bool:
        """Whether multi-index hashing answers this collection's own codes (as queries: real
        queries look like stored items) faster than the flat shards. Hash-bucket methods suffer
        when codes are spread out (far k-th neighbours); learned codes cluster and gain most.
        The index chooses per collection, from a timing on its own data."""
        rows = np.random.default_rng(0).choice(len(sealed.ids), min(n_queries, len(sealed.ids)), replace=False)
        queries = sealed.codes_bytes(rows, self.code_len)
        kk = _shard_k(k)
        with self.lock.read():
            t0 = time.perf_counter()
            for q in queries:
                self._search_flat(self._pad(q[None]), k, kk, None)
            flat_s = time.perf_counter() - t0
        sealed.search_one(queries[0], k)  # untimed: the first call may compile the search (numba)
        t0 = time.perf_counter()
        for q in queries:
            sealed.search_one(q, k)
        hashing_s = time.perf_counter() - t0
        self.choice = {"size": self._n, "flat_ms": 1e3 * flat_s / len(queries),
                       "mih_ms": 1e3 * hashing_s / len(queries)}
        return hashing_s < flat_s

    def _search_shards(self, q: np.ndarray, kk: int) -> tuple[list["_Shard"], list[tuple[np.ndarray, np.ndarray]]]:
        """The non-empty shards and each one's (distances, ids) for ``q``."""
        shards = [s for s in self.shards if s.n]
        if len(shards) <= 1 or sum(s.n for s in shards) * len(q) < PARALLEL_MIN_WORK:  # the flat part's size
            return shards, [s.search(q, kk) for s in shards]
        futures = [self.pool.submit(s.search, q, kk) for s in shards[1:]]
        first = shards[0].search(q, kk)  # the calling thread takes one shard itself
        return shards, [first, *(f.result() for f in futures)]

    def search(self, queries: np.ndarray, k: int, max_distance: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (ids int64, distances uint32) of the exact top k by (distance, id),
        then dropping those farther than ``max_distance``.

        Queries are searched in chunks so that the candidates held at once (chunk x shards x
        the per-shard k) stay under MERGE_BUDGET, whatever the request's size."""
        q = self._pad(queries)
        kk = _shard_k(k)
        chunk = max(1, MERGE_BUDGET // (kk * len(self.shards)))
        with self.lock.read():  # one snapshot for the whole request
            if len(q) <= chunk:
                return self._search_chunk(q, k, kk, max_distance)
            results = []
            for start in range(0, len(q), chunk):
                results += self._search_chunk(q[start:start + chunk], k, kk, max_distance)
        return results

    def _search_chunk(self, q: np.ndarray, k: int, kk: int, max_distance: int | None):
        if self.sealed is None:
            return self._search_flat(q, k, kk, max_distance)
        sealed_ids, sealed_d = self._search_sealed(q, k)
        if any(s.n for s in self.shards):  # a flat delta beside the sealed part: merge each query's two top k
            results = []
            for (fi, fd), si, sd in zip(self._search_flat(q, k, kk, max_distance), sealed_ids, sealed_d):
                ids, d = np.concatenate([fi, si]), np.concatenate([fd.astype(np.int64), sd])
                top = rank(d, ids)[:k]
                results.append((ids[top], d[top].astype(np.uint32)))
        else:  # the sealed part's top k is the answer
            results = list(zip(sealed_ids, sealed_d.astype(np.uint32)))
        if max_distance is None:
            return results
        return [(ids[d <= max_distance], d[d <= max_distance]) for ids, d in results]

    def _search_sealed(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The sealed part's exact top k of each query: (ids [Q, k'], distances [Q, k']). The
        compiled search runs without the GIL: a batch is split over the pool's threads."""
        search = self.sealed.search
        if len(q) < 2 * len(self.shards):
            return search(q, k)
        groups = np.array_split(np.arange(len(q)), len(self.shards))
        futures = [self.pool.submit(search, q[g], k) for g in groups[1:]]
        parts = [search(q[groups[0]], k), *(f.result() for f in futures)]
        return np.concatenate([i for i, _ in parts]), np.concatenate([d for _, d in parts])

    def _search_flat(self, q: np.ndarray, k: int, kk: int, max_distance: int | None):
        nq = len(q)
        shards, parts = self._search_shards(q, kk)
        if not parts:
            return [(np.zeros(0, np.int64), np.zeros(0, np.uint32)) for _ in range(nq)]
        if len(parts) == 1:  # one shard (every small collection): nothing to merge
            dist, ids = parts[0]
        else:
            dist = np.concatenate([d for d, _ in parts], axis=1)
            ids = np.concatenate([i for _, i in parts], axis=1)
        if nq == 1:  # one query (the latency path): 1-D arrays, half the numpy calls of the batch path
            d, i = dist[0], ids[0]
            order = rank(d, i)[:k]
            top_d = d[order]
            top = (i[order], top_d.astype(np.uint32))
            if len(d) > k:
                b = int(top_d[k - 1]) if max_distance is None else min(int(top_d[k - 1]), max_distance)
                if any(kk < s.n and sd[0, -1] <= b for s, (sd, _) in zip(shards, parts)):
                    top = self._boundary(q[0], 0, b, k, kk, shards, parts)
            if max_distance is not None and len(top[1]) and top[1][-1] > max_distance:
                keep = top[1] <= max_distance
                top = (top[0][keep], top[1][keep])
            return [top]
        rows = np.arange(nq)[:, None]
        order = rank(dist, ids)[:, :k]
        top_d, top_i = dist[rows, order], ids[rows, order]
        # the answer for each query, row by row: views of two [Q, k] arrays made for it
        results = list(zip(top_i, top_d.astype(np.uint32)))
        if dist.shape[1] > k:  # else every shard returned everything it holds
            kth = top_d[:, k - 1]  # the k-th distance of each query
            if max_distance is not None:
                kth = np.minimum(kth, max_distance)
            # shards that returned all they were asked for, and whose last distance is still
            # <= the boundary, may hold more items at the boundary distance
            reopen = None
            for s, (sd, _) in zip(shards, parts):
                if kk < s.n:
                    at_boundary = sd[:, -1] <= kth
                    reopen = at_boundary if reopen is None else reopen | at_boundary
            if reopen is not None and reopen.any():
                for qi in np.flatnonzero(reopen):
                    results[qi] = self._boundary(q[qi], qi, int(kth[qi]), k, kk, shards, parts)
        if max_distance is not None:
            results = [(i, d) if not len(d) or d[-1] <= max_distance else (i[d <= max_distance], d[d <= max_distance])
                       for i, d in results]
        return results

    @staticmethod
    def _boundary(query: np.ndarray, qi: int, b: int, k: int, kk: int, shards: list["_Shard"],
                  parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Query ``qi``'s exact top k when some shard may hold more items at the boundary
        distance ``b`` than it returned: every item at distance <= b from those shards (a range
        search), with the other shards' returned ones, sorted by (distance, id)."""
        cand_d, cand_i = [], []
        for s, (sd, si) in zip(shards, parts):
            if kk < s.n and sd[qi, -1] <= b:
                rd, ri = s.within(query, b)
            else:
                keep = sd[qi] <= b
                rd, ri = sd[qi][keep], si[qi][keep]
            cand_d.append(rd)
            cand_i.append(ri)
        cd, ci = np.concatenate(cand_d), np.concatenate(cand_i)
        o = rank(cd, ci)[:k]
        return ci[o], cd[o].astype(np.uint32)
