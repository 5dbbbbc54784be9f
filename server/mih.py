"""Exact Hamming top-k by multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in
Hamming Space with Multi-Index Hashing", CVPR 2012), in numpy.

A code of N <= 64 bits is cut into m disjoint substrings; each substring has a table that
lists the rows by substring value (a counting sort: ``order`` plus ``starts``). By the
pigeonhole principle, a code within distance d of the query has, in some substring, distance
at most floor(d / m) from the query's substring. So probing every table at substring radius
0, 1, 2, ... finds the codes nearest first, and after radius r has been probed in tables
0..j, *every* code within distance ``m*r + j`` has been found. The search stops once it holds
k live candidates and the k-th smallest distance is within that bound: the result is then the
exact top k by (distance, id), ties included, as the flat index gives.

The structure is immutable once built (rows sorted by id); deletes clear a row's ``alive``
flag. ``dlheir.server.index.BinaryIndex`` keeps new items in flat FAISS shards and rebuilds
this structure over everything when those grow too large.
"""

from __future__ import annotations

import math
import threading
from itertools import combinations

import numpy as np

from dlheir.contract import rank

_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)
MAX_SUBSTRING_BITS = 24


def to_uint64(codes: np.ndarray) -> np.ndarray:
    """Packed MSB-first codes of <= 8 bytes [n, L] -> uint64 [n], first code bit as bit 63."""
    codes = np.asarray(codes, dtype=np.uint8)
    out = np.zeros((len(codes), 8), dtype=np.uint8)
    out[:, : codes.shape[1]] = codes
    return out.view(">u8").reshape(-1).astype(np.uint64)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (numpy < 2 has no bitwise_count): four 16-bit table look-ups."""
    return _POPCOUNT16[np.ascontiguousarray(x, dtype=np.uint64).view(np.uint16).reshape(-1, 4)].sum(1, dtype=np.uint32)


def substring_lengths(bits: int, n: int) -> list[int]:
    """m substrings of about log2(n) bits each (Norouzi et al.'s choice), with at most 2n table
    entries (2^s) and 24 bits, as even as possible."""
    s = min(MAX_SUBSTRING_BITS, max(1, int(math.log2(2 * max(n, 1)))))  # 2^s <= 2n table entries
    m = max(1, math.ceil(bits / s))
    return [bits // m + (1 if j < bits % m else 0) for j in range(m)]


_FLIPS: dict[tuple[int, int], np.ndarray] = {}


def _flips(length: int, radius: int) -> np.ndarray:
    """All ``length``-bit masks with exactly ``radius`` bits set (cached)."""
    key = (length, radius)
    if key not in _FLIPS:
        _FLIPS[key] = np.array([sum(1 << b for b in c) for c in combinations(range(length), radius)], dtype=np.int64)
    return _FLIPS[key]


def _radix_argsort(keys: np.ndarray, bits: int) -> np.ndarray:
    """Stable argsort (int32 rows) of non-negative keys below 2^bits, as LSD radix passes of 16
    and 8 bits (numpy's stable sort is a radix sort for 16-bit and smaller types only)."""
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if bits > 16:
        high = (keys >> 16).astype(np.uint16 if bits > 24 else np.uint8)
        order = order[np.argsort(high[order], kind="stable")]
    return order.astype(np.int32)


class MultiIndexHash:
    """Immutable multi-index hash over (ids, codes); ``search`` is exact."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, bits: int) -> None:
        if bits > 64:
            raise ValueError("multi-index hashing here packs codes in 64 bits")
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.codes = to_uint64(np.asarray(codes, dtype=np.uint8)[order])
        self.alive = np.ones(len(ids), dtype=bool)
        self._local = threading.local()
        self.n_alive = len(ids)
        self.bits = bits
        self.lengths = substring_lengths(bits, len(ids))
        self.tables = []  # per substring: (shift, mask, order int32, starts int32)
        end = 64
        for length in self.lengths:
            shift = end - length
            mask = (1 << length) - 1
            sub = ((self.codes >> np.uint64(shift)) & np.uint64(mask)).astype(np.int64)
            rows = _radix_argsort(sub, length)
            starts = np.zeros((1 << length) + 1, dtype=np.int64)
            np.cumsum(np.bincount(sub, minlength=1 << length), out=starts[1:])
            self.tables.append((shift, mask, rows, starts.astype(np.int32 if len(ids) < 2**31 else np.int64)))
            end = shift

    def __len__(self) -> int:
        return self.n_alive

    @property
    def nbytes(self) -> int:
        return (self.ids.nbytes + self.codes.nbytes + self.alive.nbytes
                + sum(t[2].nbytes + t[3].nbytes for t in self.tables))

    def codes_bytes(self, rows, code_len: int) -> np.ndarray:
        """The packed codes [len(rows), code_len] of these rows (a bool mask or indices)."""
        return self.codes[rows].astype(">u8").view(np.uint8).reshape(-1, 8)[:, :code_len]

    def remove(self, ids: np.ndarray) -> int:
        """Mark these ids deleted; returns how many live rows that removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)  # rows are sorted by id
        rows = pos[self.ids[pos] == ids]
        rows = rows[self.alive[rows]]
        self.alive[rows] = False
        self.n_alive -= len(rows)
        return len(rows)

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, distances int32) of the exact top k live codes by (distance, id)."""
        q = to_uint64(query.reshape(1, -1))[0]
        k = min(k, self.n_alive)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        m = len(self.tables)
        visited = self._visited()
        touched: list[np.ndarray] = []  # every row flagged, to clear the flags afterwards
        found_rows: list[np.ndarray] = []  # live candidates and their distances
        found_d: list[np.ndarray] = []
        hist = np.zeros(65, dtype=np.int64)  # live candidates found, by distance
        n_found = 0
        try:
            for r in range(max(self.lengths) + 1):
                for j, (shift, mask, order, starts) in enumerate(self.tables):
                    if r <= self.lengths[j]:
                        rows = self._probe(order, starts, _flips(self.lengths[j], r) ^ ((int(q) >> shift) & mask))
                        rows = rows[~visited[rows]]  # one probe's rows are distinct; skip rows seen before
                        visited[rows] = True
                        touched.append(rows)
                        rows = rows[self.alive[rows]]
                        d = popcount64(self.codes[rows] ^ q)
                        found_rows.append(rows)
                        found_d.append(d)
                        hist += np.bincount(d, minlength=65)
                        n_found += len(rows)
                    if n_found >= k:
                        kth = int(np.searchsorted(np.cumsum(hist), k))  # the k-th smallest distance found
                        if kth <= m * r + j:  # every code within m*r + j has been found: exact
                            return self._top_k(np.concatenate(found_rows), np.concatenate(found_d), k, kth)
            return self._top_k(np.concatenate(found_rows), np.concatenate(found_d), k, 64)  # all probed
        finally:
            for rows in touched:
                visited[rows] = False

    def _visited(self) -> np.ndarray:
        """A per-thread all-False flag per row, reused across searches (cleared after each)."""
        flags = getattr(self._local, "visited", None)
        if flags is None:
            flags = self._local.visited = np.zeros(len(self.ids), dtype=bool)
        return flags

    @staticmethod
    def _probe(order: np.ndarray, starts: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Rows whose substring value is one of ``keys`` (concatenated bucket ranges)."""
        lo, hi = starts[keys], starts[keys + 1]
        lens = hi - lo
        nz = lens > 0
        lo, lens = lo[nz], lens[nz]
        total = int(lens.sum())
        if not total:
            return np.zeros(0, dtype=order.dtype)
        idx = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
        return order[idx]

    def _top_k(self, rows: np.ndarray, d: np.ndarray, k: int, kth: int) -> tuple[np.ndarray, np.ndarray]:
        near = d <= kth  # the top k lie within the k-th distance: sort only those
        rows, d = rows[near], d[near]
        ids = self.ids[rows]
        top = rank(d, ids)[:k]  # the project's one (distance, id) order
        return ids[top], d[top].astype(np.int32)
