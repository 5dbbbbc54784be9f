"""Exact Hamming top-k by multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in
Hamming Space with Multi-Index Hashing", CVPR 2012), in numpy.

A code of N <= 64 bits is cut into m disjoint substrings; each substring has a table that
lists the rows by substring value. By the pigeonhole principle, a code within distance d of
the query has, in some substring, distance at most floor(d / m) from the query's substring.
So probing every table at substring radius 0, 1, 2, ... finds the codes nearest first, and
after radius r has been probed in tables 0..j, *every* code within distance ``m*r + j`` has
been found. The search stops once it holds k live candidates and the k-th smallest distance
is within that bound: the result is then the exact top k by (distance, id), ties included, as
the flat index gives.

Memory (what the server holds per item): the rows are stored sorted by the first substring
(then id), so table 0 needs no row list: a bucket is a range of the rows themselves. Every
other table has a row list (int32). Each table has bucket starts (a counting sort; above 2^16
buckets, an int32 per 256 buckets plus a uint16 offset per bucket). Ids are held as uint32
when they all fit, else int64; codes as one uint64 each. A search keeps no per-row state: a
row reached again through another table is recognised from its substring distances (it was
found first where that distance is smaller), so no "visited" array per thread is needed.

The structure is immutable once built; deletes clear a row's ``alive`` flag.
``dlheir.server.index.BinaryIndex`` keeps new items in flat FAISS shards and rebuilds this
structure over everything when those grow too large.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from dlheir.contract import rank

_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)
MAX_SUBSTRING_BITS = 24
FORMAT = 2  # of ``arrays()``: bumped whenever the layout changes (old snapshots are then rebuilt)


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


def _substring(codes64: np.ndarray, shift: int, length: int) -> np.ndarray:
    """Bits [shift, shift + length) of each uint64 code, as int32 (lengths are <= 24 bits)."""
    return ((codes64 >> np.uint64(shift)) & np.uint64((1 << length) - 1)).astype(np.int32)


def _radix_argsort(keys: np.ndarray, bits: int) -> np.ndarray:
    """Stable argsort (int32 rows) of non-negative keys below 2^bits, as LSD radix passes of 16
    and 8 bits (numpy's stable sort is a radix sort for 16-bit and smaller types only)."""
    order = np.argsort(keys.astype(np.uint16), kind="stable").astype(np.int32)  # the low 16 bits (astype wraps)
    if bits > 16:
        high = (keys >> 16).astype(np.uint16 if bits > 24 else np.uint8)
        order = order[np.argsort(high[order], kind="stable")]
    return order


class _Directory:
    """Bucket starts of one table: ``lookup(keys)`` = the first row of each bucket (``keys`` may
    be 2^length: the end). Large tables (over 2^16 buckets) hold one int32 start per 256 buckets
    plus a uint16 offset per bucket (half the bytes), when every 256-bucket block holds fewer
    than 65,536 rows; else one start per bucket."""

    BLOCK = 8  # log2 of the buckets per coarse entry

    def __init__(self, coarse: np.ndarray, fine: np.ndarray) -> None:
        self.coarse, self.fine = coarse, fine

    @classmethod
    def build(cls, sub: np.ndarray, length: int) -> "_Directory":
        n = len(sub)
        dtype = np.int32 if n < 2**31 else np.int64
        starts = np.zeros((1 << length) + 1, dtype=dtype)
        np.cumsum(np.bincount(sub, minlength=1 << length).astype(dtype), out=starts[1:])  # no cast inside cumsum: 4x faster
        if length > 16:
            block = 1 << cls.BLOCK
            coarse = starts[::block]  # 2^(length-8) + 1 entries, the last one n
            # bucket start minus its block's start, block by block (the last entry, n - n, is 0)
            fine = np.zeros(len(starts), dtype=starts.dtype)
            fine[:-1].reshape(-1, block)[:] = starts[:-1].reshape(-1, block) - coarse[:-1, None]
            if fine.max() < 1 << 16:
                return cls(coarse.astype(np.int64), fine.astype(np.uint16))
        return cls(np.zeros(0, np.int64), starts)  # already of that dtype: no copy

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.coarse):
            return self.fine[keys].astype(np.int64)
        return self.coarse[keys >> self.BLOCK] + self.fine[keys]

    @property
    def nbytes(self) -> int:
        return self.coarse.nbytes + self.fine.nbytes


