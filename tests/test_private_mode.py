"""Private-ranking mode: sealed code pages on a real cloud server, ranking on the client."""

import json
import sqlite3
import struct

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError
from dlheir.client.crypto import CodeTransform, OwnerKeys
from dlheir.client.private import (
    MAX_PAGE_RECORDS, LocalIndex, PageAuthenticationError, PageCache, PageRecords, PageWriter, RollbackError,
    append_code_page, blob_digest, chain_start, decode_records, default_cache_path, delete_items, encode_records,
    next_chain, open_page, page_key, page_keyring, seal_page, sync_code_pages,
)
from dlheir.codes import hamming
from dlheir.contract import rank
from dlheir.proto import dlheir_cloud_pb2 as pb


def _codes(rng, n, bits, distinct=None):
    codes = rng.integers(0, 256, (n, (bits + 7) // 8), dtype=np.uint8)
    if bits % 8:
        codes[:, -1] &= (0xFF << (8 - bits % 8)) & 0xFF
    if distinct:  # tie-heavy: only `distinct` different codes
        codes = codes[rng.integers(0, distinct, n)]
    return codes


class World:
    """One server, one owner key (both collections registered in it: each has its own keys, bound
    to its name and uid), and the same items in a server-ranked and a private collection."""

    def __init__(self, server, bits=48, tmp_path=None):
        self.server, self.bits = server, bits
        self.keys = OwnerKeys.generate().register("ranked").register("private", "private")
        self.rk, self.pk = self.keys.for_collection("ranked"), self.keys.for_collection("private")
        self.transform = CodeTransform(self.rk.transform_secret, bits)
        with CloudClient(server.address) as admin:
            r_owner, r_reader = admin.create_collection("ranked", bits, server.admin_token)
            p_owner, p_reader = admin.create_collection("private", bits, server.admin_token, private=True)
        self.ranked = CloudClient(server.address, r_owner)
        self.ranked_reader = CloudClient(server.address, r_reader)
        self.owner = CloudClient(server.address, p_owner)
        self.reader = CloudClient(server.address, p_reader)
        self.writer = PageWriter(self.owner, self.pk.image_key, "private", bits, binding=self.pk.binding)
        self.cache = tmp_path / "cache.pages" if tmp_path else None

    def upload(self, ids, codes, replace=False, batch=700):
        """Blobs + transformed codes to the ranked collection; blobs + a sealed page per batch to the private one."""
        for s in range(0, len(ids), batch):
            bi, bc = ids[s:s + batch], codes[s:s + batch]
            list(self.ranked.upload("ranked", [(int(i), self.transform.apply(c)[0].tobytes(), b"blob-%d" % i, {})
                                               for i, c in zip(bi, bc)], replace=replace))
            self.writer.put(bi, bc, [b"blob-%d" % i for i in bi])  # each record names its blob's digest
            list(self.owner.upload("private", [(int(i), b"", b"blob-%d" % i, {}) for i in bi], replace=replace))

    def delete(self, ids):
        assert self.ranked.delete("ranked", ids) == delete_items(self.owner, self.pk.image_key, "private",
                                                                 self.bits, ids, binding=self.pk.binding)

    def local(self, cache=None):
        return LocalIndex(self.reader, "private", self.bits, self.pk.image_key, cache if cache else self.cache,
                          binding=self.pk.binding)

    def assert_same(self, local, queries, ks=(1, 20, 100)):
        local.sync()
        for k in ks:
            served = self.ranked_reader.search("ranked", self.transform.apply(queries), k)
            mine = local.search(queries, k)
            for (si, sd), (mi, md) in zip(served, mine):
                np.testing.assert_array_equal(mi, si)
                np.testing.assert_array_equal(md, sd)

    def close(self):
        for c in (self.ranked, self.ranked_reader, self.owner, self.reader):
            c.close()


@pytest.fixture
def world(cloud_server, tmp_path):
    w = World(cloud_server, tmp_path=tmp_path)
    yield w
    w.close()


@pytest.mark.parametrize("bits,distinct", [(48, 5), (12, 3), (64, None)])
def test_private_ranking_equals_server_ranking_including_ties(cloud_server, tmp_path, bits, distinct):
    rng = np.random.default_rng(bits)
    w = World(cloud_server, bits, tmp_path)
    codes = _codes(rng, 2500, bits, distinct)
    ids = rng.choice(2**62, size=len(codes), replace=False)
    w.upload(ids, codes)
    assert w.owner.stats("private").code_pages == 4  # 2500 items in batches of 700
    local = w.local()
    queries = np.concatenate([_codes(rng, 6, bits), codes[:4]])
    w.assert_same(local, queries, ks=(1, 7, 20, 100, 2600))
    # and both equal numpy brute force by (distance, id)
    brute = hamming(queries, codes)
    for q, (got_ids, got_d) in enumerate(local.search(queries, 50)):
        order = rank(brute[q], ids)[:50]
        np.testing.assert_array_equal(got_ids, ids[order])
        np.testing.assert_array_equal(got_d, brute[q][order])
    # max_distance is honoured the same way
    served = w.ranked_reader.search("ranked", w.transform.apply(queries[:3]), 100, max_distance=int(bits // 3))
    mine = local.search(queries[:3], 100, max_distance=int(bits // 3))
    for (si, sd), (mi, md) in zip(served, mine):
        np.testing.assert_array_equal(mi, si)
        np.testing.assert_array_equal(md, sd)
    w.close()


def test_incremental_sync_fetches_only_new_pages(world, tmp_path, monkeypatch):
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    cache = default_cache_path(world.server.address, "private", world.pk.uid)
    assert world.pk.uid.hex() in cache.name  # one cache per collection uid: a re-created collection starts afresh
    assert cache != default_cache_path(world.server.address, "private", OwnerKeys.generate().register("private")
                                       .for_collection("private").uid)
    rng = np.random.default_rng(1)
    codes = _codes(rng, 2000, 48)
    world.upload(np.arange(2000), codes, batch=500)
    local = world.local(cache)
    first = local.sync()
    info = world.reader.stats("private")
    assert (first.pages_cached, first.pages_fetched, first.pages_total, first.items) == (0, 4, 4, 2000)
    assert first.bytes_fetched == info.code_page_bytes
    again = local.sync()
    assert (again.pages_fetched, again.bytes_fetched, again.pages_total) == (0, 0, 4)
    world.upload(np.arange(2000, 2100), _codes(rng, 100, 48))
    before = info.code_page_bytes
    third = local.sync()
    assert (third.pages_fetched, third.pages_total, third.items) == (1, 5, 2100)
    assert third.bytes_fetched == world.reader.stats("private").code_page_bytes - before
    # the server sends only the pages asked for
    header, pages = sync_code_pages(world.reader, "private", 3)
    assert (header.mode, header.bits, header.pages) == (pb.PRIVATE_RANKING, 48, 5)
    assert [n for n, _ in pages] == [3, 4]
    header, pages = sync_code_pages(world.reader, "private", 5)
    assert header.pages == 5 and list(pages) == []
    # a new process starts from the cache and fetches nothing
    fresh = world.local(cache)
    report = fresh.sync()
    assert (report.pages_cached, report.pages_fetched, len(fresh)) == (5, 0, 2100)
    world.assert_same(fresh, codes[:5])
    # the cache: 0600 in a 0700 folder under $DLHEIR_HOME, still sealed (no code in the clear)
    assert cache.parent == tmp_path / "home" / "page-cache"
    assert cache.stat().st_mode & 0o777 == 0o600 and cache.parent.stat().st_mode & 0o777 == 0o700
    head = cache.with_name(cache.name + ".head")  # the highest page count and chain value seen
    assert head.stat().st_mode & 0o777 == 0o600 and json.loads(head.read_text())["pages"] == 5
    raw = cache.read_bytes()
    assert not any(c.tobytes() in raw for c in codes[:200])


def test_damaged_cache_is_dropped_and_resynced_but_fewer_pages_than_seen_are_a_rollback(world):
    rng = np.random.default_rng(2)
    codes = _codes(rng, 600, 48)
    world.upload(np.arange(600), codes, batch=200)
    world.local().sync()
    data = bytearray(world.cache.read_bytes())
    data[40] ^= 1  # inside page 0's ciphertext
    world.cache.write_bytes(bytes(data))
    local = world.local()
    report = local.sync()
    assert (report.pages_cached, report.pages_fetched, len(local)) == (0, 3, 600)
    world.assert_same(local, codes[:5])
    # a page cached under the wrong number (here page 0's bytes as page 2) fails to open: resync
    (_, page0), = list(sync_code_pages(world.reader, "private", 0)[1])[:1]
    cached = PageCache(world.cache)
    pages = cached.load()
    assert len(pages) == 3
    cached.reset()
    cached.append(0, [pages[0], pages[1], page0])
    local = world.local()
    report = local.sync()
    assert (report.pages_cached, report.pages_fetched, len(local)) == (0, 3, 600)
    world.assert_same(local, codes[:5])
    # another collection's pages (same name, another uid: a re-created collection) do not open here:
    # its cache lives elsewhere (one per uid), and put under this path it is dropped and resynced
    other = OwnerKeys.generate().register("private", "private").for_collection("private")
    foreign = [seal_page(page_key(other.image_key, other.binding), other.binding, 0,
                         encode_records(PageRecords(np.ones(1, np.uint8), np.array([1]), codes[:1]), 48))]
    cached.reset()
    cached.append(0, foreign)
    local = world.local()
    report = local.sync()
    assert (report.pages_cached, report.pages_fetched, len(local)) == (0, 3, 600)
    # a copy holding more pages than the server announces: pages withheld or rolled back, refused
    local.pages = 7
    with pytest.raises(RollbackError, match="announces 3 code pages, this client has seen 7"):
        local.sync()
    # and a cache holding more pages than the server (page 0 again as page 3): refused too, not reset
    cached.append(3, [page0])
    with pytest.raises(RollbackError, match="announces 3 code pages, this client has seen 4"):
        world.local().sync()
    # a client whose cache is gone still knows what it saw (the head file): the same 3 pages chain to it
    head = world.cache.with_name(world.cache.name + ".head")
    assert json.loads(head.read_text())["pages"] == 3
    cached.reset()
    fresh = world.local()
    assert fresh.sync().pages_total == 3  # the same 3 pages: the chain value matches the one seen
    world.assert_same(fresh, codes[:5])


def test_deletes_and_replacements_are_honoured(world):
    rng = np.random.default_rng(3)
    codes = _codes(rng, 1500, 48, distinct=40)
    ids = np.arange(10, 1510)
    world.upload(ids, codes)
    local = world.local()
    local.sync()
    gone = [int(i) for i in ids[::7]]
    world.delete(gone)
    new_codes = _codes(rng, 30, 48)
    replaced = np.array([i for i in ids[1:40] if i not in gone][:30])
    world.upload(replaced, new_codes, replace=True)  # replaced codes: later pages
    pages_before = local.pages
    world.assert_same(local, np.concatenate([codes[:5], new_codes[:5]]), ks=(1, 20, 1500))
    assert local.pages == pages_before + 2  # one tombstone page, one page of replacements
    assert len(local) == 1500 - len(gone) == world.reader.stats("private").items
    (found, dist), = local.search(new_codes[:1], 1500)
    assert found[0] == replaced[0] and dist[0] == 0 and not set(gone) & set(found.tolist())
    assert len(found) == len(local)
    assert list(world.reader.fetch("private", gone[:3])) == []
    # a fresh client replaying every page from 0 reaches the same state
    fresh = LocalIndex(world.reader, "private", 48, world.pk.image_key, binding=world.pk.binding)
    fresh.sync()
    for (a, da), (b, db) in zip(fresh.search(codes[:5], 200), local.search(codes[:5], 200)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(da, db)


def test_within_one_page_the_last_record_of_an_id_wins():
    bits, rng = 48, np.random.default_rng(4)
    codes = _codes(rng, 4, bits)
    records = PageRecords(np.array([1, 1, 0, 1, 1], np.uint8), np.array([5, 6, 5, 7, 6]),
                          np.stack([codes[0], codes[1], np.zeros(6, np.uint8), codes[2], codes[3]]))
    plain = encode_records(records, bits)
    assert len(plain) == 6 + 5 * (1 + 8 + 16 + 6)  # op, id, blob digest (zeros: no blob bound), code
    back = decode_records(plain, bits)
    np.testing.assert_array_equal(back.ids, records.ids)
    assert not back.digests.any() and back.digests.shape == (5, 16)
    local = LocalIndex(None, "c", bits, bytes(32))
    local._apply([back])
    local.private = True
    (ids, d), = local.search(codes[3], 10)
    assert ids.tolist()[0] == 6 and d[0] == 0 and sorted(ids.tolist()) == [6, 7]


@pytest.mark.embedded_store  # reads or fills the SQLite store's own file
def test_store_holds_no_code_in_the_clear(cloud_server):
    rng = np.random.default_rng(5)
    keys = OwnerKeys.generate().register("sealed", "private").for_collection("sealed")
    bits = 64
    transform = CodeTransform(keys.transform_secret, bits)
    with CloudClient(cloud_server.address) as admin:
        owner_token, _ = admin.create_collection("sealed", bits, cloud_server.admin_token, private=True)
    owner = CloudClient(cloud_server.address, owner_token)
    codes = _codes(rng, 3000, bits)
    ids = rng.choice(2**62, size=len(codes), replace=False)
    writer = PageWriter(owner, keys.image_key, "sealed", bits, binding=keys.binding)
    for s in range(0, 3000, 1000):
        writer.put(ids[s:s + 1000], codes[s:s + 1000])
        list(owner.upload("sealed", [(int(i), b"", rng.bytes(64), {}) for i in ids[s:s + 1000]]))
    # an item with a code is refused in this mode, and so is a Search
    with pytest.raises(CloudError) as info:
        list(owner.upload("sealed", [(1, codes[0].tobytes(), b"x", {})]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no code" in info.value.details
    with pytest.raises(CloudError) as info:
        owner.search("sealed", codes[:1], 5)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "private-ranking" in info.value.details
    owner.close()
    cloud_server.stop()  # the last connection checkpoints the WAL: everything is in the file
    path = cloud_server.data_dir / "store.sqlite3"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    stored = [r[0] for r in conn.execute("SELECT code FROM items WHERE collection = 'sealed'")]
    assert len(stored) == 3000 and set(stored) == {b""}
    pages = [r[0] for r in conn.execute("SELECT data FROM code_pages WHERE collection = 'sealed' ORDER BY page")]
    conn.close()
    assert len(pages) == 3
    secrets_ = [c.tobytes() for c in codes] + [c.tobytes() for c in transform.apply(codes)]
    id_bytes = [struct.pack(">Q", int(i)) for i in ids]
    everything = b"".join(p.read_bytes() for p in cloud_server.data_dir.glob("store.sqlite3*"))
    for page in pages:  # sealed: no code, no id, no records header in there
        assert page[:5] == b"DLHS\x02"  # page format 2
        assert struct.pack(">HI", bits, 1000) not in page
        assert not any(s in page for s in id_bytes[:1000])
    assert not [s for s in secrets_ if s in everything], "a raw or transformed code is in the store file"


def test_reader_syncs_but_cannot_append_and_the_server_checks_pages(world):
    rng = np.random.default_rng(6)
    world.upload(np.arange(100), _codes(rng, 100, 48))
    (_, page0), = sync_code_pages(world.reader, "private", 0)[1]
    sealed = seal_page(page_key(world.pk.image_key, world.pk.binding), world.pk.binding, 1,
                       encode_records(PageRecords(np.ones(1, np.uint8), np.array([1]), _codes(rng, 1, 48)), 48),
                       chain=next_chain(chain_start(world.pk.binding), page0))
    with pytest.raises(CloudError) as info:
        append_code_page(world.reader, "private", 1, sealed)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert [n for n, _ in sync_code_pages(world.reader, "private", 0)[1]] == [0]
    with pytest.raises(CloudError) as info:  # the other collection's reader token opens nothing here
        sync_code_pages(world.ranked_reader, "private", 0)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    header, pages = sync_code_pages(world.ranked_reader, "ranked", 0)  # a server-ranked one: header only
    assert (header.mode, header.pages, list(pages)) == (pb.SERVER_RANKED, 0, [])
    ranked_local = LocalIndex(world.ranked_reader, "ranked", None, world.rk.image_key, binding=world.rk.binding)
    assert not ranked_local.sync().private and ranked_local.bits == 48
    with pytest.raises(CloudError) as info:
        append_code_page(world.owner, "private", 5, sealed)  # not the next number
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "next page is number 1" in info.value.details
    with pytest.raises(CloudError) as info:
        append_code_page(world.owner, "private", 1, b"not a page at all, not at all, no")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(CloudError) as info:
        append_code_page(world.ranked, "ranked", 0, sealed)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    header, pages = sync_code_pages(world.reader, "private", 7)  # past the end: the header alone
    assert header.pages == 1 and list(pages) == []
    assert append_code_page(world.owner, "private", 1, sealed) == 2
    assert world.reader.stats("private").code_pages == 2
    assert world.local().sync().pages_total == 2  # page 1 chains to page 0: it opens


def test_pages_are_bound_to_collection_number_and_key():
    rng = np.random.default_rng(7)
    key = page_key(bytes(range(32)), "c")
    plain = encode_records(PageRecords(np.ones(3, np.uint8), np.arange(3), _codes(rng, 3, 48)), 48)
    sealed = seal_page(key, "c", 4, plain)
    ring = {1: key}
    assert open_page(ring, "c", 4, sealed) == plain
    assert page_keyring(bytes(range(32)), "c") == ring
    chain = next_chain(chain_start("c"), sealed)
    after = seal_page(key, "c", 5, plain, chain=chain)
    assert open_page(ring, "c", 5, after, chain) == plain
    for bad in (lambda: open_page(ring, "c", 5, sealed),  # moved to another number
                lambda: open_page(ring, "d", 4, sealed),  # another collection
                lambda: open_page({1: page_key(bytes(32), "c")}, "c", 4, sealed),  # another key
                lambda: open_page({2: key}, "c", 4, sealed),  # a key version the grant lacks
                lambda: open_page(ring, "c", 4, sealed[:-1]),  # truncated
                lambda: open_page(ring, "c", 4, sealed[:30] + bytes([sealed[30] ^ 1]) + sealed[31:]),  # altered
                lambda: open_page(ring, "c", 5, after),  # after another history of the pages before it
                lambda: open_page(ring, "c", 5, after, next_chain(chain_start("c"), after)),
                lambda: open_page(ring, "c#00", 4, sealed),  # the same name, another collection uid
                lambda: open_page(ring, "c", 4, sealed[:4] + b"\x01" + sealed[5:]),  # format 1 (no chain, no digests)
                lambda: open_page(ring, "c", 4, sealed[:4] + b"\x03" + sealed[5:])):  # an unknown format version
        with pytest.raises(PageAuthenticationError):
            bad()
    assert page_key(bytes(range(32)), "c") != bytes(range(32))  # the image key itself never seals a page


def test_two_writers_never_share_a_page_number_and_mode_survives_a_restart(world, tmp_path):
    rng = np.random.default_rng(8)
    other = PageWriter(world.owner, world.pk.image_key, "private", 48, binding=world.pk.binding)
    a, b = _codes(rng, 50, 48), _codes(rng, 50, 48)
    assert world.writer.put(np.arange(50), a) == [0]
    assert other.put(np.arange(50, 100), b) == [1]
    assert world.writer.put(np.arange(100, 101), a[:1]) == [2]  # its count was stale: re-read, re-sealed
    big = other.put(np.arange(1000, 1000 + MAX_PAGE_RECORDS + 1), _codes(rng, MAX_PAGE_RECORDS + 1, 48))
    assert big == [3, 4]
    list(world.owner.upload("private", [(i, b"", b"x", {}) for i in range(101)]))
    world.server.stop()
    world.server.start()
    with CloudClient(world.server.address, world.reader.token) as reader:
        info = reader.stats("private")
        assert info.mode == pb.PRIVATE_RANKING and info.code_pages == 5 and info.items == 101
        with CloudClient(world.server.address, world.ranked_reader.token) as ranked:
            assert ranked.stats("ranked").mode == pb.SERVER_RANKED
        local = LocalIndex(reader, "private", 48, world.pk.image_key, binding=world.pk.binding)
        assert local.sync().items == 101 + MAX_PAGE_RECORDS + 1
        (ids, d), = local.search(b[:1], 1)
        assert ids[0] == 50 and d[0] == 0


def test_cli_creates_a_private_collection(cloud_server, tmp_path, capsys, monkeypatch):
    from dlheir.cli import main

    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    token_file = str(cloud_server.data_dir / "admin.token")
    assert main(["owner", "init"]) == 0  # a collection's keys are made with it, in the owner key file
    assert main(["owner", "create-collection", "p1", "--bits", "48", "--private", "--server", cloud_server.address,
                 "--admin-token-file", token_file]) == 0
    assert main(["owner", "create-collection", "p2", "--bits", "48", "--mode", "private", "--server", cloud_server.address,
                 "--admin-token-file", token_file]) == 0
    assert main(["owner", "create-collection", "s1", "--bits", "48", "--server", cloud_server.address,
                 "--admin-token-file", token_file]) == 0
    assert "private" in capsys.readouterr().out
    modes = {}
    for name in ("p1", "p2", "s1"):
        doc = json.loads((tmp_path / "home" / f"{name}.tokens.json").read_text())
        with CloudClient(cloud_server.address, doc["reader_token"]) as reader:
            modes[name] = (doc["mode"], reader.stats(name).mode)
    assert modes == {"p1": ("private", pb.PRIVATE_RANKING), "p2": ("private", pb.PRIVATE_RANKING),
                     "s1": ("server-ranked", pb.SERVER_RANKED)}
    # the key file records each collection's mode and its own uid (the client trusts these, not the server)
    keys = OwnerKeys.load(tmp_path / "home" / "owner.key")
    assert {n: keys.for_collection(n).mode for n in ("p1", "p2", "s1")} == {"p1": "private", "p2": "private",
                                                                           "s1": "server-ranked"}
    assert len({keys.for_collection(n).uid for n in ("p1", "p2", "s1")}) == 3


def test_cli_user_search_ranks_locally_for_a_private_collection(tmp_path, triton_server, cloud_server, digits_small,
                                                                capsys, monkeypatch):
    """The same images in a server-ranked and a private collection: `dlheir user search` takes the
    mode from the grant and both give the same results (the same images at the same distances; item
    ids are keyed per collection, so they differ, and so does the order of ties); the private one
    leaves a 0600 page cache, one per collection uid."""
    from dlheir import User
    from dlheir.cli import main
    from dlheir.ids import keyed_content_id

    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    monkeypatch.setenv("DLHEIR_HOME", str(home))
    addr, tri = cloud_server.address, triton_server.grpc_url
    admin = str(cloud_server.data_dir / "admin.token")
    assert main(["owner", "init"]) == 0
    assert main(["user", "keygen"]) == 0
    query = next(digits_small.glob("1/*.png"))
    found = {}
    for name, flags in (("ranked", []), ("sealed", ["--private"])):
        assert main(["owner", "create-collection", name, "--server", addr, "--triton", tri, "--admin-token-file", admin,
                     *flags]) == 0
        assert main(["owner", "upload", str(digits_small), "--collection", name, "--triton", tri]) == 0
        assert main(["owner", "grant", "--user-pub", str(home / "user.pub.pem"), "--collection", name,
                     "--out", str(tmp_path / f"{name}.grant")]) == 0
        capsys.readouterr()
        assert main(["user", "search", str(query), "-k", "8", "--grant", str(tmp_path / f"{name}.grant"),
                     "--out", f"found-{name}", "--triton", tri, "--json"]) == 0
        found[name] = json.loads(capsys.readouterr().out)
    assert found["ranked"]["ranking"] == "server" and found["sealed"]["ranking"] == "local (private mode)"
    originals = {p.name: p.read_bytes() for p in digits_small.rglob("*.png")}  # names are unique here
    keys = OwnerKeys.load(home / "owner.key")
    everything = {}
    for name in ("ranked", "sealed"):
        hits = found[name]["results"]
        assert len(hits) == 8 and [h["rank"] for h in hits] == list(range(1, 9)) and hits[0]["distance"] == 0
        assert [(h["distance"], h["id"]) for h in hits] == sorted((h["distance"], h["id"]) for h in hits)
        id_key = keys.for_collection(name).id_key
        for hit in hits:  # each hit is the stored image of that name, under its keyed content id
            assert hit["id"] == keyed_content_id(id_key, originals[hit["name"]])
            assert (tmp_path / hit["file"]).read_bytes() == originals[hit["name"]]
        full = User(grant=tmp_path / f"{name}.grant", triton=tri).search(query, k=len(originals), write=False)
        assert [(h.id, h.distance) for h in full.results][:8] == [(h["id"], h["distance"]) for h in hits]
        everything[name] = {h.name: (h.distance, h.id) for h in full.results}
    # the whole ranking: every image at the same distance in both collections, under ids that differ
    assert len(everything["ranked"]) == len(everything["sealed"]) == len(originals)
    assert {n: d for n, (d, _) in everything["ranked"].items()} == {n: d for n, (d, _) in everything["sealed"].items()}
    assert not {i for _, i in everything["ranked"].values()} & {i for _, i in everything["sealed"].values()}
    assert sorted(d for d, _ in everything["ranked"].values())[:8] == [h["distance"] for h in found["sealed"]["results"]]
    caches = sorted((home / "page-cache").iterdir())
    sealed_uid = keys.for_collection("sealed").uid
    assert [c.name for c in caches] == [default_cache_path(addr, "sealed", sealed_uid).name,
                                        default_cache_path(addr, "sealed", sealed_uid).name + ".head"]
    assert all(c.stat().st_mode & 0o777 == 0o600 for c in caches)
    with CloudClient(addr, json.loads((home / "sealed.tokens.json").read_text())["owner_token"]) as owner:
        info = owner.stats("sealed")
        assert info.mode == pb.PRIVATE_RANKING and info.items == len(originals) and info.code_pages >= 1


def test_per_user_readers_and_key_rotation_in_private_mode(world):
    """A per-user reader token syncs until revoked; after a rotation (key 2) new pages are sealed
    under the new image key and a grant holding both versions opens every page."""
    rng = np.random.default_rng(9)
    first = _codes(rng, 300, 48)
    world.upload(np.arange(300), first)
    alice = CloudClient(world.server.address, world.owner.add_reader("private", "alice"))
    keys2 = world.keys.rotated("private").for_collection("private")
    ring = keys2.image_keys()  # what a grant made after the rotation holds: every version up to 2
    assert (keys2.key_id, ring[1]) == (2, world.pk.image_key) and ring[2] != ring[1]
    assert world.keys.rotated("private").for_collection("ranked").image_key == world.rk.image_key  # untouched
    mine = LocalIndex(alice, "private", 48, ring, binding=keys2.binding)
    assert mine.sync().items == 300
    assert world.owner.revoke_reader("private", "alice")
    with pytest.raises(CloudError) as info:
        mine.sync()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    alice.close()
    # rotation: the server holds no code to re-key; it records key 2 and revokes every reader token
    answer = world.owner.rekey_codes("private", 1, 2, list(range(48)), bytes(6))
    assert answer.items == 300 and world.owner.stats("private").key_id == 2
    later = _codes(rng, 50, 48)
    # the writer checks the pages before (under key 1) with the keyring, and seals new ones under key 2
    PageWriter(world.owner, ring, "private", 48, key_id=2, binding=keys2.binding).put(np.arange(300, 350), later)
    bob = CloudClient(world.server.address, world.owner.add_reader("private", "bob"))
    local = LocalIndex(bob, "private", 48, ring, binding=keys2.binding)
    assert local.sync().items == 350
    (ids, d), = local.search(later[:1], 1)
    assert ids[0] == 300 and d[0] == 0
    with pytest.raises(PageAuthenticationError, match="key version 1"):  # a grant holding key 2 only
        LocalIndex(bob, "private", 48, {2: keys2.image_key}, binding=keys2.binding).sync()
    bob.close()


class _FixedHasher:
    """Stands in for Triton: the query 'image' is its own raw code (no model fingerprint)."""

    bits, fingerprint = 48, None

    def hash_one(self, code):
        return np.zeros(48, np.float32), np.asarray(code, np.uint8)


def test_user_flow_gives_server_ranked_hits_and_fetches_in_id_order(world):
    from dlheir.client.crypto import Grant, encrypt_image
    from dlheir.client.private import open_local
    from dlheir.client.user import search_image
    from dlheir.errors import UserError

    rng = np.random.default_rng(10)
    codes = _codes(rng, 400, 48, distinct=12)
    ids = rng.choice(2**62, size=400, replace=False)
    ck = {"ranked": world.rk, "private": world.pk}
    for name, cloud in (("ranked", world.ranked), ("private", world.owner)):
        blobs = [(int(i), world.transform.apply(c)[0].tobytes() if name == "ranked" else b"",
                  encrypt_image(ck[name].image_key, b"img-%d" % i, ck[name].binding, int(i), name=f"{i}.png"), {})
                 for i, c in zip(ids, codes)]
        list(cloud.upload(name, blobs))
        if name == "private":  # each page record names its item's blob
            private_blobs = [blob for _, _, blob, _ in blobs]
            world.writer.put(ids, codes, private_blobs)
    asked = []
    fetch = world.reader.fetch
    world.reader.fetch = lambda name, wanted: (asked.append(list(wanted)), fetch(name, wanted))[1]
    grants = {name: Grant(name, "", ck[name].image_key, ck[name].transform_secret, bits=48, uid=ck[name].uid,
                          mode=ck[name].mode)
              for name in ("ranked", "private")}
    local = open_local(world.reader, grants["private"], cache=None)
    assert local is not None and open_local(world.ranked_reader, grants["ranked"], cache=None) is None
    with pytest.raises(UserError, match="private-ranking"):  # the grant says private: never a server Search
        search_image(codes[0], grants["private"], world.reader, _FixedHasher(), k=15)
    assert local.digests[int(ids[0])] == blob_digest(private_blobs[0])
    local.check_blob(int(ids[0]), private_blobs[0])
    with pytest.raises(PageAuthenticationError, match="other than"):  # another item's blob under this id
        local.check_blob(int(ids[0]), private_blobs[1])
    for q in codes[:5]:
        served, _ = search_image(q, grants["ranked"], world.ranked_reader, _FixedHasher(), k=15)
        mine, timings = search_image(q, grants["private"], world.reader, _FixedHasher(), k=15, local=local)
        assert [(h.rank, h.id, h.distance, h.image) for h in mine] == [(h.rank, h.id, h.distance, h.image)
                                                                        for h in served]
        assert mine[0].image == b"img-%d" % mine[0].id and timings.sync_s > 0
        assert asked[-1] == sorted(h.id for h in mine)  # the server sees which ids, not their order
