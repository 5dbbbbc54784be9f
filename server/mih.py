"""Exact Hamming top-k by multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in
Hamming Space with Multi-Index Hashing", CVPR 2012); the search and the table build are
compiled with numba (``nogil``: the shard threads run them in parallel).

A code of N <= 64 bits is cut into m disjoint substrings; each substring has a table that
lists the rows by substring value. By the pigeonhole principle, a code within distance d of
the query has, in some substring, distance at most floor(d / m) from the query's substring.
So probing every table at substring radius 0, 1, 2, ... finds the codes nearest first, and
after radius r has been probed in tables 0..j, *every* code within distance ``m*r + j`` has
been found. The search stops once it holds k live candidates and the k-th smallest distance
is within that bound: the result is then the exact top k by (distance, id), ties included, as
the flat index gives.

Memory (what the server holds per item): the rows are stored sorted by the first substring,
so table 0 needs no row list: a bucket is a range of the rows themselves. Every
other table has a row list (int32). Each table's bucket starts are an int64 per block of
2^b buckets plus a uint16 offset per bucket (b = 8, or smaller where a block holds 65,536 rows
or more; b = 0 is one start per bucket). Ids are held as uint32 when they all fit, else int64;
codes as one uint64 each. A search keeps no per-row state: a row reached again through another
table is recognised from its substring distances (it was found first where that distance is
smaller), so no "visited" array per thread is needed.

The structure is immutable once built; deletes clear a row's ``alive`` flag.
``dlheir.server.index.BinaryIndex`` keeps new items in flat FAISS shards and rebuilds this
structure over everything when those grow too large.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MAX_SUBSTRING_BITS = 24
BLOCK_BITS = 8  # log2 of the buckets per coarse bucket start (fewer where a block is too full)
FORMAT = 3  # of ``arrays()``: bumped whenever the layout changes (old snapshots are then rebuilt)


def to_uint64(codes: np.ndarray) -> np.ndarray:
    """Packed MSB-first codes of <= 8 bytes [n, L] -> uint64 [n], first code bit as bit 63."""
    codes = np.asarray(codes, dtype=np.uint8)
    out = np.zeros((len(codes), 8), dtype=np.uint8)
    out[:, : codes.shape[1]] = codes
    return out.view(">u8").reshape(-1).astype(np.uint64)


def substring_lengths(bits: int, n: int) -> list[int]:
    """m substrings of about log2(n) bits each (Norouzi et al.'s choice), with at most 2n table
    entries (2^s) and 24 bits, as even as possible."""
    s = min(MAX_SUBSTRING_BITS, max(1, int(math.log2(2 * max(n, 1)))))  # 2^s <= 2n table entries
    m = max(1, math.ceil(bits / s))
    return [bits // m + (1 if j < bits % m else 0) for j in range(m)]


# --- compiled kernels ---------------------------------------------------------------------------
@njit(nogil=True, cache=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(nogil=True, cache=True, inline="always")
def _key(codes64, row, shift, mask):
    return np.int64((codes64[row] >> np.uint64(shift)) & np.uint64(mask))


@njit(nogil=True, cache=True)
def _sort_rows(codes64, shift, length):
    """(rows in stable order of their key as int32, bucket starts int32 [2^length + 1]) for keys
    below 2^length: one counting pass for keys of up to 16 bits, else two LSD radix passes
    (low 12 bits, then the rest) that carry the keys along, so every pass reads sequentially
    and writes into at most 4,096 runs (cache-friendly where one pass over 2^24 buckets is not).
    The bucket starts are counted in one pass of their own over the keys (at 10M keys of 24 bits
    0.15 s of random increments: cheaper than a third array of sorted keys, 40 MB at 10M rows,
    held at the re-seal's memory peak). Row numbers and starts fit int32 (fewer than 2^31 rows).
    The keys are bits [shift, shift + length) of each code, read from the codes as needed: no
    array of them (another 40 MB at 10M rows)."""
    n = len(codes64)
    mask = (1 << length) - 1
    starts = np.zeros((1 << length) + 1, np.int32)
    order = np.empty(n, np.int32)
    for row in range(n):
        starts[_key(codes64, row, shift, mask) + 1] += 1
    for b in range(1 << length):
        starts[b + 1] += starts[b]
    if length <= 16:
        fill = starts[:-1].copy()
        for row in range(n):
            key = _key(codes64, row, shift, mask)
            order[fill[key]] = row
            fill[key] += 1
        return order, starts
    low_bits = 12
    low_mask = (1 << low_bits) - 1
    high_n = 1 << (length - low_bits)
    count = np.zeros((1 << low_bits) + 1, np.int64)
    for row in range(n):
        count[(_key(codes64, row, shift, mask) & low_mask) + 1] += 1
    for b in range(1 << low_bits):
        count[b + 1] += count[b]
    tmp_rows = np.empty(n, np.int32)
    tmp_keys = np.empty(n, np.int32)
    for row in range(n):
        key = _key(codes64, row, shift, mask)
        at = count[key & low_mask]
        tmp_rows[at] = row
        tmp_keys[at] = key
        count[key & low_mask] = at + 1
    high = np.zeros(high_n + 1, np.int64)
    for key in tmp_keys:
        high[(key >> low_bits) + 1] += 1
    for b in range(high_n):
        high[b + 1] += high[b]
    for at in range(n):
        h = tmp_keys[at] >> low_bits
        order[high[h]] = tmp_rows[at]
        high[h] += 1
    return order, starts


@njit(nogil=True, cache=True)
def _directory_arrays(starts, length, b):
    """(coarse int64 [2^(length-b) + 1], fine uint16 [2^length + 1], the largest offset: the
    directory fits when that is below 65,536, else fine has wrapped and is not used)."""
    n_coarse = ((1 << length) >> b) + 1
    coarse = np.empty(n_coarse, np.int64)
    for i in range(n_coarse):
        coarse[i] = starts[i << b]
    fine = np.empty(len(starts), np.uint16)
    worst = 0
    for key in range(len(starts)):
        off = starts[key] - coarse[key >> b]
        if off > worst:
            worst = off
        fine[key] = off
    return coarse, fine, worst


@njit(nogil=True, cache=True, inline="always")
def _bucket_start(coarse, coarse_at, fine, fine_at, block, j, key):
    return coarse[coarse_at[j] + (key >> block[j])] + np.int64(fine[fine_at[j] + key])


@njit(nogil=True, cache=True)
def _starts_in_order(coarse, coarse_at, fine, fine_at, block, j, length, n):
    """Whether table j's bucket starts run from 0 to n without going back."""
    last = 0
    for key in range((1 << length) + 1):
        start = _bucket_start(coarse, coarse_at, fine, fine_at, block, j, key)
        if start < last or start > n:
            return False
        last = start
    return _bucket_start(coarse, coarse_at, fine, fine_at, block, j, 0) == 0 and last == n


@njit(nogil=True, cache=True)
def _search(queries, k, codes, alive, ids, rows, coarse, coarse_at, fine, fine_at, block, lengths, shifts,
            out_ids, out_d):
    """Exact top k (k <= live rows) of each query into out_ids/out_d [Q, k], by (distance, id)."""
    m = len(lengths)
    max_length = lengths.max()
    sub_masks = np.empty(m, np.uint64)
    for j in range(m):
        sub_masks[j] = np.uint64((1 << lengths[j]) - 1) << np.uint64(shifts[j])
    cap = 4096
    cand_rows = np.empty(cap, np.int64)
    cand_d = np.empty(cap, np.int64)
    hist = np.zeros(65, np.int64)
    for qi in range(len(queries)):
        q = queries[qi]
        hist[:] = 0
        n_found = 0
        bound = 64
        kth = 64
        done = False
        for r in range(max_length + 1):
            for j in range(m):
                length = lengths[j]
                if r <= length:
                    q_sub = np.int64((q >> np.uint64(shifts[j])) & np.uint64((1 << length) - 1))
                    flips = np.int64((1 << r) - 1)  # Gosper's hack: every length-bit mask with r bits set
                    while flips < (1 << length):
                        key = q_sub ^ flips
                        lo = _bucket_start(coarse, coarse_at, fine, fine_at, block, j, key)
                        hi = _bucket_start(coarse, coarse_at, fine, fine_at, block, j, key + 1)
                        for at in range(lo, hi):
                            row = at if j == 0 else np.int64(rows[j - 1, at])
                            if not alive[row]:
                                continue
                            x = codes[row] ^ q
                            d = _popcount(x)
                            if d > bound:
                                continue
                            # a row seen before was found in a table where its substring distance
                            # is smaller (earlier radius) or equal with a smaller table number
                            seen = False
                            for jj in range(m):
                                if jj != j:
                                    sd = _popcount(x & sub_masks[jj])
                                    if sd < r or (jj < j and sd == r):
                                        seen = True
                                        break
                            if seen:
                                continue
                            if n_found == cap:
                                cap *= 2
                                grown_rows = np.empty(cap, np.int64)
                                grown_d = np.empty(cap, np.int64)
                                grown_rows[:n_found] = cand_rows[:n_found]
                                grown_d[:n_found] = cand_d[:n_found]
                                cand_rows, cand_d = grown_rows, grown_d
                            cand_rows[n_found] = row
                            cand_d[n_found] = d
                            hist[d] += 1
                            n_found += 1
                        if r == 0:
                            break
                        low = flips & -flips
                        high = flips + low
                        flips = high + (((high ^ flips) // low) >> 2)
                if n_found >= k:
                    total = 0
                    for t in range(65):  # the k-th smallest distance found
                        total += hist[t]
                        if total >= k:
                            kth = t
                            break
                    if kth <= m * r + j:  # every code within m*r + j has been found: exact
                        done = True
                        break
                    bound = kth
            if done:
                break
        # the top k lie within the k-th distance: those by (distance, id)
        n_near = 0
        for c in range(n_found):
            if cand_d[c] <= kth:
                n_near += 1
        near_ids = np.empty(n_near, np.int64)
        near_d = np.empty(n_near, np.int64)
        at = 0
        for c in range(n_found):
            if cand_d[c] <= kth:
                near_ids[at] = np.int64(ids[cand_rows[c]])
                near_d[at] = cand_d[c]
                at += 1
        by_id = np.argsort(near_ids, kind="mergesort")
        slot = np.zeros(66, np.int64)  # counting sort by distance, stable: ids ascending within one
        for t in range(65):
            slot[t + 1] = slot[t] + hist[t]
        for c in by_id:
            t = near_d[c]
            if slot[t] < k:
                out_ids[qi, slot[t]] = near_ids[c]
                out_d[qi, slot[t]] = t
            slot[t] += 1


def _id_dtype(ids: np.ndarray):
    """uint32 when every id fits (4 bytes per item instead of 8), else int64."""
    return np.uint32 if not len(ids) or (ids.min() >= 0 and ids.max() < 2**32) else np.int64


def _directory(starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(coarse int64, fine uint16, b) with start(key) = coarse[key >> b] + fine[key]: the largest
    b <= BLOCK_BITS for which every block of 2^b buckets holds fewer than 65,536 rows."""
    for b in range(min(BLOCK_BITS, length), -1, -1):
        coarse, fine, worst = _directory_arrays(starts, length, b)
        if worst < 1 << 16:
            return coarse, fine, b
    raise AssertionError("b = 0 always fits")  # pragma: no cover


class MultiIndexHash:
    """Immutable multi-index hash over (ids, codes); ``search`` is exact."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, bits: int) -> None:
        """Over ``ids`` and their packed codes [n, L] (L <= 8 bytes)."""
        self._build([np.asarray(ids, dtype=np.int64)], [to_uint64(np.asarray(codes, dtype=np.uint8))], bits)

    @classmethod
    def from_parts(cls, ids_parts: list[np.ndarray], codes64_parts: list[np.ndarray], bits: int) -> "MultiIndexHash":
        """Over the concatenation of id arrays and their codes as ``to_uint64`` gives them. The two
        lists are emptied as soon as they are joined: a caller that holds nothing else of them
        (``BinaryIndex`` re-sealing beside the live structure) frees them before the build's peak."""
        self = cls.__new__(cls)
        self._build(ids_parts, codes64_parts, bits)
        return self

    def _build(self, ids_parts: list[np.ndarray], codes64_parts: list[np.ndarray], bits: int) -> None:
        if bits > 64:
            raise ValueError("multi-index hashing here packs codes in 64 bits")
        ids = ids_parts[0] if len(ids_parts) == 1 else np.concatenate(ids_parts)
        ids_parts.clear()
        codes64 = codes64_parts[0] if len(codes64_parts) == 1 else np.concatenate(codes64_parts)
        codes64_parts.clear()
        if len(ids) >= 2**31:
            raise ValueError("multi-index hashing here numbers rows with int32")
        lengths = substring_lengths(bits, len(ids))
        shifts = [int(s) for s in 64 - np.cumsum(lengths)]
        # rows sorted by the first substring (stable: the input order within a bucket; the search
        # orders its results by (distance, id) itself): table 0 is then the row order itself
        order, starts = _sort_rows(codes64, shifts[0], lengths[0])
        id_dtype = _id_dtype(ids)
        ids = ids[order].astype(id_dtype, copy=False)  # one new array at a time, the old one freed
        codes64 = codes64[order]
        del order
        rows = np.empty((len(lengths) - 1, len(ids)), dtype=np.int32)
        directories = [_directory(starts, lengths[0])]
        for j in range(1, len(lengths)):
            order, starts = _sort_rows(codes64, shifts[j], lengths[j])
            rows[j - 1] = order
            directories.append(_directory(starts, lengths[j]))
            del order, starts
        coarse, fine, block = zip(*directories)
        self._setup(ids, codes64, np.ones(len(ids), dtype=bool), bits, lengths, rows,
                    np.concatenate(coarse), np.concatenate(fine), np.array(block, dtype=np.int64))

    def _setup(self, ids, codes, alive, bits, lengths, rows, coarse, fine, block) -> None:
        self.ids, self.codes, self.alive = ids, codes, alive
        self.n_alive = int(alive.sum())
        self.bits, self.lengths = bits, [int(x) for x in lengths]
        self.rows, self.coarse, self.fine, self.block = rows, coarse, fine, block
        self._lengths = np.array(self.lengths, dtype=np.int64)
        self._shifts = (64 - np.cumsum(self._lengths)).astype(np.int64)
        self._coarse_at = np.concatenate([[0], np.cumsum((1 << self._lengths >> block) + 1)])
        self._fine_at = np.concatenate([[0], np.cumsum((1 << self._lengths) + 1)])

    def __len__(self) -> int:
        return self.n_alive

    # --- snapshot (dlheir.server.snapshot) ---------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Everything this structure holds, as named arrays (``alive`` copied: deletes change it)."""
        return {"ids": self.ids, "codes": self.codes, "alive": self.alive.copy(), "rows": self.rows,
                "coarse": self.coarse, "fine": self.fine, "block": self.block,
                "meta": np.array([FORMAT, self.bits, *self.lengths], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays) -> "MultiIndexHash":
        """The inverse of ``arrays()``; ValueError when they are not of this format or inconsistent."""
        meta = [int(x) for x in arrays["meta"]]
        if meta[0] != FORMAT:
            raise ValueError(f"multi-index hash format {meta[0]}, expected {FORMAT}")
        bits, lengths = meta[1], meta[2:]
        self = cls.__new__(cls)
        parts = [np.asarray(arrays[name]) for name in ("ids", "codes", "alive", "rows", "coarse", "fine", "block")]
        ids, codes, alive, rows, coarse, fine, block = parts
        n = len(ids)
        if (sum(lengths) != bits or len(codes) != n or len(alive) != n or rows.shape != (len(lengths) - 1, n)
                or len(block) != len(lengths) or not all(0 <= b <= min(BLOCK_BITS, L) for b, L in zip(block, lengths))):
            raise ValueError("multi-index hash arrays do not fit together")
        self._setup(ids, codes, alive, bits, lengths, rows, coarse, fine, block)
        if len(coarse) != self._coarse_at[-1] or len(fine) != self._fine_at[-1]:
            raise ValueError("multi-index hash arrays do not fit together")
        # the compiled search does not check bounds: every bucket range and row number it will
        # read must lie inside the arrays (a snapshot's checksum catches damage, not a wrong file)
        for j, length in enumerate(lengths):
            if not _starts_in_order(coarse, self._coarse_at, fine, self._fine_at, block, j, length, n):
                raise ValueError(f"multi-index hash table {j}: bucket starts out of order or range")
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError("multi-index hash row numbers out of range")
        return self

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ids, self.codes, self.alive, self.rows, self.coarse, self.fine))

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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [Q, k'], distances int32 [Q, k']) of the exact top k' = min(k, live codes)
        of each packed query code [Q, L], by (distance, id). Runs without the GIL."""
        queries = to_uint64(np.asarray(queries, dtype=np.uint8).reshape(len(queries), -1))
        k = min(k, self.n_alive)
        out_ids = np.empty((len(queries), k), np.int64)
        out_d = np.empty((len(queries), k), np.int32)
        if k:
            _search(queries, k, self.codes, self.alive, self.ids, self.rows, self.coarse, self._coarse_at, self.fine,
                    self._fine_at, self.block, self._lengths, self._shifts, out_ids, out_d)
        return out_ids, out_d

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, distances int32) of the exact top k live codes by (distance, id)."""
        ids, d = self.search(np.asarray(query, dtype=np.uint8).reshape(1, -1), k)
        return ids[0], d[0]


def warm_up() -> None:
    """Load the compiled kernels now (numba compiles them on a first run and caches them beside
    this module): a server calls this while it starts, so no request pays for it, and their
    memory (about 40 MB, once per process) is part of an empty server's."""
    codes = np.random.default_rng(0).integers(0, 256, (300, 8), dtype=np.uint8)
    for ids in (np.arange(300), np.arange(300) + 2**40):  # ids held as uint32, and as int64
        MultiIndexHash(ids, codes, 64).search(codes[:2], 5)
