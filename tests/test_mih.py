"""Multi-index hashing (server/mih.py) and the index that switches to it (server/index.py):
exact top k by (distance, id), ties included, equal to brute force on random and tie-heavy
codes, after deletes and replaces, below and across the size threshold."""

from __future__ import annotations

import numpy as np
import pytest

from dlheir.server.index import BinaryIndex
from dlheir.codes import hamming
from dlheir.contract import rank
from dlheir.server.mih import MultiIndexHash, substring_lengths


def _brute_force(ids: np.ndarray, codes: np.ndarray, query: np.ndarray, k: int, max_distance=None):
    """The reference: every distance (dlheir.codes.hamming, independent of mih's popcount), ranked."""
    d = hamming(query[None], codes)[0].astype(np.int64)
    order = rank(d, ids)[:k]
    ids, d = ids[order], d[order]
    if max_distance is not None:
        ids, d = ids[d <= max_distance], d[d <= max_distance]
    return list(ids), list(d)


def _codes(rng, n: int, bits: int, kind: str) -> np.ndarray:
    nbytes = -(-bits // 8)
    if kind == "random":
        codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    elif kind == "tie-heavy":
        codes = rng.integers(0, 4, (n, nbytes), dtype=np.uint8)
    else:  # clustered, like a trained network's codes: a few centres with bit noise
        centres = rng.integers(0, 2, (10, nbytes * 8), dtype=np.uint8)
        noisy = centres[rng.integers(0, 10, n)] ^ (rng.random((n, nbytes * 8)) < 0.05)
        codes = np.packbits(noisy.astype(np.uint8), axis=1)
    if bits % 8:
        codes[:, -1] &= (0xFF << (8 - bits % 8)) & 0xFF
    return codes


@pytest.mark.parametrize("bits", [12, 48, 64])
@pytest.mark.parametrize("kind", ["random", "tie-heavy", "clustered"])
def test_multi_index_hash_equals_brute_force(bits, kind):
    rng = np.random.default_rng(bits)
    n = 20_000
    codes = _codes(rng, n, bits, kind)
    ids = rng.choice(10 * n, n, replace=False).astype(np.int64)
    mih = MultiIndexHash(ids, codes, bits)
    assert len(mih.lengths) == len(substring_lengths(bits, n)) >= 1 and mih.rows.shape == (len(mih.lengths) - 1, n)
    queries = np.concatenate([codes[:10], _codes(rng, 10, bits, kind)])
    for k in (1, 7, 100):
        for q in queries:
            got_ids, got_d = mih.search_one(q, k)
            assert (list(got_ids), list(got_d)) == _brute_force(ids, codes, q, k)
    # deletes: dead rows are never returned
    dead = ids[::3]
    assert mih.remove(np.concatenate([dead, [-5]])) == len(dead)
    keep = ~np.isin(ids, dead)
    for q in queries[:5]:
        got_ids, got_d = mih.search_one(q, 50)
        assert (list(got_ids), list(got_d)) == _brute_force(ids[keep], codes[keep], q, 50)


@pytest.mark.parametrize("kind", ["random", "tie-heavy", "clustered"])
def test_index_across_the_threshold_with_deletes_and_replaces(kind):
    """A BinaryIndex that seals into multi-index hashing at 3,000 items answers exactly what
    the flat one answers at every step (and what brute force says)."""
    rng = np.random.default_rng(7)
    bits, n = 48, 12_000
    codes = _codes(rng, n, bits, kind)
    ids = rng.choice(10 * n, n, replace=False).astype(np.int64)
    flat = BinaryIndex(bits, n_shards=2, mih_min=10**12)
    mih = BinaryIndex(bits, n_shards=2, mih_min=3_000, choose="mih")
    store: dict[int, np.ndarray] = {}  # what the indexes hold
    queries = codes[rng.integers(0, n, 12)]

    def check():
        all_ids = np.array(sorted(store), dtype=np.int64)
        all_codes = np.array([store[i] for i in all_ids.tolist()], dtype=np.uint8)
        for k, max_d in ((1, None), (20, None), (200, None), (20, 6)):
            for (fi, fd), (mi, md), q in zip(flat.search(queries, k, max_d), mih.search(queries, k, max_d), queries):
                want = _brute_force(all_ids, all_codes, q, k, max_d)
                assert (list(mi), list(md)) == want == (list(fi), list(fd))

    for start in range(0, n, 2_000):  # grows past the threshold and re-seals as the delta grows
        for index in (flat, mih):
            index.add(ids[start:start + 2_000], codes[start:start + 2_000])
        store.update(zip(ids[start:start + 2_000].tolist(), codes[start:start + 2_000]))
        check()
    assert mih.kind == "mih+flat" and flat.kind == "flat"
    gone = ids[rng.choice(n, 1_500, replace=False)]
    for index in (flat, mih):
        index.remove(gone)
    for i in gone.tolist():
        del store[i]
    check()
    replaced = np.array(sorted(store)[:400], dtype=np.int64)
    new_codes = _codes(rng, 400, bits, kind)
    for index in (flat, mih):
        index.add(replaced, new_codes, replace_ids=replaced)
    store.update(zip(replaced.tolist(), new_codes))
    check()
    assert len(mih) == len(flat) == len(store)


def test_auto_choice_times_both_and_keeps_the_faster():
    """``choose='auto'`` seals only when hashing beat the flat scan on the collection's own codes."""
    rng = np.random.default_rng(3)
    codes = _codes(rng, 30_000, 48, "clustered")
    index = BinaryIndex(48, n_shards=2, mih_min=10_000)
    index.add(np.arange(30_000), codes)
    assert index.choice is not None and index.choice["size"] == 30_000
    faster_is_hashing = index.choice["mih_ms"] < index.choice["flat_ms"]
    assert index.kind == ("mih+flat" if faster_is_hashing else "flat")
    if not faster_is_hashing:  # stays flat until the collection doubles
        index.add(np.arange(30_000, 31_000), codes[:1_000])
        assert index.kind == "flat" and index.choice["size"] == 30_000


@pytest.mark.parametrize("kind", ["random", "two codes"])
def test_large_tables_two_level_directory(kind):
    """A table's starts are an int64 per block of 256 buckets plus a uint16 offset per bucket
    (random codes), or smaller blocks (down to one start per bucket) where a block would hold
    65,536 rows or more (two distinct codes, 70,000 copies each): exact either way, also after
    a snapshot round trip."""
    rng = np.random.default_rng(11)
    bits, n = 52, 140_000  # substrings of 17-18 bits
    codes = _codes(rng, n, bits, "random")
    if kind == "two codes":
        codes = codes[np.arange(n) % 2]
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)  # ids past 2^32: held as int64
    mih = MultiIndexHash(ids, codes, bits)
    assert min(mih.lengths) > 16 and mih.ids.dtype == np.int64
    # two codes: a block of 256 buckets holds 70,000 rows, so its table takes smaller blocks
    assert all(b == 8 for b in mih.block) if kind == "random" else all(b < 8 for b in mih.block)
    copy = MultiIndexHash.from_arrays(mih.arrays())
    for q in np.concatenate([codes[:4], _codes(rng, 4, bits, "random")]):
        want = _brute_force(ids, codes, q, 25)
        for index in (mih, copy):
            got_ids, got_d = index.search_one(q, 25)
            assert (list(got_ids), list(got_d)) == want