def _id_dtype(ids: np.ndarray):
    """uint32 when every id fits (4 bytes per item instead of 8), else int64."""
    return np.uint32 if not len(ids) or (ids.min() >= 0 and ids.max() < 2**32) else np.int64


class MultiIndexHash:
    """Immutable multi-index hash over (ids, codes); ``search_one`` is exact."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, bits: int) -> None:
        if bits > 64:
            raise ValueError("multi-index hashing here packs codes in 64 bits")
        ids = np.asarray(ids, dtype=np.int64)
        codes64 = to_uint64(np.asarray(codes, dtype=np.uint8))
        lengths = substring_lengths(bits, len(ids))
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # a rebuild from the store reads them in order
            by_id = np.argsort(ids, kind="stable")
            ids, codes64 = ids[by_id], codes64[by_id]
        # rows sorted by (first substring, id): table 0 is then the row order itself
        sub0 = _substring(codes64, 64 - lengths[0], lengths[0])
        order = _radix_argsort(sub0, lengths[0])
        ids, codes64 = ids.astype(_id_dtype(ids))[order], codes64[order]
        del order
        # table 0's bucket sizes do not depend on the row order: counted from sub0 as it is
        self._setup(ids, codes64, np.ones(len(ids), dtype=bool), bits, lengths, None, sub0)

    def _setup(self, ids, codes, alive, bits, lengths, tables, sub0: np.ndarray | None = None) -> None:
        """``sub0``: every row's first substring, in any order (only its bucket sizes are used)."""
        self.ids, self.codes, self.alive = ids, codes, alive
        self.n_alive = int(alive.sum())
        self.bits, self.lengths = bits, list(lengths)
        self.shifts = [int(s) for s in 64 - np.cumsum(self.lengths)]  # substring j: bits [shift_j, shift_j + length_j)
        self.masks = [(1 << length) - 1 for length in self.lengths]
        if tables is None:  # table 0: bucket starts only (rows are in its order); tables 1..: row list too
            tables = []
            for j, (shift, length) in enumerate(zip(self.shifts, self.lengths)):
                sub = sub0 if j == 0 and sub0 is not None else _substring(codes, shift, length)
                tables.append((None if j == 0 else _radix_argsort(sub, length), _Directory.build(sub, length)))
        self.tables = tables
        # per table, the bits of the code it covers (to tell a row's substring distances)
        self._sub_masks = [np.uint64(mask << shift) for mask, shift in zip(self.masks, self.shifts)]

    def __len__(self) -> int:
        return self.n_alive

    # --- snapshot (dlheir.server.snapshot) ---------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Everything this structure holds, as named arrays (``alive`` copied: deletes change it)."""
        out = {"ids": self.ids, "codes": self.codes, "alive": self.alive.copy(),
               "meta": np.array([FORMAT, self.bits, *self.lengths], dtype=np.int64)}
        for j, (rows, directory) in enumerate(self.tables):
            if rows is not None:
                out[f"rows{j}"] = rows
            out[f"coarse{j}"], out[f"fine{j}"] = directory.coarse, directory.fine
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "MultiIndexHash":
        """The inverse of ``arrays()``; ValueError when they are not of this format or inconsistent."""
        meta = [int(x) for x in arrays["meta"]]
        if meta[0] != FORMAT:
            raise ValueError(f"multi-index hash format {meta[0]}, expected {FORMAT}")
        bits, lengths = meta[1], meta[2:]
        n = len(arrays["ids"])
        tables = [(arrays[f"rows{j}"] if j else None, _Directory(arrays[f"coarse{j}"], arrays[f"fine{j}"]))
                  for j in range(len(lengths))]
        ends = [int(d.lookup(np.array([1 << length]))[0]) for (_, d), length in zip(tables, lengths)]
        if (sum(lengths) != bits or len(arrays["codes"]) != n or len(arrays["alive"]) != n or ends != [n] * len(ends)
                or any(len(d.fine) != (1 << length) + 1 for (_, d), length in zip(tables, lengths))
                or any(len(r) != n for r, _ in tables[1:])):
            raise ValueError("multi-index hash arrays do not fit together")
        self = cls.__new__(cls)
        self._setup(arrays["ids"], arrays["codes"], arrays["alive"], bits, lengths, tables)
        return self

    @property
    def nbytes(self) -> int:
        return (self.ids.nbytes + self.codes.nbytes + self.alive.nbytes
                + sum((0 if rows is None else rows.nbytes) + d.nbytes for rows, d in self.tables))

    def live_ids(self) -> np.ndarray:
        return self.ids[self.alive].astype(np.int64)

    def codes_bytes(self, rows, code_len: int) -> np.ndarray:
        """The packed codes [len(rows), code_len] of these rows (a bool mask or indices)."""
        return self.codes[rows].astype(">u8").view(np.uint8).reshape(-1, 8)[:, :code_len]

    def remove(self, ids: np.ndarray) -> int:
        """Mark these ids deleted; returns how many live rows that removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids <= np.iinfo(self.ids.dtype).max)]
        if not len(ids) or not len(self.ids):
            return 0
        rows = np.flatnonzero(np.isin(self.ids, ids.astype(self.ids.dtype)) & self.alive)  # O(n): deletes are rare
        self.alive[rows] = False
        self.n_alive -= len(rows)
        return len(rows)

    def _probe(self, j: int, keys: np.ndarray) -> np.ndarray:
        """Rows whose substring j is one of ``keys`` (concatenated bucket ranges)."""
        order, directory = self.tables[j]  # table 0: rows are in its order (no row list)
        lo, hi = directory.lookup(keys), directory.lookup(keys + 1)
        lens = hi - lo
        nz = lens > 0
        lo, lens = lo[nz], lens[nz]
        total = int(lens.sum())
        if not total:
            return np.zeros(0, dtype=np.int64)
        idx = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(lo, lens)
        return idx if order is None else order[idx]

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, distances int32) of the exact top k live codes by (distance, id)."""
        q = to_uint64(query.reshape(1, -1))[0]
        k = min(k, self.n_alive)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        m = len(self.lengths)
        qi = int(q)
        found_rows: list[np.ndarray] = []  # live candidates and their distances
        found_d: list[np.ndarray] = []
        hist = np.zeros(65, dtype=np.int64)  # live candidates found, by distance
        n_found = 0
        bound = 64  # once k candidates are held, farther rows can never enter the top k
        for r in range(max(self.lengths) + 1):
            for j in range(m):
                if r <= self.lengths[j]:
                    keys = _flips(self.lengths[j], r) ^ ((qi >> self.shifts[j]) & self.masks[j])
                    rows = self._probe(j, keys)
                    if len(rows):
                        x = self.codes[rows] ^ q
                        d = popcount64(x)
                        keep = (d <= bound) & self.alive[rows]
                        rows, x, d = rows[keep], x[keep], d[keep]
                        # a row seen before was found in a table where its substring distance is
                        # smaller (earlier radius) or equal with a smaller table number: drop it
                        for jj in range(m):
                            if jj != j and (jj < j or r > 0) and len(rows):
                                new = popcount64(x & self._sub_masks[jj]) > (r if jj < j else r - 1)
                                rows, x, d = rows[new], x[new], d[new]
                        found_rows.append(rows)
                        found_d.append(d)
                        hist += np.bincount(d, minlength=65)
                        n_found += len(rows)
                if n_found >= k:
                    kth = int(np.searchsorted(np.cumsum(hist), k))  # the k-th smallest distance found
                    if kth <= m * r + j:  # every code within m*r + j has been found: exact
                        return self._top_k(np.concatenate(found_rows), np.concatenate(found_d), k, kth)
                    bound = kth
        return self._top_k(np.concatenate(found_rows), np.concatenate(found_d), k, 64)  # all probed

    def _top_k(self, rows: np.ndarray, d: np.ndarray, k: int, kth: int) -> tuple[np.ndarray, np.ndarray]:
        near = d <= kth  # the top k lie within the k-th distance: sort only those
        rows, d = rows[near], d[near]
        ids = self.ids[rows].astype(np.int64)
        top = rank(d, ids)[:k]  # the project's one (distance, id) order
        return ids[top], d[top].astype(np.int32)
