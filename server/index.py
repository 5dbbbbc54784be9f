"""Exact Hamming top-k over a collection's codes with FAISS binary indexes.

* Codes are zero-padded inside the index to a length FAISS has a fast path for
  (48 bits -> 64); padding never changes a distance.
* The collection is split into shards (one per core by default), searched in parallel
  threads (FAISS releases the GIL) and merged: one query's work is spread over cores.
  A batch of queries is one FAISS call per shard.
* Results are exactly the top k by (distance, id), ties at the k-th distance included:
  each shard is asked for k+1; where a shard's (k+1)-th distance still equals the k-th
  overall, that shard's full tie set is taken with a range search.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

FAST_BYTES = (8, 16, 32, 64)  # code sizes IndexBinaryFlat has specialised paths for
PARALLEL_MIN_CODES = 65536  # below this a thread hand-off costs more than the scan it splits


def padded_bytes(code_len: int) -> int:
    return next((n for n in FAST_BYTES if n >= code_len), -(-code_len // 8) * 8)


def _new_index(nbytes: int):
    index = faiss.IndexBinaryFlat(nbytes * 8)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # faiss-gpu with a GPU
        index = faiss.index_binary_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


class _Shard:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.index = _new_index(nbytes)
        self.ids = np.zeros(0, dtype=np.int64)
        self.codes = np.zeros((0, nbytes), dtype=np.uint8)

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        self.index.add(codes)
        self.ids = np.concatenate([self.ids, ids])
        self.codes = np.concatenate([self.codes, codes])

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, ids)
        if keep.all():
            return
        self.ids, self.codes = self.ids[keep], self.codes[keep]
        self.index = _new_index(self.nbytes)
        if len(self.ids):
            self.index.add(self.codes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.ids))
        if k == 0:
            return np.zeros((len(queries), 0), np.int32), np.zeros((len(queries), 0), np.int64)
        dist, pos = self.index.search(queries, k)
        return dist, self.ids[pos]

    def within(self, query: np.ndarray, max_dist: int) -> tuple[np.ndarray, np.ndarray]:
        """All items at distance <= max_dist from one query."""
        lims, dist, pos = self.index.range_search(query[None, :], max_dist + 1)
        return dist[lims[0]:lims[1]], self.ids[pos[lims[0]:lims[1]]]


class BinaryIndex:
    """One collection's codes in ``n_shards`` FAISS ``IndexBinaryFlat`` shards."""

    def __init__(self, bits: int, n_shards: int | None = None, pool: ThreadPoolExecutor | None = None) -> None:
        self.bits = bits
        self.code_len = -(-bits // 8)
        self.nbytes = padded_bytes(self.code_len)
        self.shards = [_Shard(self.nbytes) for _ in range(n_shards or os.cpu_count() or 1)]
        self.pool = pool or ThreadPoolExecutor(len(self.shards))
        self.lock = threading.Lock()  # a search never sees a half-applied batch

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self.shards)

    def _pad(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1, self.code_len)
        if self.nbytes == self.code_len:
            return np.ascontiguousarray(codes)
        out = np.zeros((len(codes), self.nbytes), dtype=np.uint8)
        out[:, : self.code_len] = codes
        return out

    def add(self, ids, codes, replace_ids=None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        padded = self._pad(codes)
        with self.lock:
            if replace_ids is not None and len(replace_ids):
                for shard in self.shards:
                    shard.remove(np.asarray(replace_ids, dtype=np.int64))
            # spread the batch so shards stay balanced
            sizes = np.array([len(s.ids) for s in self.shards])
            target = (sizes.sum() + len(ids)) / len(self.shards)
            start = 0
            for shard, size in sorted(zip(self.shards, sizes), key=lambda t: t[1]):
                take = int(max(0, min(len(ids) - start, np.ceil(target - size))))
                if take:
                    shard.add(ids[start:start + take], padded[start:start + take])
                    start += take
            if start < len(ids):
                self.shards[0].add(ids[start:], padded[start:])

    def remove(self, ids) -> None:
        with self.lock:
            for shard in self.shards:
                shard.remove(np.asarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int, max_distance: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (ids, distances) of the exact top k by (distance, id)."""
        q = self._pad(queries)
        with self.lock:
            if len(self) < PARALLEL_MIN_CODES:
                parts = [s.search(q, k + 1) for s in self.shards]
            else:
                parts = list(self.pool.map(lambda s: s.search(q, k + 1), self.shards))
            results = []
            for qi in range(len(q)):
                dist = np.concatenate([d[qi] for d, _ in parts])
                ids = np.concatenate([i[qi] for _, i in parts])
                order = np.lexsort((ids, dist))
                dist, ids = dist[order], ids[order]
                if len(dist) > k:
                    kth = dist[k - 1]
                    # a shard that returned k+1 results ending at the k-th distance may hold more ties
                    extra = [s for s, (d, _) in zip(self.shards, parts) if d.shape[1] == k + 1 and d[qi, -1] <= kth]
                    if extra:
                        keep = dist < kth
                        ties = [s.within(q[qi], int(kth)) for s in self.shards]
                        dist = np.concatenate([dist[keep], *[d[d == kth] for d, _ in ties]])
                        ids = np.concatenate([ids[keep], *[i[d == kth] for d, i in ties]])
                        order = np.lexsort((ids, dist))
                        dist, ids = dist[order], ids[order]
                dist, ids = dist[:k], ids[:k]
                if max_distance is not None:
                    keep = dist <= max_distance
                    dist, ids = dist[keep], ids[keep]
                results.append((ids, dist.astype(np.uint32)))
        return results


faiss.omp_set_num_threads(1)  # parallelism comes from the shards