def test_small_ids_are_held_in_four_bytes():
    codes = np.random.default_rng(1).integers(0, 256, (1000, 6), dtype=np.uint8)
    mih = MultiIndexHash(np.arange(1000) + 2**32 - 1000, codes, 48)
    assert mih.ids.dtype == np.uint32
    ids, _ = mih.search_one(codes[5], 1)
    assert ids.dtype == np.int64 and ids[0] == 2**32 - 1000 + 5


@pytest.mark.parametrize("min_work", [0, None])
def test_flat_shards_equal_brute_force_with_ties(monkeypatch, min_work):
    """Small collections stay in one shard (one FAISS call); with the split forced (min_work 0:
    balanced shards searched in parallel) ties at the k-th distance that cross shards are
    still resolved by id, after deletes and replaces."""
    from dlheir.server import index as index_mod

    if min_work is not None:
        monkeypatch.setattr(index_mod, "PARALLEL_MIN_WORK", min_work)
    rng = np.random.default_rng(2)
    codes = _codes(rng, 4000, 48, "tie-heavy")
    ids = rng.choice(10**6, 4000, replace=False).astype(np.int64)
    index = BinaryIndex(48, n_shards=3, choose="flat")
    index.add(ids, codes)
    used = sum(1 for s in index.shards if s.n)
    assert used == (3 if min_work == 0 else 1)
    index.remove(ids[::5])
    new = _codes(rng, 300, 48, "tie-heavy")
    index.add(ids[1:1500:5], new, replace_ids=ids[1:1500:5])
    live = {int(i): c for i, c in zip(ids, codes)}
    for i in ids[::5].tolist():
        del live[i]
    live.update({int(i): c for i, c in zip(ids[1:1500:5], new)})
    all_ids = np.array(sorted(live), dtype=np.int64)
    all_codes = np.array([live[i] for i in all_ids.tolist()], dtype=np.uint8)
    queries = codes[:10]
    for k in (1, 25, 400):
        for (got_ids, got_d), q in zip(index.search(queries, k), queries):
            assert (list(got_ids), list(got_d)) == _brute_force(all_ids, all_codes, q, k)


def test_snapshot_arrays_that_would_read_out_of_bounds_are_refused():
    """The compiled search does not check bounds: ``from_arrays`` refuses row numbers outside the
    items and bucket starts that go back or past the end, instead of searching with them."""
    rng = np.random.default_rng(5)
    codes = _codes(rng, 5_000, 48, "random")
    arrays = MultiIndexHash(np.arange(5_000), codes, 48).arrays()
    assert len(MultiIndexHash.from_arrays(arrays)) == 5_000
    bad_rows = dict(arrays, rows=arrays["rows"].copy())
    bad_rows["rows"][-1, 7] = 5_000
    with pytest.raises(ValueError, match="row numbers out of range"):
        MultiIndexHash.from_arrays(bad_rows)
    bad_starts = dict(arrays, fine=arrays["fine"].copy())
    bad_starts["fine"][3] = 60_000
    with pytest.raises(ValueError, match="bucket starts out of order or range"):
        MultiIndexHash.from_arrays(bad_starts)


@pytest.mark.parametrize("meanwhile", ["adds", "a delete"])
def test_a_re_seal_overtaken_by_adds_keeps_them_and_one_overtaken_by_a_delete_is_dropped(monkeypatch, meanwhile):
    """A re-seal builds outside the index's lock. Items added during the build stay in the flat
    delta beside the new structure (nothing is lost, the build is kept); a delete during it makes
    the build stale, so it is dropped. Either way the index answers exactly."""
    import dlheir.server.index as index_module

    rng = np.random.default_rng(11)
    codes = _codes(rng, 4_000, 48, "tie-heavy")
    ids = np.arange(4_000, dtype=np.int64) * 7
    index = BinaryIndex(48, n_shards=2, mih_min=1_000, choose="mih")
    index.add(ids[:3_000], codes[:3_000], seal=False)

    done = []

    def during_the_build():
        if done:  # once: a delete re-checks the index, which would build (and get here) again
            return
        done.append(True)
        if meanwhile == "adds":
            index.add(ids[3_000:3_500], codes[3_000:3_500], seal=False)
            index.add(ids[3_500:], codes[3_500:], seal=False)
        else:
            index.remove(ids[:10])

    class Interrupted(MultiIndexHash):
        @classmethod
        def from_parts(cls, *args, **kwargs):
            sealed = MultiIndexHash.from_parts(*args, **kwargs)
            during_the_build()
            return sealed

    monkeypatch.setattr(index_module, "MultiIndexHash", Interrupted)
    sealed = index.maybe_seal()
    monkeypatch.undo()
    if meanwhile == "adds":
        assert sealed and index.seals == 1 and index.kind == "mih+flat"
        assert len(index) == 4_000 and sum(s.n for s in index.shards) == 1_000  # the adds, in the flat delta
        live = np.ones(4_000, bool)
    else:
        # dropped (the delete's own re-check built one from the state after it, which stands)
        assert not sealed and index.seals <= 1
        live = np.r_[np.zeros(10, bool), np.ones(2_990, bool), np.zeros(1_000, bool)]
        assert len(index) == 2_990
    for q in codes[rng.integers(0, 4_000, 5)]:
        got = index.search(q[None], 30)[0]
        assert (list(got[0]), list(got[1])) == _brute_force(ids[live], codes[live], q, 30)
